"""Few-shot LoRA adaptation: `busgen-jax adapt --config configs/adapt_phantom.py --workdir DIR`.

Read top to bottom:

  base checkpoint (EMA weights, model config, vocabularies, its schedule and objective) -> the task (a label field
  and its classes, each a new trainable row of the pathology table, or the base's own rows) -> k images per class
  (seeded, whole cases: one view per case before any second view) and held-out validation images from other
  cases -> the base with adapters injected and tables extended, split into adapters (trained, replicated) and the
  frozen base (sharded by its logical axes, passed to every step, never differentiated, updated or copied) ->
  loop { batch -> jitted step on the adapters -> validation loss at fixed (t, noise) -> best adapters } ->
  DIR/adapters (small, loads on top of the base), DIR/merged (a plain checkpoint `busgen-jax sample` reads),
  DIR/box_prior.json (fitted on the shots, per class), DIR/adapt.json.

Generate from the result with `busgen-jax sample --config.checkpoint=DIR/merged` (or
`--config.adapters=DIR/adapters`, which merges in memory on top of the base).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx

from busgen_jax import checkpoint, parallel, paths
from busgen_jax.data import pipeline, reader, schema
from busgen_jax.data import box_prior as box_prior_lib
from busgen_jax.diffusion import objectives, samplers, schedule
from busgen_jax.models import card, lora, unet
from busgen_jax.train import diffusion, loop, state as train_state, writers

ADAPTERS, MERGED, BOX_PRIOR, SUMMARY = "adapters", "merged", "box_prior.json", "adapt.json"


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.base = ""                  # `busgen-jax train` <workdir>/checkpoints, or an `import-official` directory
  c.which = "ema"
  c.step = -1                  # -1: the latest
  c.device_names = ()          # the base's device vocabulary when its checkpoint has none (imported models)
  c.task = ml_collections.ConfigDict({
      "field": "histology",    # the record field naming the classes: pathology | birads | histology
      "classes": ("cyst", "fibroadenoma"),
      "rows": "new",           # new: one new pathology-table row per class | existing: the base's rows (pathology)
      "pathology": (),         # ("class", "benign"|"malignant"|"normal") pairs written into generated records
  })
  c.new_devices = True         # devices of the shots the base does not know get new rows (else the null row)
  c.data = ml_collections.ConfigDict({
      "path": "", "split": "train", "shots": 16, "shot_seed": 0,     # k images per class
      "val_split": "val", "val_per_class": 32,                        # held out, other cases
      # Or the images chosen by the caller (record indices of `split` / `val_split`), e.g. the few-shot
      # protocol's draws; shots / val_per_class are then not used.
      "shot_indices": (), "val_indices": (),
      "image_size": 0,         # 0: the base's training size
      "batch_size": 8, "crop": "random", "flip": True, "worker_count": 0})
  # Prior preservation: images of the base's own training data (`path`, `split`, only `devices` when given), with
  # their own labels on the base's rows, make up `weight` of every batch, so that the adapters learn the new
  # images without drifting from what the base knew (DreamBooth's prior-preservation loss, as data).
  c.prior = ml_collections.ConfigDict({"path": "", "split": "train", "weight": 0.0, "devices": ()})
  c.lora = lora.default_config()
  c.num_steps = 300
  c.accum_steps = 1
  c.optim = train_state.default_config()
  c.optim.update(lr=1e-3, warmup_steps=20, weight_decay=0.0, ema_decay=0.99)
  c.cond_drop_prob = 0.1       # keep classifier-free guidance working for the new labels
  # The new label rows' learning rate over the adapters': rows live at the table's scale (norm ~5, known classes
  # ~7 apart) and at the adapters' rate they barely separate in a few hundred steps (docs/EXPERIMENTS.md).
  c.label_lr_multiplier = 10.0
  c.eval_every = 50
  c.sample_every = 0           # steps between sample grids of the adapted model in TensorBoard (0: never)
  c.num_samples = 8            # conditioned on the shots of the batch at that step
  c.sampler = samplers.default_config()
  c.val_repeats = 4            # fixed (t, noise) draws per validation image, t stratified over [0, T)
  c.select = "best"            # best: the adapters with the lowest validation loss | last
  c.log_every = 25
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  c.async_checkpoints = True
  c.box_bandwidth = 0.02       # KDE bandwidth of the per-class box prior fitted on the shots (few boxes)
  c.export_merged = True
  c.seed = 0
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1})
  c.sharding_rules = parallel.DEFAULT_RULES
  return c


# ------------------------------------------------------------------------------------------------ the task

def task_classes(task) -> list[str]:
  if task.field not in ("pathology", "birads", "histology"):
    raise ValueError(f"task.field must be pathology, birads or histology, got {task.field!r}")
  norm = {"pathology": schema.normalize_pathology, "birads": schema.normalize_birads}.get(task.field, str)
  classes = [norm(c) for c in task.classes]
  if len(classes) < 1 or len(set(classes)) != len(classes) or schema.UNKNOWN in classes:
    raise ValueError(f"task.classes must be distinct, known labels, got {list(task.classes)}")
  return classes


def select(ds: reader.Dataset, split: str, field: str, classes: list[str], per_class: int, seed: int, *,
           exclude_cases=(), exact: bool = True, cases: np.ndarray | None = None,
           whole_cases: bool = False) -> dict[str, np.ndarray]:
  """Up to `per_class` record indices per class (exactly, when `exact`): cases in a seeded order, one view per
  case before any case's second view (or, with `whole_cases`, every view of a case before the next case: fewer
  cases used up, when the others must stay free for testing); cases in `exclude_cases` are skipped. `cases`:
  the split's case ids, when the caller has them already."""
  labels = pipeline.scan_labels(ds, split)[field]
  names = ds.vocab(field)
  cases = ds.case_ids(split) if cases is None else cases
  excluded = np.isin(cases, np.asarray(list(exclude_cases), dtype=cases.dtype))
  out = {}
  for j, name in enumerate(classes):
    recs = np.flatnonzero((labels == names.index(name)) & ~excluded) if name in names else np.zeros(0, int)
    by_case: dict[str, list[int]] = {}
    for r in np.random.default_rng([seed, j]).permutation(recs):
      by_case.setdefault(cases[r], []).append(int(r))
    order = ([r for v in by_case.values() for r in v] if whole_cases else
             [v[i] for i in range(max(map(len, by_case.values()), default=0)) for v in by_case.values() if i < len(v)])
    if (exact and len(order) < per_class) or not order:
      raise ValueError(f"{ds.dir} split {split!r}: {len(order)} usable images with {field}={name!r}, "
                       f"{per_class} wanted (vocabulary {names})")
    out[name] = np.sort(np.asarray(order[:per_class], np.int64))
  return out


def by_class(ds: reader.Dataset, split: str, field: str, classes: list[str], indices, what: str
             ) -> dict[str, np.ndarray]:
  """Given record indices of a split, grouped by their class; every class needs one, other labels are an error."""
  idx = np.asarray(indices, np.int64)
  if idx.min() < 0 or idx.max() >= ds.splits[split]:
    raise ValueError(f"data.{what}: record indices outside {ds.dir} split {split!r} ({ds.splits[split]} records)")
  names = ds.vocab(field)
  labels = np.asarray([names[i] for i in pipeline.scan_labels(ds, split)[field][idx]])
  stray = sorted(set(labels) - set(classes))
  if stray:
    raise ValueError(f"data.{what}: records of {field} {stray}, not a task class {classes}")
  out = {c: np.sort(idx[labels == c]) for c in classes}
  empty = [c for c, v in out.items() if not len(v)]
  if empty:
    raise ValueError(f"data.{what}: no image of class {empty}")
  return out


def label_rows(task, classes: list[str], base_cfg, base_vocab: dict, shot_devices: list[str], new_devices: bool,
               untrained: set[str] = frozenset()):
  """Model rows of the task's classes and of the devices, and the adapted model's vocabularies. A device in
  `untrained` counts as unknown to the base: its old row loses its name ("#<row>") and it gets a new one."""
  n_path, n_dev = base_cfg.num_pathology, base_cfg.num_devices
  def names(vocab, n):   # rows without a name (a table larger than the training vocabulary) are "#<row>"
    return (list(vocab) + [f"#{i}" for i in range(len(vocab), n)])[:n]
  path_names, dev_names = names(base_vocab["pathology"], n_path), names(base_vocab["device"], n_dev)
  dev_names = [f"#{i}" if d in untrained else d for i, d in enumerate(dev_names)]
  if task.rows == "new":
    clash = sorted(set(classes) & set(path_names))
    if clash:
      raise ValueError(f"task classes {clash} are already rows of the base's pathology table: use "
                       f"task.rows=existing to adapt them, or other class names")
    rows = {c: n_path + j for j, c in enumerate(classes)}
    path_names += classes
  elif task.rows == "existing":
    missing = sorted(set(classes) - set(path_names))
    if task.field != "pathology" or missing:
      raise ValueError(f"task.rows=existing needs task.field=pathology and classes the base knows "
                       f"({path_names}); missing {missing}")
    rows = {c: path_names.index(c) for c in classes}
  else:
    raise ValueError(f"task.rows must be new or existing, got {task.rows!r}")
  added = [d for d in dict.fromkeys(shot_devices) if d not in dev_names and d != schema.UNKNOWN] if new_devices else []
  dev_names += added
  return rows, {"pathology": path_names, "device": dev_names}, {"pathology": len(path_names) - n_path,
                                                                "device": len(added)}


def initial_rows(task, classes: list[str], base_params, vocab: dict, new_rows: dict) -> dict:
  """Where new rows start: a class at the row of its pathology (`task.pathology`, e.g. cyst -> benign), else at
  the mean of the base's named rows; a new device at the mean of the named device rows."""
  parent = {c: schema.normalize_pathology(p) for c, p in task.pathology}
  out = {}
  for field, table in (("pathology", "pathology_table"), ("device", "device_table")):
    n = new_rows.get(field, 0)
    if not n:
      continue
    rows = np.asarray(base_params[table]["embedding"], np.float64)
    names = vocab[field][:rows.shape[0]]
    named = [i for i, name in enumerate(names) if i and not name.startswith("#")] or list(range(1, len(rows)))
    mean = rows[named].mean(0)
    if field == "pathology" and task.rows == "new":
      out[field] = np.stack([rows[names.index(parent[c])] if parent.get(c) in names else mean for c in classes])
    else:
      out[field] = np.broadcast_to(mean, (n, rows.shape[1]))
  return out


# ------------------------------------------------------------------------------------------------ setup

class Setup:
  """Everything static about an adaptation run: base, task, data subsets, model split, shardings, jitted steps."""

  def __init__(self, cfg: ml_collections.ConfigDict):
    self.cfg = cfg
    if not cfg.base or not cfg.data.path:
      raise ValueError("--config.base (the pretrained model's checkpoints) and --config.data.path (the converted "
                       "dataset the shots come from) are required")
    base = card.load(cfg.base, which=cfg.which, step=None if cfg.step < 0 else cfg.step,
                     device_names=tuple(cfg.device_names), image_size=cfg.data.image_size)
    self.base = base
    self.image_size = base.image_size
    tc = base.train_config
    self.sched = schedule.Schedule.from_config(ml_collections.ConfigDict(tc.get("schedule") or
                                                                         schedule.default_config().to_dict()))
    if self.sched.T != base.cfg.T:
      raise ValueError(f"the base's schedule has T={self.sched.T}, its model T={base.cfg.T}")
    self.objective = ml_collections.ConfigDict(tc.get("objective") or objectives.default_config().to_dict())
    self.objective.cond_drop_prob = cfg.cond_drop_prob
    p = cfg.prior
    if not 0.0 <= p.weight < 1.0:
      raise ValueError(f"prior.weight is the prior images' share of a batch, in [0, 1): got {p.weight}")
    if p.weight and not p.path:
      raise ValueError("prior.weight > 0 needs prior.path: the base's training data (a converted dataset)")
    if p.weight and cfg.task.rows != "existing":
      raise ValueError("prior preservation trains the prior images on the base's own rows: task.rows=existing")

    # The task's examples: k shots per class, validation images from other cases.
    self.classes = task_classes(cfg.task)
    ds = reader.open_dataset(cfg.data.path)
    self.dataset = ds
    cases = ds.case_ids(cfg.data.split)
    if len(cfg.data.shot_indices):
      self.shots = by_class(ds, cfg.data.split, cfg.task.field, self.classes, cfg.data.shot_indices, "shot_indices")
    else:
      self.shots = select(ds, cfg.data.split, cfg.task.field, self.classes, cfg.data.shots, cfg.data.shot_seed,
                          cases=cases)
    shot_idx = np.concatenate(list(self.shots.values()))
    same = cfg.data.val_split == cfg.data.split
    if len(cfg.data.val_indices):
      self.val = by_class(ds, cfg.data.val_split, cfg.task.field, self.classes, cfg.data.val_indices, "val_indices")
      if same and set(cases[np.concatenate(list(self.val.values()))]) & set(cases[shot_idx]):
        raise ValueError("data.val_indices share cases with the shots: validation must come from other cases")
    else:
      self.val = select(ds, cfg.data.val_split, cfg.task.field, self.classes, cfg.data.val_per_class,
                        cfg.data.shot_seed + 1, exclude_cases=set(cases[shot_idx]) if same else (), exact=False,
                        cases=cases if same else None)
    labels = pipeline.scan_labels(ds, cfg.data.split)
    shot_devices = [ds.vocab("device")[i] for i in labels["device"][shot_idx]]
    self.untrained = base.untrained("device")
    self.rows, self.vocab, self.new_rows = label_rows(cfg.task, self.classes, base.cfg, base.vocab, shot_devices,
                                                      cfg.new_devices, self.untrained)
    self.model_cfg = ml_collections.ConfigDict(base.cfg.to_dict())
    self.model_cfg.num_pathology = len(self.vocab["pathology"])
    self.model_cfg.num_devices = len(self.vocab["device"])

    # The model, split into trained adapters and the frozen base.
    model = card.adapted_module(base.cfg, base.params, cfg.lora, self.new_rows, cfg.seed,
                        initial_rows(cfg.task, self.classes, base.params, self.vocab, self.new_rows))
    frozen_axes = unet.param_axes(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    self.graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, nnx.Param)
    self.adapters0 = nnx.to_pure_dict(adapters)
    frozen = nnx.to_pure_dict(frozen)
    self.num_adapter_params = unet.num_params(self.adapters0)
    self.num_frozen_params = unet.num_params(frozen)

    self.mesh = parallel.make_mesh(dict(cfg.mesh))
    self.rules = parallel.Rules(cfg.sharding_rules)
    self.rules.check(self.mesh)
    parallel.check_batch_size(cfg.data.batch_size, self.mesh, self.rules)
    repl = parallel.replicated(self.mesh)
    frozen_sh = parallel.shardings(frozen, frozen_axes, self.mesh, self.rules)
    self.frozen = parallel.from_host(frozen, frozen_sh)
    tcfg = ml_collections.ConfigDict({"optim": cfg.optim.to_dict(), "num_steps": cfg.num_steps,
                                      "accum_steps": cfg.accum_steps, "model": base.cfg.to_dict(),
                                      "objective": self.objective.to_dict()})
    self.tx = optax.chain(train_state.optimizer(cfg.optim, cfg.num_steps), optax.masked(
        optax.scale(cfg.label_lr_multiplier), lambda p: jax.tree_util.tree_map_with_path(
            lambda path, _: "extra" in jax.tree_util.keystr(path), p)))
    abstract = jax.eval_shape(lambda p: train_state.init_state(p, self.tx, 0), self.adapters0)
    self.state_shardings = jax.tree.map(lambda _: repl, abstract)
    self.abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                       abstract, self.state_shardings)
    self.batch_keys = ("image", *base.cfg.conditions)
    batch_sh = {k: parallel.batch_sharding(self.mesh, self.rules, 1 if k in ("pathology", "device") else 4)
                for k in self.batch_keys}
    self.train_step = jax.jit(diffusion.make_train_step(self.graphdef, self.sched, tcfg, self.tx),
                              in_shardings=(self.state_shardings, batch_sh, frozen_sh),
                              out_shardings=(self.state_shardings, repl), donate_argnums=0)
    val_sh = {**batch_sh, "index": parallel.batch_sharding(self.mesh, self.rules, 1),
              "valid": parallel.batch_sharding(self.mesh, self.rules, 1)}
    self.val_step = jax.jit(self._make_val_step(), in_shardings=(self.state_shardings["params"], val_sh, frozen_sh),
                            out_shardings=repl)

  def init_state(self) -> dict:
    return jax.jit(lambda p: train_state.init_state(p, self.tx, self.cfg.seed),
                   out_shardings=self.state_shardings)(self.adapters0)

  # Labels arrive in the pipeline's global vocabularies; the model wants its own rows.
  def remap(self, local: dict, vocab: dict) -> dict:
    field = self.cfg.task.field
    to_row = np.array([self.rows.get(n, 0) for n in vocab[field]], np.int32)
    to_dev = np.array([self.vocab["device"].index(n) if n in self.vocab["device"] else 0 for n in vocab["device"]],
                      np.int32)
    out = {k: local[k] for k in self.batch_keys if k not in ("pathology", "device")}
    out["pathology"] = to_row[local[field]]
    if "device" in self.batch_keys:
      out["device"] = to_dev[local["device"]]
    return {k: out[k] for k in self.batch_keys}

  def _make_val_step(self):
    graphdef, sched, objective = self.graphdef, self.sched, self.objective
    R, T, conds = self.cfg.val_repeats, self.sched.T, tuple(self.base.cfg.conditions)
    rows = jnp.asarray([self.rows[c] for c in self.classes])
    key0 = jax.random.PRNGKey(self.cfg.seed + 12345)

    def val_step(adapters, batch, frozen):
      model = nnx.merge(graphdef, adapters, frozen)
      x0 = batch["image"]

      def one(r):   # the r-th fixed draw of every image: t in the r-th of R strata of [0, T)
        keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key0, i), r))(batch["index"])
        u = jax.vmap(lambda k: jax.random.uniform(k))(keys)
        t = jnp.clip(((r + u) * T / R).astype(jnp.int32), 0, T - 1)
        noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 1), x0.shape[1:]))(keys)
        return objectives.per_example_loss(lambda x, t, c: model(x, t, c), x0, {k: batch[k] for k in conds}, t,
                                           noise, sched, objective)

      loss = jnp.mean(jax.lax.map(one, jnp.arange(R)), axis=0)
      w = batch["valid"].astype(jnp.float32)[:, None] * (batch["pathology"][:, None] == rows[None, :])
      return jnp.sum(w * loss[:, None], axis=0), jnp.sum(w, axis=0)   # per class: sum, count

    return val_step

  def val_batches(self, batch_size: int) -> list[dict]:
    """This process's validation batches (host arrays, model rows), decoded once."""
    idx = np.concatenate(list(self.val.values()))
    p = pipeline.build_eval(self.cfg.data.path, self.cfg.data.val_split, image_size=self.image_size,
                            batch_size=batch_size, filters={self.cfg.task.field: self.classes}, indices=idx)
    out = []
    for b in p:
      out.append({**self.remap(b, p.vocab), "index": b["index"], "valid": b["valid"]})
    return out

  def validate(self, adapters, batches) -> dict:
    sums = counts = 0.0
    for b in batches:
      s, n = self.val_step(adapters, parallel.global_batch(b, self.mesh, self.rules), self.frozen)
      sums, counts = sums + np.asarray(s), counts + np.asarray(n)
    out = {"val_loss": float(np.sum(sums) / max(np.sum(counts), 1))}
    out.update({f"val_loss/{c}": float(s / max(n, 1)) for c, s, n in zip(self.classes, sums, counts)})
    return out


# ------------------------------------------------------------------------------------------------ the loop

def data_config(cfg: ml_collections.ConfigDict, setup: Setup) -> ml_collections.ConfigDict:
  """The adaptation stream: the shots, and with prior preservation the base's training images at prior.weight."""
  pc = pipeline.default_config()
  pc.sources = {"shots": {"path": cfg.data.path, "split": cfg.data.split, "weight": 1.0 - cfg.prior.weight,
                          "filters": {cfg.task.field: setup.classes},
                          "indices": tuple(int(i) for i in np.concatenate(list(setup.shots.values())))}}
  if cfg.prior.weight:
    pc.sources["prior"] = {"path": cfg.prior.path, "split": cfg.prior.split, "weight": cfg.prior.weight,
                           "filters": {cfg.task.field: setup.classes, "device": list(cfg.prior.devices)}}
  pc.update(image_size=setup.image_size, batch_size=cfg.data.batch_size, seed=cfg.seed, crop=cfg.data.crop,
            flip=cfg.data.flip, worker_count=cfg.data.worker_count)
  return pc


def adapt(cfg: ml_collections.ConfigDict, workdir: str | Path, *, stop_after: int | None = None) -> dict:
  """Adapts (resuming from DIR/checkpoints); returns the summary written to DIR/adapt.json.

  `stop_after` ends the run abruptly after that many steps of this invocation, as a crash would (tests)."""
  parallel.maybe_initialize_distributed()
  work = paths.path(workdir)   # local or gs://
  work.mkdir(parents=True, exist_ok=True)
  t_start = time.time()
  setup = Setup(cfg)
  logging.info("adapting %s to %s %s: %d shots per class, %d validation images; %d adapter parameters "
               "(%.2f%% of the frozen %d); new rows %s", setup.base.name, cfg.task.field, setup.classes,
               min(map(len, setup.shots.values())), sum(map(len, setup.val.values())), setup.num_adapter_params,
               100 * setup.num_adapter_params / setup.num_frozen_params, setup.num_frozen_params, setup.new_rows)
  pipe = pipeline.build(data_config(cfg, setup))
  val_batches = setup.val_batches(cfg.data.batch_size)
  # The stream's mean grey level per device (sampling starts there; the base's for the devices it does not show).
  image_mean = card.image_mean_stats(**pipeline.image_means(pipe, 1024), base=setup.base.card.image_mean)
  meta = _meta(cfg, setup, image_mean)
  ckpt = checkpoint.Checkpointer(work / "checkpoints", keep=cfg.keep_checkpoints, every=cfg.checkpoint_every,
                                 async_save=cfg.async_checkpoints, catch_sigterm=True)
  state, it = ckpt.restore_or_init(setup.abstract_state, pipe, setup.init_state)
  # Time spent adapting, over the calls that trained: a rerun of a finished adaptation keeps its figure.
  before = json.loads((work / SUMMARY).read_text())["seconds"] if (work / SUMMARY).exists() else 0.0
  trains = int(state["step"]) < cfg.num_steps or not before
  history_path = work / "val_history.json"
  history = [h for h in (json.loads(history_path.read_text()) if history_path.exists() else [])
             if h["step"] <= int(state["step"])]
  best = min((h["val_loss"] for h in history if h.get("saved")), default=np.inf)
  writer, progress = writers.create(str(work), cfg.num_steps, process_index=jax.process_index(),
                                    every_steps=cfg.log_every)

  def evaluate(step, state):
    nonlocal best
    v = setup.validate(state["params"], val_batches)
    save = cfg.select == "last" or v["val_loss"] < best or not (work / ADAPTERS).exists()
    if save:
      best = min(best, v["val_loss"])
      if not (work / ADAPTERS / str(step)).exists():   # else a resumed run re-evaluated it: same adapters
        lora.save_adapters(work / ADAPTERS, jax.tree.map(np.asarray, state["params"]), cfg.lora,
                           {**meta, "val": v}, step=step)
    history.append({"step": step, **v, "saved": bool(save)})
    if jax.process_index() == 0:
      history_path.write_text(json.dumps(history, indent=1))
    writer.write_scalars(step, v)
    logging.info("step %d: validation loss %.5f%s", step, v["val_loss"], " (saved)" if save else "")

  if cfg.select not in ("best", "last"):
    raise ValueError(f"select must be best or last, got {cfg.select!r}")

  def step_fn(state, local):
    return setup.train_step(state, parallel.global_batch(setup.remap(local, pipe.vocab), setup.mesh, setup.rules),
                            setup.frozen)

  # validation from the starting point (zero adapters, fresh label rows) on
  hooks = [loop.Hook(cfg.eval_every, lambda step, state, _: evaluate(step, state), at_start=True)]
  if cfg.sample_every:
    sample = _sampler(setup, card.Card.from_meta(meta), pipe.vocab)
    hooks.append(loop.Hook(cfg.sample_every, lambda step, state, local: writer.write_images(
        step, {"samples": writers.grid(sample(state["params"], local, step))}), at_end=False))
  _, step, last, _ = loop.run(state, it, step_fn, mesh=setup.mesh, ckpt=ckpt, writer=writer, progress=progress,
                              num_steps=cfg.num_steps, log_every=cfg.log_every, batch_size=cfg.data.batch_size,
                              meta=lambda: {"adapt": meta}, stop_after=stop_after, name="adapt", hooks=tuple(hooks))
  seconds = before + (time.time() - t_start if trains else 0.0)
  return _finish(cfg, setup, work, history, last, seconds, complete=step >= cfg.num_steps)


def _sampler(setup: Setup, model_card: card.Card, vocab: dict):
  """Samples of the adapted model (adapters over the frozen base) for the image summaries: the configured sampler
  with guidance, conditioned on the first rows of the step's batch of shots (their labels in the model's rows)."""
  cfg = setup.cfg
  n = min(cfg.num_samples, cfg.data.batch_size // jax.process_count())
  pred = setup.objective.prediction

  def eps_fn(params):
    model = nnx.merge(setup.graphdef, *params)          # (adapters, frozen base)
    return lambda x, t, c: objectives.eps_from_prediction(model(x, t, c), x, t, setup.sched, pred)

  run = diffusion.grid_sampler(setup.sched, cfg.sampler, n, setup.image_size, eps_fn)
  conds = tuple(setup.base.cfg.conditions)

  def sample(adapters, local, step):
    rows = setup.remap(local, vocab)
    devices = [setup.vocab["device"][d] for d in rows["device"][:n]] if "device" in rows else ["unknown"] * n
    first = model_card.start_rows(devices, cfg.sampler.start)
    return np.asarray(run((adapters, setup.frozen), {k: rows[k][:n] for k in conds}, first,
                          jax.random.PRNGKey(step)))

  return sample


def _meta(cfg, setup: Setup, image_mean: dict) -> dict:
  """What an adapter checkpoint records: enough to rebuild the adapted model on top of its base."""
  task = {"field": cfg.task.field, "classes": setup.classes, "rows": setup.rows,
          "pathology": {c: schema.normalize_pathology(p) for c, p in cfg.task.pathology}}
  adapters = {"lora": cfg.lora.to_dict(), "seed": cfg.seed, "new_rows": setup.new_rows,
              "base": {"checkpoint": str(paths.path(cfg.base)), "which": cfg.which,
                       "step": setup.base.step, "device_names": list(cfg.device_names)}}
  model_card = card.Card(model=setup.model_cfg.to_dict(), image_size=setup.image_size, vocab=setup.vocab,
                         train_config=setup.base.train_config, task=task, adapters=adapters,
                         image_mean=image_mean)
  return {**model_card.to_meta(),
          "data": {"path": str(setup.dataset.dir), "split": cfg.data.split,
                   "shots": {c: v.tolist() for c, v in setup.shots.items()},
                   "val_split": cfg.data.val_split, "val": {c: v.tolist() for c, v in setup.val.items()}},
          "config": cfg.to_json()}


def _finish(cfg, setup: Setup, work: Path, history: list, last: dict, seconds: float, *, complete: bool = True
            ) -> dict:
  """Box prior from the shots, the merged checkpoint and the summary."""
  prior = None
  records = setup.dataset.records(cfg.data.split)
  boxes, names = [], []
  for c, idx in setup.shots.items():
    for i in idx:
      boxes.append(setup.dataset.decode(records[int(i)], skip=("image", "mask"))["boxes"])
      names.append(c)
  try:
    prior = box_prior_lib.fit(boxes, names, bandwidth=cfg.box_bandwidth,
                              source={"adapted_shots": str(setup.dataset.dir), "split": cfg.data.split})
    if jax.process_index() == 0:
      prior.save(work / BOX_PRIOR)
  except ValueError:
    logging.info("the shots have no lesion boxes: no box prior written")
  if cfg.export_merged and complete:   # a preempted run exports when its resumed run completes
    model = card.load(adapters=str(work / ADAPTERS), base_model=setup.base)
    checkpoint.save_params(work / MERGED, model.params, model.card.to_meta())
  start = next((h for h in history if h["step"] == 0), None)
  best = min((h for h in history if h.get("saved")), key=lambda h: h["val_loss"], default=None)
  summary = {"base": setup.base.name, "task": {"field": cfg.task.field, "classes": setup.classes},
             "shots_per_class": min(map(len, setup.shots.values())), "val_images": int(sum(map(len, setup.val.values()))),
             "adapter_params": setup.num_adapter_params, "frozen_params": setup.num_frozen_params,
             "new_rows": setup.new_rows, "val_loss_start": start and start["val_loss"],
             "val_loss_best": best and best["val_loss"], "best_step": best and best["step"], "last": last,
             "box_prior": str(work / BOX_PRIOR) if prior else "", "adapters": str(work / ADAPTERS),
             "merged": str(work / MERGED) if cfg.export_merged and complete else "", "seconds": seconds}
  if jax.process_index() == 0:
    (work / SUMMARY).write_text(json.dumps(summary, indent=1, default=float))
  return summary
