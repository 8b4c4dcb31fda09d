"""Downstream classifiers: `busgen-jax classify --config configs/classify.py:real=DIR --workdir DIR`.

Read top to bottom: task (label field, class names) -> Grain pipeline over real, generated or mixed sources
(`config.data.sources`, mixing weights) filtered to the task's classes -> model from the registry -> jitted
train step (params and BatchNorm statistics replicated, batch sharded over the data axes, donated state) ->
every `eval_every` steps: validation on a real split, the best checkpoint kept by its metric (`DIR/best`).
The `classify` stage (busgen_jax/stages/classify.py) then evaluates it on every test set.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import nnx
from sklearn import metrics as skm

from busgen_jax import checkpoint, parallel, paths
from busgen_jax.data import pipeline, reader
from busgen_jax.models import classifiers
from busgen_jax.train import loop, state as train_state, writers


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 2000
  c.log_every = 50
  c.eval_every = 250
  c.checkpoint_every = 250
  c.keep_checkpoints = 2
  c.task = ml_collections.ConfigDict({"field": "pathology", "classes": ("benign", "malignant"),
                                      "positive": "malignant"})   # binary: AUC of `positive`
  c.data = pipeline.default_config()
  c.data.image_size = 128
  c.data.batch_size = 64
  c.data.ultrasound_augment = ("gain", "speckle", "depth_attenuation")
  # Validation (checkpoint selection) and test sets: real data. path "" = the first train source's path. An
  # entry may name record `indices` of its split (a subset, e.g. a new site's images outside its few shots).
  c.val = ml_collections.ConfigDict({"path": "", "split": "val"})
  c.test = ml_collections.ConfigDict({"real_test": {"path": "", "split": "test"}})
  c.select_metric = "auc"        # auc (binary) | macro_auc | balanced_accuracy
  c.eval_batch_size = 64
  c.n_bootstrap = 1000
  c.reference_sensitivity = 0.0  # > 0: also report specificity at this sensitivity (e.g. a radiologist's)
  c.label_smoothing = 0.0
  # A saved classifier (its `DIR/best`) whose weights start training instead of a fresh init: fine-tuning, e.g. a
  # classifier trained on generated images refined on the real ones. Its model, classes and image size must be
  # this run's; the optimizer and step start afresh.
  c.init = ""
  c.model = classifiers.default_config()
  c.optim = train_state.default_config()
  c.optim.update(lr=1e-3, warmup_steps=100, weight_decay=0.05, grad_clip=1.0)
  c.mesh = ml_collections.ConfigDict({"data": -1})
  c.sharding_rules = parallel.DEFAULT_RULES
  return c


# ------------------------------------------------------------------------------------------------ model state

class Setup:
  """Static pieces: mesh, graph, label lookup, the jitted train and eval steps."""

  def __init__(self, cfg: ml_collections.ConfigDict, vocab: dict[str, list[str]], mesh=None):
    self.cfg = cfg
    self.mesh = mesh or parallel.make_mesh(dict(cfg.mesh))
    self.rules = parallel.Rules(cfg.sharding_rules)
    self.rules.check(self.mesh)
    parallel.check_batch_size(cfg.data.batch_size, self.mesh, self.rules)
    self.classes = list(cfg.task.classes)
    if len(self.classes) < 2:
      raise ValueError(f"task.classes needs at least two names, got {self.classes}")
    field_vocab = vocab[cfg.task.field]
    missing = [c for c in self.classes if c not in field_vocab]
    if missing:
      raise ValueError(f"task.classes {missing} not in the data's {cfg.task.field} vocabulary {field_vocab}")
    # global vocabulary index -> class index (-1: not a class of the task; filtered out before batching)
    self.lut = _lut(field_vocab, self.classes)
    self.positive = self.classes.index(cfg.task.positive) if cfg.task.positive in self.classes else None
    model = classifiers.create(cfg.model, len(self.classes), cfg.data.image_size, cfg.seed)
    self.graphdef, params, stats, self.rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    self.init_params, self.init_stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    self.tx = train_state.optimizer(cfg.optim, cfg.num_steps)
    self.lr = train_state.learning_rate(cfg.optim, cfg.num_steps)
    repl = parallel.replicated(self.mesh)
    self.repl = repl
    self.state_shardings = jax.tree.map(lambda _: repl, self.abstract_state())
    batch_sh = {"image": parallel.batch_sharding(self.mesh, self.rules, 4),
                "label": parallel.batch_sharding(self.mesh, self.rules, 1)}
    self.train_step = jax.jit(self._train_step, in_shardings=(self.state_shardings, batch_sh),
                              out_shardings=(self.state_shardings, repl), donate_argnums=0)
    self.predict = jax.jit(self._predict, in_shardings=(repl, repl, batch_sh["image"]),
                           out_shardings=parallel.batch_sharding(self.mesh, self.rules, 2))

  def _fresh_state(self, params=None, stats=None) -> dict:
    params = self.init_params if params is None else params
    stats = self.init_stats if stats is None else stats
    return {"step": jnp.zeros((), jnp.int32), "params": params, "batch_stats": stats,
            "opt_state": self.tx.init(params), "rng": jax.random.PRNGKey(self.cfg.seed)}

  def init_state(self, weights: dict | None = None) -> dict:
    """The first state: a fresh init, or `weights` ({"params", "batch_stats"}, e.g. `initial_weights`)."""
    w = weights or {}
    return jax.device_put(self._fresh_state(w.get("params"), w.get("batch_stats")), self.state_shardings)

  def abstract_state(self):
    return jax.eval_shape(self._fresh_state)

  def model(self, params, stats, *, train: bool = False) -> nnx.Module:
    """The classifier with these weights, in eval mode (or train mode: dropout, BatchNorm updates)."""
    model = nnx.merge(self.graphdef, params, stats, self.rest)
    model.train() if train else model.eval()
    return model

  def _train_step(self, state, batch):
    rng, key = jax.random.split(state["rng"])
    n = len(self.classes)
    smooth = self.cfg.label_smoothing

    def loss_fn(params):
      model = self.model(params, state["batch_stats"], train=True)
      logits = model(batch["image"], rngs=nnx.Rngs(dropout=key))
      target = optax.smooth_labels(jax.nn.one_hot(batch["label"], n), smooth) if smooth else \
          jax.nn.one_hot(batch["label"], n)
      loss = optax.softmax_cross_entropy(logits, target).mean()
      acc = (logits.argmax(-1) == batch["label"]).mean()
      return loss, (nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)), acc)

    (loss, (stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    grad_norm = optax.global_norm(grads)
    updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"], grad_norm=grad_norm)
    new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
           "batch_stats": stats, "opt_state": opt_state, "rng": rng}
    finite = jnp.isfinite(loss)
    new = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, state)
    return new, {"loss": loss, "accuracy": acc, "grad_norm": grad_norm, "lr": self.lr(state["step"]),
                 "finite": finite}

  def _predict(self, params, stats, images):
    return jax.nn.softmax(self.model(params, stats, train=False)(images), -1)

  # -------------------------------------------------------------------------------------------- evaluation

  def predictions(self, params, stats, path: str, split: str, *, indices=()) -> dict:
    """Probabilities of the task's classes for every example of a split (or of its records `indices`), with
    their class labels and record indices, in record order."""
    cfg = self.cfg
    filters = {cfg.task.field: self.classes}
    pipe = pipeline.build_eval(path, split, image_size=cfg.data.image_size, batch_size=cfg.eval_batch_size,
                               filters=filters, indices=tuple(indices), device_vocab=tuple(cfg.data.device_vocab))
    lut = _lut(pipe.vocab[cfg.task.field], self.classes)   # the evaluated dataset's own vocabulary
    probs, labels, index = [], [], []
    it = iter(pipe)
    try:
      with jax.set_mesh(self.mesh):
        for local in it:
          batch = parallel.global_batch({"image": local["image"]}, self.mesh, self.rules)
          rows = parallel.gather_rows({"probs": self.predict(params, stats, batch["image"]), "valid": local["valid"],
                               "label": lut[local[cfg.task.field]], "index": local["index"]})
          keep = rows["valid"]
          probs.append(rows["probs"][keep])
          labels.append(rows["label"][keep])
          index.append(rows["index"][keep])
    finally:
      it.close()
    return {"probs": np.concatenate(probs), "labels": np.concatenate(labels), "index": np.concatenate(index)}

  def selection_value(self, probs: np.ndarray, labels: np.ndarray) -> float:
    """The validation metric that selects the checkpoint (`select_metric`), as the evaluation reports define it:
    auc (the positive class against the rest), macro_auc (mean one-vs-rest AUC over the classes present) or
    balanced_accuracy (of the most probable class)."""
    metric, n = self.cfg.select_metric, len(self.classes)
    present = [k for k in range(n) if 0 < (labels == k).sum() < len(labels)]
    if metric == "balanced_accuracy":
      return float(skm.balanced_accuracy_score(labels, probs.argmax(1)))
    if metric == "auc" and self.positive is not None and n == 2:
      present = [self.positive] if self.positive in present else []
    elif metric not in ("auc", "macro_auc"):
      raise ValueError(f"select_metric must be auc, macro_auc or balanced_accuracy, got {metric!r}")
    if not present:
      return float("nan")
    return float(np.mean([skm.roc_auc_score(labels == k, probs[:, k]) for k in present]))


def _lut(field_vocab: list[str], classes: list[str]) -> np.ndarray:
  lut = np.full(len(field_vocab), -1, np.int32)
  for k, name in enumerate(classes):
    if name in field_vocab:
      lut[field_vocab.index(name)] = k
  return lut


# ------------------------------------------------------------------------------------------------ the loop

def with_overrides(cfg: ml_collections.ConfigDict, overrides, what: str) -> ml_collections.ConfigDict:
  """A copy of `cfg` with ("key=value", ...) applied; values read as Python literals where they parse as one
  (a recipe for some of an experiment's classifiers, e.g. "num_steps=750", "data.ultrasound_augment=()")."""
  import ast
  out = {}
  for o in overrides:
    key, sep, value = o.partition("=")
    if not sep or not key:
      raise ValueError(f"{what}: expected key=value, got {o!r}")
    try:
      out[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[key] = value
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  try:
    cfg.update_from_flattened_dict(out)
  except (KeyError, AttributeError, TypeError) as e:
    raise ValueError(f"{what} {tuple(overrides)}: {e}") from None
  return cfg


def _with_task_filters(cfg):
  """Every train source keeps only the task's classes (unless the config filters that field itself)."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for name in cfg.data.sources.keys():
    f = cfg.data.sources[name].filters
    if not f.get(cfg.task.field):
      f[cfg.task.field] = list(cfg.task.classes)
  return cfg


def default_real(cfg) -> str:
  first = sorted(cfg.data.sources.keys())[0]
  return cfg.data.sources["real"].path if "real" in cfg.data.sources else cfg.data.sources[first].path


def check_dataset(key: str, path: str, split: str = "") -> str:
  """The dataset directory that --config.<key> names (and its `split`, when given), or an error naming the key."""
  if not path:
    raise ValueError(f"--config.{key} is empty: give a dataset directory")
  try:
    found = reader.find_dataset_dir(path)
  except (FileNotFoundError, ValueError) as e:
    raise FileNotFoundError(f"--config.{key}: {e}") from None
  splits = reader.open_dataset(found).splits if split else {}
  if split and split not in splits:
    raise ValueError(f"--config.{key}: {found} has no split {split!r} (splits: {sorted(splits)})")
  return str(found)


def initial_weights(cfg, setup: Setup) -> dict | None:
  """`cfg.init`'s weights, checked against this run's model ({"params", "batch_stats"}), or None without one."""
  if not cfg.init:
    return None
  weights, meta = load_classifier(cfg.init)
  theirs = {"model": meta.get("model"), "classes": list((meta.get("task") or {}).get("classes", ())),
            "image size": meta.get("image_size")}
  ours = {"model": cfg.model.to_dict(), "classes": list(cfg.task.classes), "image size": cfg.data.image_size}
  differ = [k for k in ours if json.loads(json.dumps(theirs[k])) != json.loads(json.dumps(ours[k]))]
  if differ:
    raise ValueError(f"init {cfg.init}: its {', '.join(differ)} differ from this run's "
                     f"({', '.join(f'{theirs[k]} vs {ours[k]}' for k in differ)})")
  want = {"params": setup.init_params, "batch_stats": setup.init_stats}
  shape = lambda t: jax.tree.map(lambda a: tuple(np.shape(a)), t)
  if shape(weights) != shape(want):
    raise ValueError(f"init {cfg.init}: its weights do not fit this run's {cfg.model.name} model")
  return weights


def check_paths(cfg) -> None:
  """Every dataset the run will read exists: a missing validation or test set fails now, not after training."""
  named = [(f"data.sources.{n}.path", cfg.data.sources[n].path) for n in cfg.data.sources.keys()]
  named += [("val.path", cfg.val.path or default_real(cfg))]
  named += [(f"test.{n}.path", cfg.test[n].path or default_real(cfg)) for n in cfg.test.keys()]
  for key, path in named:
    check_dataset(key, path)
  if cfg.init and not paths.path(cfg.init).exists():
    raise FileNotFoundError(f"init: no saved classifier at {cfg.init} (a classifier run's DIR/best)")


def train(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains and keeps the best checkpoint on validation (`DIR/best`). Returns {"best_dir", "best" (step, value),
  "setup", "complete" (False after a preemption)}; `busgen_jax.stages.classify.run` evaluates it on the test sets."""
  parallel.maybe_initialize_distributed()
  check_paths(cfg)
  work = paths.path(workdir)   # local or gs://
  work.mkdir(parents=True, exist_ok=True)
  cfg = _with_task_filters(cfg)
  pipe = pipeline.build(cfg.data)
  setup = Setup(cfg, pipe.vocab)
  ckpt = checkpoint.Checkpointer(work / "checkpoints", keep=cfg.keep_checkpoints, every=cfg.checkpoint_every,
                                 catch_sigterm=True)
  best_dir = work / "best"
  state, meta, it = ckpt.restore_latest(jax.tree.map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), setup.abstract_state(),
      setup.state_shardings), pipe)
  best = meta.get("best", {"step": -1, "value": -np.inf})
  if state is None:   # not resuming: a fresh init, or the weights to fine-tune
    state = setup.init_state(initial_weights(cfg, setup))
  meta = {"model": cfg.model.to_dict(), "task": cfg.task.to_dict(), "image_size": cfg.data.image_size,
          "vocab": pipe.vocab, "config": cfg.to_json()}
  writer, progress = writers.create(str(work), cfg.num_steps, process_index=jax.process_index(),
                                    every_steps=cfg.log_every)
  val_path = cfg.val.path or default_real(cfg)

  shown = False

  def step_fn(state, local):
    nonlocal shown
    labels = setup.lut[local[cfg.task.field]]
    if (labels < 0).any():
      raise AssertionError("a batch holds labels outside task.classes (the task filter failed)")
    if not shown:   # what the model is fed (augmentations, mixing), once per run, without waiting on the device
      writer.write_images(0, {"inputs": writers.grid(local["image"][:16])})
      shown = True
    return setup.train_step(state, parallel.global_batch({"image": local["image"], "label": labels}, setup.mesh,
                                                         setup.rules))

  def validate(step, state, _):
    nonlocal best
    pred = setup.predictions(state["params"], state["batch_stats"], val_path, cfg.val.split,
                             indices=cfg.val.get("indices", ()))
    value = setup.selection_value(pred["probs"], pred["labels"])
    writer.write_scalars(step, {f"val/{cfg.select_metric}": value})
    logging.info("step %d: validation %s = %.4f (best %.4f at %d)", step, cfg.select_metric, value,
                 best["value"], best["step"])
    if value > best["value"] or best["step"] < 0:
      best = {"step": step, "value": value}
      checkpoint.save_params(best_dir, {"params": state["params"], "batch_stats": state["batch_stats"]},
                             meta={**meta, "best": best}, step=step, as_ema=False)

  _, _, _, complete = loop.run(state, it, step_fn, mesh=setup.mesh, ckpt=ckpt, writer=writer, progress=progress,
                               num_steps=cfg.num_steps, log_every=cfg.log_every, batch_size=cfg.data.batch_size,
                               meta=lambda: {**meta, "best": best}, hooks=(loop.Hook(cfg.eval_every, validate),),
                               name="classifier")
  return {"best_dir": best_dir, "best": best, "setup": setup, "complete": complete}


# ------------------------------------------------------------------------------------------------ evaluation

def load_classifier(directory: str | Path) -> tuple[dict, dict]:
  """(params {"params", "batch_stats"}, meta) of a saved classifier (`DIR/best`)."""
  _, meta = checkpoint.load_meta(directory)
  return checkpoint.load_params(directory, which="params"), meta
