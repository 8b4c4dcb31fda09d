"""Synthetic-dataset generation: `busgen-jax sample --config configs/sample_phantom.py --workdir DIR`.

Read top to bottom: checkpoint (EMA weights, model config, label vocabularies) -> conditions (pathology x
device grid or a condition file; lesion boxes from a box prior; optional lesion masks) -> N examples with global
indices -> shards of consecutive indices, shard k written by process k mod P on its own devices (params
replicated, batch sharded) -> per shard: jitted sampler, PNG records, a shard report -> merge (TFDS metadata
+ report) -> a contact sheet per condition.

Everything about example i (its noise, box, mask) derives from (seed, i), and every device runs the same
per-device batch, so the same seed and config give the same images on 1 or 8 devices or several hosts. A
shard is written atomically and skipped when a later run finds it done: an interrupted run resumes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from busgen_jax import console, parallel, paths
from busgen_jax.data import reader, schema, transforms, writer
from busgen_jax.data import box_prior as box_prior_lib
from busgen_jax.diffusion import objectives, protect, samplers, schedule
from busgen_jax.models import card, unet

SHEETS = "sheets"


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.checkpoint = ""            # `busgen-jax train` <workdir>/checkpoints, an `import-official` directory, or an
                               # adapted model (`busgen-jax adapt` <workdir>/merged)
  c.adapters = ""              # `busgen-jax adapt` <workdir>/adapters: merged onto its base (or onto `checkpoint`)
  c.which = "ema"              # ema | params
  c.step = -1                  # -1: the latest
  c.image_size = 0             # 0: the training run's data.image_size
  c.device_names = ()          # device vocabulary when the checkpoint has none (imported official models)
  c.schedule = schedule.default_config()
  c.sampler = samplers.default_config()
  c.seed = 0
  c.num_per_condition = 8
  # Rows of the pathology table by name (or official index); the grid is pathology x device. () = an adapted
  # model's task classes, else benign and malignant.
  c.pathology = ()
  c.device = ("unknown",)      # names in the checkpoint's vocabulary; ("all",) for every known device
  c.box = "prior"              # prior: sampled from box_prior | none: unconditional box channel
  c.box_prior = ""             # `busgen-jax fit-box-prior` output (JSON or NPZ)
  c.condition_file = ""        # JSON list of {"pathology", "device", "num", optional "boxes"} instead of the grid
  c.mask = ml_collections.ConfigDict({
      "source": "",            # "" | a dataset directory (its real masks) | a folder of PNG masks
      "split": "train",
      "deform": True,          # random affine deformation of the chosen mask (per example, seeded)
      "max_rotate": 20.0, "min_scale": 0.8, "max_scale": 1.2, "max_shift": 0.1})
  c.per_device_batch = 4
  c.examples_per_shard = 256
  c.name = "generated"
  c.version = "1.0.0"
  c.split = "train"
  c.output = ""                # data_dir; default <workdir>/data; the dataset goes to <output>/<name>/<version>
  c.sheet_size = 16            # images per condition on its contact sheet
  c.mesh = ml_collections.ConfigDict({"data": -1})   # over the scope's devices
  c.local_devices = 0          # host scope: use the first n of this host's devices (0: all)
  # "host": each host samples its own shards on its own chips, independently. "slice": one program over every
  # chip of every host, the hosts in lockstep (v5e slices need it: their compiler refuses a program on part of
  # a slice, "limited ICI routing"). "auto": slice for such chips when a slice spans hosts, else host.
  c.scope = "auto"
  # Privacy-protected sampling (diffusion/protect.py): steer samples away from the bank's training images.
  c.protect = protect.default_config()
  # The dataset's reports (plan, conversion report, generation.json) name the checkpoint, box prior, adapters,
  # mask source, protection bank and output by their last two path parts, so a shared repository does not
  # reveal the producer's file system; True records them in full.
  c.record_paths = False
  return c


_PATH_KEYS = ("checkpoint", "box_prior", "adapters", "output", "source", "bank")


def _shown(tree, record_paths: bool):
  """A config or provenance dict as the dataset's reports show it (see default_config().record_paths)."""
  if record_paths:
    return tree
  if isinstance(tree, dict):
    return {k: (_short(v) if k in _PATH_KEYS and isinstance(v, str) else _shown(v, False)) for k, v in tree.items()}
  if isinstance(tree, list):   # e.g. a student's lineage of teachers
    return [_shown(v, False) for v in tree]
  return tree


def _short(path: str) -> str:
  return "/".join(Path(path).parts[-2:]) if path else path


class SimulatedCrash(RuntimeError):
  """generate(stop_after_shards=...) ends the run as a crash would."""


# ------------------------------------------------------------------------------------------------ the model

def load_model(cfg: ml_collections.ConfigDict) -> card.Model:
  """The sample config's model, through the one loader (models/card.py)."""
  return card.load(cfg.checkpoint, which=cfg.which, step=None if cfg.step < 0 else cfg.step, adapters=cfg.adapters,
                   image_size=cfg.image_size, device_names=tuple(cfg.device_names))


def batch_guidance(cfg: ml_collections.ConfigDict, model_cfg) -> float:
  """The guidance scale applied by a doubled (conditional + unconditional) batch: none (1.0) for a guidance student,
  whose scale is the network's input."""
  return 1.0 if model_cfg.get("guidance_embed", False) else cfg.sampler.guidance_scale


def for_model(cfg: ml_collections.ConfigDict, model: card.Model) -> ml_collections.ConfigDict:
  """cfg with the sampler `model` runs: a distilled student's own plan (samplers.for_student)."""
  if not model.card.student:
    return cfg
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.sampler = samplers.for_student(cfg.sampler, model.card.student)
  return out


# ------------------------------------------------------------------------------------------------ conditions

def _index(vocab: list[str], value, field: str) -> int:
  if isinstance(value, str) and value in vocab:       # e.g. an adapted model's class "4A" or "cyst"
    return vocab.index(value)
  if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.isdigit()):
    i = int(value)
    if not 0 <= i < len(vocab):
      raise ValueError(f"{field} index {i} outside the model's vocabulary ({len(vocab)} names)")
    return i
  if field == "pathology":
    value = schema.normalize_pathology(value)
  if value not in vocab:
    raise ValueError(f"unknown {field} {value!r}; the model knows {vocab}")
  return vocab.index(value)


def conditions(cfg: ml_collections.ConfigDict, vocab: dict, task: dict | None = None,
               untrained: dict | None = None) -> list[dict]:
  """The condition sets, each {"pathology", "device" (names), "num", "boxes" (optional)}. Rows the model card
  names but training never saw (`untrained`, e.g. a device held out of pretraining) are left out of "all" and
  refused by name."""
  untrained = {f: set(v) for f, v in (untrained or {}).items()}
  if cfg.condition_file:
    p = paths.path(cfg.condition_file)   # local or gs://
    try:
      items = json.loads(p.read_text())
      assert isinstance(items, list) and all(isinstance(x, dict) for x in items)
    except Exception as e:  # noqa: BLE001
      raise ValueError(f"{p}: expected a JSON list of condition objects ({type(e).__name__}: {e})") from e
  else:
    devices = [d for d in vocab["device"][1:] if not d.startswith("#") and d not in untrained.get("device", ())] \
        if tuple(cfg.device) == ("all",) else list(cfg.device)
    # "all": every trained, named device ("#<row>" marks a table row without a name)
    names = list(cfg.pathology) or (task["classes"] if task else list(schema.LESION_PATHOLOGIES))
    items = [{"pathology": p, "device": d} for p in names for d in devices]
  out = []
  for i, it in enumerate(items):
    unknown = set(it) - {"pathology", "device", "num", "boxes"}
    if unknown:
      raise ValueError(f"condition {i}: unknown keys {sorted(unknown)}")
    pi = _index(vocab["pathology"], it.get("pathology", schema.UNKNOWN), "pathology")
    di = _index(vocab["device"], it.get("device", schema.UNKNOWN), "device")
    c = {"pathology": vocab["pathology"][pi], "device": vocab["device"][di],
         "num": int(it.get("num", cfg.num_per_condition))}
    for field in ("pathology", "device"):
      if c[field] in untrained.get(field, ()):
        raise ValueError(f"condition {i}: the model's {field} row {c[field]!r} was never trained (its training data "
                         f"left it out, see the model card): adapt the model to it first (`busgen-jax adapt`), or "
                         f"sample the null {field} {schema.UNKNOWN!r}")
    if "boxes" in it:
      b = np.asarray(it["boxes"], np.float32).reshape(-1, 4)
      if ((b < 0) | (b > 1)).any() or (b[:, 2:] <= b[:, :2]).any():
        raise ValueError(f"condition {i}: boxes must be normalised x1<x2, y1<y2 in [0, 1], got {b.tolist()}")
      c["boxes"] = b.tolist()
    out.append(c)
  return out


def proportional_conditions(counts: dict, pathologies, total: int, proportions: str) -> list[dict]:
  """{pathology, device, num} summing to `total`: in the training counts' proportions (largest-remainder
  rounding) or evenly over every pathology x device seen in training."""
  cells = [(p, d, n) for p in pathologies for d, n in sorted(counts.get(p, {}).items()) if d != "unknown" and n]
  if not cells:
    raise ValueError(f"no training images of pathologies {list(pathologies)} with a device")
  if proportions == "train":
    weights = np.array([n for _, _, n in cells], np.float64)
  elif proportions == "grid":
    weights = np.ones(len(cells))
  else:
    raise ValueError(f"generate.proportions must be train or grid, got {proportions!r}")
  exact = total * weights / weights.sum()
  num = np.floor(exact).astype(int)
  num[np.argsort(num - exact)[:total - num.sum()]] += 1
  return [{"pathology": p, "device": d, "num": int(k)} for (p, d, _), k in zip(cells, num) if k]


def _masks(cfg, image_size: int) -> dict[str, list[np.ndarray]] | None:
  """Real lesion masks by pathology ("*" = any) from a dataset or a folder of PNGs, at the model size."""
  src = cfg.mask.source
  if not src:
    return None
  from PIL import Image
  p = Path(src).expanduser()
  out: dict[str, list[np.ndarray]] = {"*": []}
  if any(p.glob("*.png")) and not (p / "dataset_info.json").exists():
    for f in sorted(p.glob("*.png")):
      try:
        m = np.asarray(Image.open(f).convert("L")) > 127
      except Exception as e:  # noqa: BLE001
        raise ValueError(f"{f}: not a readable mask PNG ({e})") from e
      if m.any():
        out["*"].append(transforms.resize(m.astype(np.uint8) * 255, image_size, is_mask=True) > 127)
  else:
    from busgen_jax.data import reader
    ds = reader.open_dataset(p)
    names = ds.vocab("pathology")
    records = ds.records(cfg.mask.split)
    for i in range(len(records)):
      ex = ds.decode(records[i], skip=("image",))
      if not ex["has_mask"] or not ex["mask"].any():
        continue
      m = ex["mask"][..., 0]
      top, left, side = transforms.square_crop_window(*m.shape, np.zeros((0, 4)), None)  # the centre crop
      m = transforms.resize(np.ascontiguousarray(m[top:top + side, left:left + side]), image_size,
                            is_mask=True) > 127
      if m.any():
        out["*"].append(m)
        out.setdefault(names[ex["pathology"]], []).append(m)
  if not out["*"]:
    raise ValueError(f"{p}: no non-empty lesion masks found")
  return out


class Examples:
  """Example i -> (condition, boxes, mask), reproducibly from (seed, i)."""

  def __init__(self, cfg, conds: list[dict], image_size: int, prior, masks):
    self.cfg, self.conds, self.size, self.prior, self.masks = cfg, conds, image_size, prior, masks
    self.starts = np.cumsum([0] + [c["num"] for c in conds])
    self.total = int(self.starts[-1])

  def condition(self, i: int) -> int:
    return int(np.searchsorted(self.starts, i, side="right") - 1)

  def __call__(self, i: int) -> dict:
    ci = self.condition(i)
    c = self.conds[ci]
    rng = np.random.default_rng([self.cfg.seed, i, 0xB0C5])
    mask = None
    if self.masks is not None:
      pool = self.masks.get(c["pathology"]) or self.masks["*"]
      mask = pool[rng.integers(len(pool))]
      if self.cfg.mask.deform:
        mask = transforms.deform_mask(mask, rng, self.cfg.mask)
      boxes = transforms.mask_box(mask)
    elif "boxes" in c:
      boxes = np.asarray(c["boxes"], np.float32)
    elif self.prior is not None and (c["pathology"] in schema.LESION_PATHOLOGIES or self.prior.has(c["pathology"])):
      boxes = self.prior.sample(c["pathology"], 1, rng, c["device"])
    else:
      boxes = np.zeros((0, 4), np.float32)
    return {"index": i, "condition": ci, "boxes": boxes, "mask": mask, **c}


# ------------------------------------------------------------------------------------------------ sampling

def make_sampler(cfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict, image_size: int,
                 prediction: str, mesh: jax.sharding.Mesh, *, protected: bool = False):
  """The jitted sampler on `mesh` (params replicated, examples over "data"): (params, index, cond, start) ->
  images in [-1, 1] (start: (B, 2), card.Card.start_rows), or (params, index, cond, start, bank) with privacy
  protection (bank: protect.load_bank's (descriptors, radius), replicated). Pure and device-agnostic, so
  `busgen-jax aot` compiles the same program for a TPU host."""
  sched = schedule.Schedule.from_config(cfg.schedule)
  if sched.T != model_cfg.T:
    raise ValueError(f"schedule.T={sched.T} differs from the model's T={model_cfg.T}")
  plan = samplers.plan_from_config(sched.betas, cfg.sampler)
  graphdef = nnx.graphdef(unet.abstract(model_cfg))
  seed, scale, clip = cfg.seed, cfg.sampler.guidance_scale, cfg.sampler.clip_x0 or None
  interval = tuple(cfg.sampler.guidance_interval)
  samplers.guided_rows(plan, interval)   # a bad interval fails here, before any compilation
  student = bool(model_cfg.get("guidance_embed", False))

  pc = cfg.protect

  def sample(params, index, cond, start, bank=None):
    net = nnx.merge(graphdef, params)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(index)
    eps = lambda x, t, c: objectives.eps_from_prediction(net(x, t, c), x, t, sched, prediction)
    if student:
      eps = samplers.with_guidance_input(eps, scale)
    transform = None if bank is None else functools.partial(
        protect.protected, bank=bank[0], sched=sched, radius=bank[1], scale=pc.scale, resolution=pc.resolution)
    return samplers.sample_from_keys(plan, eps, keys, (image_size, image_size, 3), cond=cond,
                                     guidance_scale=batch_guidance(cfg, model_cfg), clip_x0=clip,
                                     eps_transform=transform, start=start, guidance_interval=interval)

  repl = parallel.replicated(mesh)
  rows = parallel.rows(mesh)
  shardings = (repl, rows, rows, rows, repl) if protected else (repl, rows, rows, rows)
  return jax.jit(sample, in_shardings=shardings, out_shardings=rows), plan


# device_kind of chips whose compiler only accepts programs on a whole slice (see default_config().scope).
WHOLE_SLICE_CHIPS = ("TPU v5 lite",)


def resolve_scope(scope: str, devices: Sequence) -> str:
  """default_config().scope for these devices (all of the run's devices): "host" or "slice"."""
  if scope == "auto":
    hosts: dict[int, set[int]] = {}   # slice -> its hosts
    for d in devices:
      hosts.setdefault(getattr(d, "slice_index", 0), set()).add(d.process_index)
    split = any(len(h) > 1 for h in hosts.values())     # a host holds only part of its slice
    return "slice" if split and devices[0].device_kind in WHOLE_SLICE_CHIPS else "host"
  if scope not in ("host", "slice"):
    raise ValueError(f"--config.scope must be auto, host or slice, got {scope!r}")
  return scope


class Sampler:
  """The jitted sampler over the scope's devices: (params, this host's indices, conditions) -> its images in
  [-1, 1]. `batch` is this host's rows per call; in slice scope every host must call it equally often."""

  def __init__(self, cfg, model: card.Model, bank: tuple[np.ndarray, float] | None = None):
    cfg = for_model(cfg, model)
    self.scope = resolve_scope(cfg.scope, jax.devices())
    if self.scope == "slice" and cfg.local_devices:
      raise ValueError("--config.local_devices applies to scope=host only")
    devices = jax.local_devices()[:cfg.local_devices or None] if self.scope == "host" else jax.devices()
    self.mesh = parallel.make_mesh(dict(cfg.mesh), devices)
    mine = [d for d in self.mesh.devices.flat if d.process_index == jax.process_index()]
    self.batch = cfg.per_device_batch * len(mine)
    self.size = model.image_size
    self.model_conditions = tuple(model.cfg.conditions)
    self.card, self.start_mode = model.card, cfg.sampler.start
    self.card.start_rows((), self.start_mode)   # a bad sampler.start fails here, before any compilation
    if cfg.sampler.start == "data" and not model.card.image_mean:
      logging.info("%s: the model card has no image_mean: sampling starts from pure noise", model.name)
    prediction = model.train_config.get("objective", {}).get("prediction", "eps")
    self._sample, self.plan = make_sampler(cfg, model.cfg, self.size, prediction, self.mesh,
                                           protected=bank is not None)
    self.network_evals = samplers.network_evals(self.plan, batch_guidance(cfg, model.cfg),
                                                tuple(cfg.sampler.guidance_interval))
    if model.card.student:
      lo, hi = model.card.student["guidance_range"]
      if not lo <= cfg.sampler.guidance_scale <= hi:
        logging.warning("%s was distilled for guidance scales in [%g, %g]; %g is outside", model.name, lo, hi,
                        cfg.sampler.guidance_scale)
    self.params = jax.device_put(jax.tree.map(jnp.asarray, model.params), parallel.replicated(self.mesh))
    self.bank = () if bank is None else (
        jax.device_put((bank[0], np.float32(bank[1])), parallel.replicated(self.mesh)),)
    self.rows = parallel.rows(self.mesh)

  def __call__(self, examples: list[dict], vocab) -> np.ndarray:
    n = len(examples)
    pad = examples + [examples[-1]] * (self.batch - n)      # fixed batch: one compilation
    cond = {"pathology": np.array([vocab["pathology"].index(e["pathology"]) for e in pad], np.int32),
            "device": np.array([vocab["device"].index(e["device"]) for e in pad], np.int32),
            "box": np.stack([transforms.rasterize_boxes(e["boxes"], self.size, self.size) for e in pad])[..., None],
            "mask": np.stack([np.zeros((self.size, self.size), np.float32) if e["mask"] is None else
                              e["mask"].astype(np.float32) for e in pad])[..., None]}
    cond = {k: v for k, v in cond.items() if k in self.model_conditions}
    index = np.array([e["index"] for e in pad], np.int32)
    start = self.card.start_rows([e["device"] for e in pad], self.start_mode)
    rows = lambda a: jax.make_array_from_process_local_data(self.rows, a)   # this host's rows of the batch
    out = self._sample(self.params, rows(index), jax.tree.map(rows, cond), rows(start), *self.bank)
    shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])[:n]


def to_uint8(x: np.ndarray) -> np.ndarray:
  """(H, W, 3) in [-1, 1] -> uint8 (H, W): the channel mean (the model's grayscale is replicated)."""
  return np.clip(np.round((x.mean(-1) + 1.0) * 127.5), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ the run

def protect_bank(c: ml_collections.ConfigDict, seed: int = 0) -> tuple[np.ndarray, float]:
  """protect.bank's training images (at most max_images) and, for radius 0, its held-out split, as the
  recogniser's centre-square descriptors: (bank, radius) for `protect.protected`."""
  def split_images(split, limit, seed):
    n = reader.open_dataset(c.bank).splits.get(split)
    if not n:
      return None
    images = reader.read_images(c.bank, split, reader.subsample(n, limit, seed))["images"]
    return np.stack([reader.resize(reader.centre_square(im), c.resolution, c.resolution) for im in images])

  train = split_images(c.split, c.max_images, seed)
  if train is None:
    raise ValueError(f"protect.bank={c.bank!r} has no images in split {c.split!r}")
  return protect.bank(train, c, None if c.radius > 0 else split_images(c.holdout_split, 0, seed))


def generate(cfg: ml_collections.ConfigDict, workdir: str | Path, *, stop_after_shards: int | None = None) -> Path:
  """Generates this process's shards (resuming), merges when all are done. Returns the dataset directory."""
  t_start = time.time()
  # ArrayRecord writes local files: a gs:// workdir needs a local (or gcsfuse-mounted) --config.output.
  data_dir = paths.local(cfg.output or f"{os.fspath(workdir)}/data",
                         "generated dataset's folder (--config.output, default the workdir's data/)")
  model = load_model(cfg)
  cfg = for_model(cfg, model)
  task = model.task
  conds = conditions(cfg, model.vocab, task, model.card.untrained)
  classes = set(task["classes"]) if task else set()
  prior = None
  if cfg.box == "prior" and not cfg.mask.source and any(
      (c["pathology"] in schema.LESION_PATHOLOGIES or c["pathology"] in classes) and "boxes" not in c
      for c in conds):
    if not cfg.box_prior:
      raise ValueError("--config.box=prior needs --config.box_prior (from `busgen-jax fit-box-prior`, or an "
                       "adapted model's box_prior.json), or use --config.box=none")
    prior = box_prior_lib.BoxPrior.load(cfg.box_prior)
    for name in sorted({c["pathology"] for c in conds} & classes):
      if not prior.has(name):
        logging.warning("the box prior has no %r group: its images are generated without a lesion box", name)
  elif cfg.box not in ("prior", "none"):
    raise ValueError(f"--config.box must be 'prior' or 'none', got {cfg.box!r}")
  if cfg.mask.source and "mask" not in model.cfg.conditions:
    raise ValueError("--config.mask.source given but the model has no mask condition (model.conditions)")
  examples = Examples(cfg, conds, model.image_size, prior, _masks(cfg, model.image_size))
  ds = data_dir / cfg.name / cfg.version
  (ds / writer.REPORTS).mkdir(parents=True, exist_ok=True)
  n_shards = max(1, -(-examples.total // cfg.examples_per_shard))
  bank = protect_bank(cfg.protect, cfg.seed) if cfg.protect.bank else None
  provenance = {"model": model.name, "step": model.step, "which": cfg.which, "seed": cfg.seed,
                "sampler": cfg.sampler.to_dict(), "image_size": model.image_size, "adapters": cfg.adapters,
                "task": task, "protect": bank and {**cfg.protect.to_dict(), "bank_images": len(bank[0]) // 2,
                                                   "radius_used": round(bank[1], 6)}}
  if model.card.student:
    provenance["student"] = model.card.student
  fingerprint = hashlib.sha256(json.dumps(
      [provenance, conds, cfg.box, {k: v.tolist() for k, v in prior.groups.items()} if prior else None,
       cfg.mask.to_dict(), cfg.examples_per_shard, cfg.name, cfg.split], sort_keys=True,
      default=str).encode()).hexdigest()[:16]
  histology = [schema.UNKNOWN] + (list(task["classes"]) if task and task["field"] == "histology" else [])
  vocab_json = {"device": model.vocab["device"], "histology": histology}
  process, processes = jax.process_index(), jax.process_count()
  shown = _shown(provenance, cfg.record_paths)
  if process == 0:
    writer.write_plan(ds, fingerprint=fingerprint, num_tasks=n_shards, num_inputs=examples.total, vocab=vocab_json,
                      directory=str(ds) if cfg.record_paths else _short(str(ds)),
                      config={"name": cfg.name, "format": "generated", "input": model.name,
                              "generation": _shown(cfg.to_dict(), cfg.record_paths), "conditions": conds,
                              "provenance": shown})
  mine = [k for k in range(n_shards) if k % processes == process]
  todo = [k for k in mine if not writer.shard_done(ds, k, fingerprint)]
  if len(todo) < len(mine):
    logging.info("resuming: %d of this process's %d shards are already written", len(mine) - len(todo), len(mine))
  sampler = Sampler(cfg, model, bank)
  serialize = schema.Serializer(schema.Vocab(device=tuple(model.vocab["device"]), histology=tuple(histology)))
  span = lambda k: (k * cfg.examples_per_shard, min((k + 1) * cfg.examples_per_shard, examples.total))  # shard k
  n_todo = sum(hi - lo for lo, hi in map(span, todo))
  idle_calls = 0
  if sampler.scope == "slice" and processes > 1:   # every host runs the global program equally often
    from jax.experimental import multihost_utils
    calls = sum(-(-(hi - lo) // sampler.batch) for lo, hi in map(span, todo))
    idle_calls = int(np.max(multihost_utils.process_allgather(np.int32(calls)))) - calls
  done, t0 = 0, time.time()
  bar = console.bar(n_todo, f"sample {cfg.name}", unit="image")
  for n_written, k in enumerate(todo):
    lo, hi = span(k)
    with writer.Shard(ds, cfg.name, cfg.split, k, n_shards, index=k, fingerprint=fingerprint) as shard:
      for b0 in range(lo, hi, sampler.batch):
        batch = [examples(i) for i in range(b0, min(b0 + sampler.batch, hi))]
        images = sampler(batch, model.vocab)
        for e, x in zip(batch, images):
          ex = _record(e, to_uint8(x), cfg, provenance, task)
          shard.add(serialize(schema.to_feature_dict(ex, cfg.split)), id=ex.id, sha256=ex.sha256,
                    counts={"pathology": e["pathology"], "device": e["device"], "boxes": str(len(e["boxes"]))})
        done += len(batch)
        bar.update(len(batch))
        rate = done / max(time.time() - t0, 1e-9)
        logging.info("shard %d/%d: %d/%d images this run, %.2f images/s, ETA %.0fs", k + 1, n_shards, done,
                     n_todo, rate, (n_todo - done) / max(rate, 1e-9))
    if stop_after_shards is not None and n_written + 1 >= stop_after_shards:
      raise SimulatedCrash(f"stop_after_shards={stop_after_shards}")
  bar.close()
  for _ in range(idle_calls):   # this host has finished its shards: keep the other hosts' program company
    sampler([examples(0)], model.vocab)
  if processes > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("busgen-generate-shards-written")
  if process == 0:
    if all(writer.shard_done(ds, k, fingerprint) for k in range(n_shards)):
      report = writer.merge(ds)
      sheets = contact_sheets(ds, examples, cfg)
      writer.write_json(ds / "generation.json", {
          "provenance": shown, "conditions": conds, "num_examples": report["converted"],
          "sheets": [str(s.name) for s in sheets], "network_evals_per_image": sampler.network_evals,
          "seconds_this_run": time.time() - t_start,
          "images_per_sec_this_run": done / max(time.time() - t0, 1e-9)})
    else:
      logging.info("this host's shards are done; the dataset is merged when every host has finished")
  return ds


def _record(e: dict, image: np.ndarray, cfg, provenance: dict, task: dict | None = None) -> schema.Example:
  png = schema.encode_png(image)
  labels = {"pathology": e["pathology"]}
  if task and task["field"] != "pathology" and e["pathology"] in task["classes"]:   # an adapted model's class
    labels = {"pathology": task["pathology"].get(e["pathology"], schema.UNKNOWN), task["field"]: e["pathology"]}
  gen = {"condition": e["condition"], "index": e["index"], "pathology": e["pathology"], "device": e["device"],
         "boxes": np.round(e["boxes"], 5).tolist(), "mask": e["mask"] is not None,
         "sampler": f"{cfg.sampler.algorithm}/{cfg.sampler.method}/order{cfg.sampler.order}/"
                    f"{cfg.sampler.steps}steps/{cfg.sampler.skip_type}",
         "guidance_scale": cfg.sampler.guidance_scale, "guidance_interval": list(cfg.sampler.guidance_interval)}
  return schema.Example(
      id=f"{cfg.name}-{e['index']:08d}", image=image, boxes=e["boxes"], **labels, mask=e["mask"],
      device=e["device"], case_id=f"{cfg.name}-{e['index']:08d}", source_dataset=cfg.name,
      sha256=hashlib.sha256(png).hexdigest(), gen_model=provenance["model"], gen_step=provenance["step"],
      gen_seed=cfg.seed, gen_conditions=gen)


def contact_sheets(ds: Path, examples: Examples, cfg) -> list[Path]:
  """One PNG per condition: its first sheet_size images. Shards hold consecutive indices and generation
  rejects nothing, so example i is record i of the split."""
  from busgen_jax.data import inspect, reader
  d = reader.open_dataset(ds)
  out = []
  for ci, c in enumerate(examples.conds):
    start, n = int(examples.starts[ci]), min(c["num"], cfg.sheet_size)
    if n:
      name = f"condition-{ci:03d}-{c['pathology']}-{c['device']}.png".replace("/", "_").replace(" ", "_")
      out.append(inspect.contact_sheet(d, ds / SHEETS / name, split=cfg.split, indices=range(start, start + n)))
  return out
