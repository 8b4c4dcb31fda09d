"""The model card every diffusion checkpoint carries, and the one loader every stage reads models with.

Every writer of a model writes a `Card` into its checkpoint's metadata (`card.to_meta()`): pretraining
(`busgen-jax train`), adaptation (the adapters and the merged model) and `import-official`. It says what a
reader needs and nothing it must guess: the UNet's architecture, the image size it was trained at, the label
vocabularies (row i of a table is `vocab[field][i]`; row 0 is the null label), the rows no training ever
touched, the training run's config (schedule, objective, data), an adapted model's task, and for adapters
their LoRA config and base.

    model = card.load("/ckpt/run/checkpoints")                    # a trained model (EMA params)
    model = card.load("", adapters="/ckpt/adapt/adapters")        # adapters merged onto their recorded base
    model.card.vocab["device"], model.image_size, model.params

Checkpoints written before the card (three layouts: a training run's {"model", "vocab", "config"}, an adapter
export's {"lora", "base", ...}, an official import's model_config.json) keep loading: `Card.from_meta`
reads each into a card.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from busgen_jax import checkpoint, paths
from busgen_jax.models import lora, unet

NULL = "unknown"   # row 0 of every label table (the data schema's UNKNOWN)
# The official BUSGen's pathology rows (its label order, fixed by the released model).
OFFICIAL_PATHOLOGY = ("unknown", "benign", "malignant", "normal")
OFFICIAL_CONFIG = "model_config.json"   # an official import's architecture file (read by the official parity API)


@dataclasses.dataclass
class Card:
  model: dict                                     # the UNet config (models/unet.py default_config's keys)
  image_size: int                                 # the training image size (0: unknown, give one to `load`)
  vocab: dict[str, list[str]]                     # field -> row names; row 0 is NULL
  train_config: dict = dataclasses.field(default_factory=dict)   # the training run's config
  untrained: dict[str, list[str]] = dataclasses.field(default_factory=dict)   # named rows training never saw
  task: dict | None = None                        # an adapted model's task: field, classes, rows, pathology
  adapters: dict | None = None                    # adapters alone: lora, new_rows, seed, base (checkpoint, ...)
  source: dict = dataclasses.field(default_factory=dict)   # where it came from (format, official file, ...)
  # The training images' mean grey level (model range): {"all": [mean, std, n], "device": {name: [...]}}. Sampling
  # starts from the forward process's terminal marginal with it (samplers.default_config().start); {}: pure noise.
  image_mean: dict = dataclasses.field(default_factory=dict)
  # A distilled student (busgen-jax distill): kind, teacher (name, step, card source), guidance_range, and the
  # sampler plan it was distilled for (samplers.PLAN_KEYS), which `sample` runs unless told otherwise.
  student: dict | None = None

  def to_meta(self) -> dict:
    return {"card": dataclasses.asdict(self)}

  def start(self, device: str) -> tuple[float, float]:
    """(mean, std) of the training images' mean grey level for `device` (all devices' when it had fewer than
    MIN_START_IMAGES), or (0, 0) for a card without them (an official import, a model trained before)."""
    stats = self.image_mean.get("device", {}).get(device)
    if not stats or stats[2] < MIN_START_IMAGES:
      stats = self.image_mean.get("all")
    return (float(stats[0]), float(stats[1])) if stats else (0.0, 0.0)

  def start_rows(self, devices, mode: str) -> np.ndarray:
    """samplers.sample_from_keys' `start` (B, 2) for examples of these device names, by `sampler.start`: "data"
    (this card's statistics) or "noise" (zeros: pure noise)."""
    if mode not in START:
      raise ValueError(f"sampler.start must be one of {START}, got {mode!r}")
    return np.array([self.start(d) if mode == "data" else (0.0, 0.0) for d in devices], np.float32).reshape(-1, 2)

  @classmethod
  def from_meta(cls, meta: dict, directory=None) -> "Card":
    """The card of a checkpoint's metadata, including the layouts written before the card existed."""
    if "card" in meta:
      return cls(**meta["card"])
    config = json.loads(meta["config"]) if isinstance(meta.get("config"), str) else meta.get("config") or {}
    if "lora" in meta and "base" in meta:          # an adapter export
      return cls(model=meta.get("model", {}), image_size=int(meta.get("image_size", 0)), vocab=meta["vocab"],
                 train_config=config, task=meta.get("task"),
                 adapters={k: meta[k] for k in ("lora", "new_rows", "seed", "base")})
    if "model" in meta:                            # a training run or a merged export
      vocab = dict(meta.get("vocab", {}))
      image_size = meta.get("image_size") or config.get("data", {}).get("image_size", 0)
      return cls(model=meta["model"], image_size=int(image_size), vocab=vocab, train_config=config,
                 untrained={"device": sorted(untrained_devices(config, vocab.get("device", [])))},
                 task=meta.get("task"))
    if directory is not None and (paths.path(directory) / OFFICIAL_CONFIG).exists():   # an official import
      model = json.loads((paths.path(directory) / OFFICIAL_CONFIG).read_text())
      return cls(model=model, image_size=0, vocab={}, source={"format": "official-busgen", **meta})
    raise ValueError(f"{directory}: the checkpoint has no model card (not written by busgen-jax?)")


MIN_START_IMAGES = 16   # fewer images of a device than this: its start uses every device's statistics
START = ("data", "noise")   # samplers.default_config().start


def image_mean_stats(means: np.ndarray, devices: np.ndarray, base: dict | None = None) -> dict:
  """A card's `image_mean` from per-image means and device names (data/pipeline.image_means); `base`'s per-device
  entries are kept for the devices these images do not show (an adapted model keeps its base's)."""
  row = lambda m: [float(np.mean(m)), float(np.std(m)), int(len(m))]
  if not len(means):
    return dict(base or {})
  per_device = dict((base or {}).get("device", {}))
  per_device.update({str(d): row(means[devices == d]) for d in sorted(set(devices)) if d})
  return {"all": (base or {}).get("all") or row(means), "device": per_device}


def untrained_devices(train_config: dict, vocab: list[str]) -> set[str]:
  """Devices a vocabulary names but training never saw: its data sources' device filters left them out (a site
  held out of pretraining). Their rows are still at initialisation."""
  sources = ((train_config.get("data") or {}).get("sources") or {}).values()
  allowed = [set((s.get("filters") or {}).get("device") or ()) for s in sources]
  if not allowed or any(not a for a in allowed):   # a source without a device filter saw every device
    return set()
  return {d for d in vocab if d != NULL and not any(d in a for a in allowed)}


def with_defaults(vocab: dict, device_names=()) -> dict[str, list[str]]:
  """A card's vocabularies completed for sampling: an official model's pathology rows, device names given by the
  caller for a model that has none (`device_names`, row 0 NULL added), else the null device alone."""
  vocab = {k: list(v) for k, v in vocab.items()}
  vocab.setdefault("pathology", list(OFFICIAL_PATHOLOGY))
  if device_names:
    names = list(device_names)
    vocab["device"] = names if names[0] == NULL else [NULL, *names]
  vocab.setdefault("device", [NULL])
  return vocab


# ------------------------------------------------------------------------------------------------ the loader

@dataclasses.dataclass
class Model:
  """A loaded diffusion model: host params and its card (vocabularies completed, image size known)."""
  card: Card
  params: Any
  step: int
  name: str

  @property
  def cfg(self) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(self.card.model)

  @property
  def vocab(self) -> dict[str, list[str]]:
    return self.card.vocab

  @property
  def image_size(self) -> int:
    return self.card.image_size

  @property
  def task(self) -> dict | None:
    return self.card.task

  @property
  def train_config(self) -> dict:
    return self.card.train_config

  def untrained(self, field: str) -> set[str]:
    return set(self.card.untrained.get(field, ()))


def load(checkpoint_dir: str = "", *, which: str = "ema", step: int | None = None, adapters: str = "",
         image_size: int = 0, device_names=(), base_model: Model | None = None) -> Model:
  """The one model loader. `checkpoint_dir`: a training run's checkpoints, a merged export or an official import
  (`which` params at `step`, default the latest). `adapters`: an adapter export, merged onto `checkpoint_dir` (or,
  when empty, the base it records; `base_model` when that is already loaded). `image_size` overrides the card's;
  `device_names` names the device rows of a model whose card has none (an official import)."""
  if adapters:
    return _load_adapted(adapters, checkpoint_dir, base_model, image_size)
  path = paths.path(checkpoint_dir)
  if not checkpoint_dir or not path.is_dir():
    raise FileNotFoundError(f"checkpoint {checkpoint_dir!r}: not a checkpoint directory")
  step, meta = checkpoint.load_meta(path, step)
  card = Card.from_meta(meta, path)
  card.vocab = with_defaults(card.vocab, device_names)
  card.image_size = int(image_size or card.image_size)
  if not card.image_size:
    raise ValueError(f"{path}: the model card does not say the training image size: give image_size")
  params = checkpoint.load_params(path, which=which, step=step)
  name = f"{path.parent.name}/{path.name}" if path.name in ("checkpoints", "merged") else path.name
  return Model(card, params, step, name)


def adapted_module(base_cfg: ml_collections.ConfigDict, base_params, lora_cfg: ml_collections.ConfigDict,
                   new_rows: dict, seed: int, init: dict | None = None) -> nnx.Module:
  """The base UNet (with `base_params`), adapters injected, label tables extended by `new_rows` (starting at
  `init[field]` rows when given): what adaptation trains and what its exports load into."""
  graphdef, state = nnx.split(unet.abstract(base_cfg), nnx.Param)
  nnx.replace_by_pure_dict(state, base_params)
  model = nnx.merge(graphdef, state)
  lora.inject(model, lora_cfg)
  for field, n in new_rows.items():
    if n:
      lora.extend_labels(model, field, n, seed + (field == "device"), (init or {}).get(field))
  return model


def _load_adapted(directory: str, base: str, base_model: Model | None, image_size: int) -> Model:
  directory = paths.path(directory)
  _, meta = checkpoint.load_meta(directory)
  card = Card.from_meta(meta, directory)
  if not card.adapters:
    raise ValueError(f"{directory}: not an adapter checkpoint written by `busgen-jax adapt`")
  b = card.adapters["base"]
  if base_model is None:
    base_model = load(base or b["checkpoint"], which=b["which"], step=b["step"], device_names=b["device_names"],
                      image_size=card.image_size)
  module = adapted_module(base_model.cfg, base_model.params, ml_collections.ConfigDict(card.adapters["lora"]),
                          card.adapters["new_rows"], card.adapters["seed"])
  lora.load_adapters(directory, module)
  lora.merge(module)
  model_cfg = base_model.cfg
  model_cfg.update(lora.table_rows(module))
  params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module, nnx.Param)))
  merged = Card(model=model_cfg.to_dict(), image_size=int(image_size or card.image_size), vocab=card.vocab,
                # Adaptation renames the base's untrained device rows "#<row>" and trains a new row for the
                # device it adapts to (models never trained on a named row do not leave it).
                train_config=base_model.train_config, task=card.task,
                image_mean=card.image_mean or base_model.card.image_mean,
                source={"adapters": str(directory), "base": base_model.name})
  return Model(merged, params, base_model.step, f"{base_model.name}+{directory.parent.name}")

