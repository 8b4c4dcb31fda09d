"""The one Grain input pipeline, shared by diffusion training, sampling conditions and classifiers.

    index streams (per source: filter, per-epoch shuffle, class balancing, endless epochs)
      -> MapDataset.mix(weights) -> load + transform (random_map, seeded per global position)
      -> batch (chunks of the per-process share of the global batch) -> this process's chunks
      -> [from local batch `start`] -> to_iter_dataset -> mp_prefetch (workers)

Everything random is a function of (seed, global position), so the same seed gives the same examples, with the
same augmentations, for any number of worker processes and any number of hosts: global batch k is positions
[k B, (k+1) B) of the mixed stream in order, process p holding its p-th contiguous part. The iterator's state
is its position (Grain checkpoints it); after a change of process count a run resumes with `start` = its step
instead. MapDatasets are lazy, so records are decoded only after the per-process slice: each host decodes only
its own examples.

Labels are mapped to one global vocabulary (`data.device_vocab`, else the union of the sources' names with
"unknown" first), since each dataset stores its own.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import grain.python as grain
import ml_collections
import numpy as np

from busgen_jax.data import reader, schema, transforms

_EPOCHS = 1_000_000  # "endless": a virtual length far beyond any run


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  # Named sources: path (dataset dir or data_dir), split, mixing weight, filters (lists of label names), and an
  # optional `limit`: use at most that many of the selected records (nested subsets; data-scaling sweeps).
  c.sources = ml_collections.ConfigDict({"real": {"path": "", "split": "train", "weight": 1.0,
                                                  "filters": {"pathology": [], "device": [], "birads": [],
                                                              "histology": []}, "limit": 0}})
  c.image_size = 128
  c.batch_size = 32                  # global batch, across all processes
  c.seed = 0
  c.shuffle = True
  c.balance = "none"                 # "none" | "subsample" (BUSGen: larger classes cut each epoch) | "weighted"
  c.balance_field = "pathology"
  c.crop = "random"                  # "random" (keeps every box) | "center"
  c.flip = True
  c.ultrasound_augment = ()          # names from transforms.US_AUGMENTATIONS, for classifiers
  c.device_vocab = ()                # global device names; () = union of the sources' vocabularies
  c.worker_count = 0                 # Grain worker processes (0: in the main process)
  c.worker_buffer_size = 2
  return c


# ------------------------------------------------------------------------------------------------ labels

def scan_labels(ds: reader.Dataset, split: str) -> dict[str, np.ndarray]:
  """The label fields of every record of a split, parsed without decoding images; cached beside the shards."""
  cache = ds.dir / f"labels-{split}.npz"
  if cache.exists():
    with np.load(cache) as z:
      return {k: z[k] for k in z.files}
  records = ds.records(split)
  out = {k: np.zeros(len(records), np.int32) for k in schema.LABEL_FIELDS}
  for i in range(len(records)):
    ex = ds.decode(records[i], skip=("image", "mask"))
    for k in schema.LABEL_FIELDS:
      out[k][i] = ex[k]
  try:  # a read-only dataset is fine: the scan is just redone
    tmp = cache.with_name(cache.name + f".tmp{os.getpid()}.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)
  except OSError:
    pass
  return out


def label_counts(ds: reader.Dataset, split: str, indices=None) -> dict[str, dict[str, int]]:
  """{pathology: {device: n}} of a split's records (all, or `indices`), from the label scan."""
  labels = scan_labels(ds, split)
  p_names, d_names = ds.vocab("pathology"), ds.vocab("device")
  idx = range(len(labels["pathology"])) if indices is None else indices
  out: dict = {}
  for i in idx:
    per = out.setdefault(p_names[labels["pathology"][i]], {})
    per[d_names[labels["device"][i]]] = per.get(d_names[labels["device"][i]], 0) + 1
  return out


def global_vocab(datasets: Mapping[str, reader.Dataset], names: tuple[str, ...] = ()) -> dict[str, list[str]]:
  if names:
    device = list(names) if names[0] == schema.UNKNOWN else [schema.UNKNOWN, *names]
  else:
    device = [schema.UNKNOWN] + sorted({n for d in datasets.values() for n in d.vocab("device")} - {schema.UNKNOWN})
  histology = [schema.UNKNOWN] + sorted(
      {n for d in datasets.values() for n in d.vocab("histology")} - {schema.UNKNOWN})
  return {"pathology": list(schema.PATHOLOGY), "birads": list(schema.BIRADS), "device": device,
          "histology": histology}


# ------------------------------------------------------------------------------------------------ index streams

class EpochIndex:
  """Endless stream of record indices: epoch e is a seeded permutation of the selected indices, or a
  class-balanced draw from them ("subsample": every class cut to the smallest's size, as BUSGen does each
  epoch; "weighted": drawn with replacement, weights inverse to class frequency). Random access, picklable."""

  def __init__(self, indices: np.ndarray, classes: np.ndarray, *, balance: str, shuffle: bool, seed: int):
    if balance not in ("none", "subsample", "weighted"):
      raise ValueError(f"data.balance must be none, subsample or weighted, got {balance!r}")
    if not len(indices):
      raise ValueError("a data source selects no examples (check its split and filters)")
    self.indices, self.classes = np.asarray(indices), np.asarray(classes)
    self.balance, self.shuffle, self.seed = balance, shuffle, seed
    self._groups = [self.indices[self.classes == c] for c in np.unique(self.classes)]
    m = min(len(g) for g in self._groups)
    self.epoch_len = m * len(self._groups) if balance == "subsample" else len(self.indices)
    _, inverse, counts = np.unique(self.classes, return_inverse=True, return_counts=True)
    self._weights = 1.0 / counts[inverse]  # "weighted": inverse class frequency
    self._weights /= self._weights.sum()
    self._cache: tuple[int, np.ndarray] | None = None

  def epoch(self, e: int) -> np.ndarray:
    cached = self._cache  # one read: Grain's read threads share this object
    if cached is not None and cached[0] == e:
      return cached[1]
    rng = np.random.default_rng([self.seed, e])
    if self.balance == "subsample":
      m = self.epoch_len // len(self._groups)
      order = np.concatenate([rng.permutation(g)[:m] for g in self._groups])
      order = rng.permutation(order)
    elif self.balance == "weighted":
      order = self.indices[rng.choice(len(self.indices), size=len(self.indices), p=self._weights)]
    else:
      order = rng.permutation(self.indices) if self.shuffle else self.indices
    self._cache = (e, order)
    return order

  def __len__(self):
    return self.epoch_len * _EPOCHS

  def __getitem__(self, i: int) -> int:
    return int(self.epoch(i // self.epoch_len)[i % self.epoch_len])

  def __getstate__(self):
    return {**self.__dict__, "_cache": None}


# ------------------------------------------------------------------------------------------------ loading

@dataclasses.dataclass
class LoadAndTransform(grain.RandomMapTransform):
  """(source id, record index) -> model-ready example. Picklable: sources reopen lazily in each worker."""
  sources: tuple[reader.RecordSource, ...]
  label_maps: tuple[dict[str, np.ndarray], ...]   # per source: field -> dataset index -> global index
  image_size: int
  crop: str = "random"
  flip: bool = True
  ultrasound_augment: tuple[str, ...] = ()

  def random_map(self, element, rng: np.random.Generator):
    s, index = element
    ex = self.sources[s][index]
    image, mask, boxes = ex["image"][..., 0], ex["mask"][..., 0], ex["boxes"]
    window = transforms.square_crop_window(*image.shape, boxes, rng if self.crop == "random" else None)
    image, boxes, mask = transforms.crop(image, boxes, mask, window)
    if self.flip and rng.uniform() < 0.5:
      image, boxes, mask = transforms.hflip(image, boxes, mask)
    image = transforms.resize(np.ascontiguousarray(image), self.image_size)
    mask = transforms.resize(np.ascontiguousarray(mask), self.image_size, is_mask=True)
    for name in self.ultrasound_augment:
      image = transforms.US_AUGMENTATIONS[name](image, rng)
    out = {
        "image": transforms.to_model_range(image),
        "box": transforms.rasterize_boxes(boxes, self.image_size, self.image_size)[..., None],
        "mask": (mask > 127).astype(np.float32)[..., None],
        "has_mask": np.bool_(ex["has_mask"]),
        "source": np.int32(s),
    }
    for field, table in self.label_maps[s].items():
      out[field] = np.int32(table[ex[field]])
    return out


# ------------------------------------------------------------------------------------------------ the pipeline

@dataclasses.dataclass
class Pipeline:
  batches: grain.MapDataset          # this process's local batches, in order
  vocab: dict[str, list[str]]
  local_batch_size: int
  source_names: tuple[str, ...]
  worker_count: int = 0
  worker_buffer_size: int = 2

  def iterator(self, start: int = 0) -> grain.DatasetIterator:
    """The local batches from number `start` on (a Grain iterator, checkpointable)."""
    it = self.batches[start:].to_iter_dataset(
        grain.ReadOptions(num_threads=0 if self.worker_count else 2, prefetch_buffer_size=4))
    if self.worker_count:
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.worker_count,
                                                       per_worker_buffer_size=self.worker_buffer_size))
    return iter(it)

  def __iter__(self):
    return self.iterator(0)


def build(cfg: ml_collections.ConfigDict, *, process_index: int | None = None,
          process_count: int | None = None) -> Pipeline:
  """The pipeline for this process (defaults: jax.process_index()/process_count(), or 0/1 without JAX)."""
  if process_index is None or process_count is None:
    process_index, process_count = _process()
  if cfg.batch_size % process_count:
    raise ValueError(f"data.batch_size={cfg.batch_size} is not divisible by the {process_count} processes")
  names = tuple(sorted(cfg.sources.keys()))
  for n in names:
    if not cfg.sources[n].path:
      raise ValueError(f"data.sources.{n}.path is empty: give the dataset (--config.data.sources.{n}.path=DIR)")
  datasets = {n: reader.open_dataset(cfg.sources[n].path) for n in names}
  vocab = global_vocab(datasets, tuple(cfg.device_vocab))
  streams, weights, sources, label_maps = [], [], [], []
  for s, n in enumerate(names):
    sc, ds = cfg.sources[n], datasets[n]
    labels = scan_labels(ds, sc.split)
    idx = _select(ds, labels, sc.get("filters", {}), f"data.sources.{n}.filters.", sc.get("indices", ()))
    idx = limit(idx, int(sc.get("limit", 0) or 0), seed=cfg.seed)
    index_stream = EpochIndex(idx, labels[cfg.balance_field][idx], balance=cfg.balance, shuffle=cfg.shuffle,
                              seed=cfg.seed * 1000 + s)
    streams.append(grain.MapDataset.source(index_stream).map(_Tag(s)))
    weights.append(float(sc.weight))
    sources.append(ds.source(sc.split))
    label_maps.append(_label_map(ds, vocab))
  mixed = grain.MapDataset.mix(streams, weights) if len(streams) > 1 else streams[0]
  load = LoadAndTransform(tuple(sources), tuple(label_maps), cfg.image_size, cfg.crop, cfg.flip,
                          tuple(cfg.ultrasound_augment))
  local_batch = cfg.batch_size // process_count
  # Chunks of a local batch, process p taking every P-th from the p-th: global batch k = chunks kP..kP+P-1, rows
  # in process order, as jax.make_array_from_process_local_data assembles them. Lazy: only mine are loaded.
  chunks = mixed.random_map(load, seed=cfg.seed).batch(local_batch, drop_remainder=True)
  return Pipeline(chunks[process_index::process_count], vocab, local_batch, names, cfg.worker_count,
                  cfg.worker_buffer_size)


def image_means(pipe: Pipeline, n: int) -> dict[str, np.ndarray]:
  """The mean grey level (model range) and device name of this process's first `n` training images, as the model
  sees them (crops, flips, class balance): the model card's `image_mean`, where sampling starts from."""
  means, devices, names = [], [], pipe.vocab.get("device", [])
  for i in range(min(-(-n // pipe.local_batch_size), len(pipe.batches))):
    b = pipe.batches[i]
    means.append(b["image"].mean(axis=(1, 2, 3)))
    devices.extend(names[d] if d < len(names) else "" for d in b.get("device", np.zeros(len(b["image"]), int)))
  return {"means": np.concatenate(means)[:n] if means else np.zeros(0), "devices": np.array(devices[:n], object)}


def limit(indices: np.ndarray, n: int, *, seed: int) -> np.ndarray:
  """At most n of the selected records (0: all): the first n of a seeded permutation, so a smaller limit's
  records are a subset of a larger one's (data-scaling curves add data, never swap it)."""
  if n <= 0 or n >= len(indices):
    return indices
  return np.sort(np.random.default_rng(seed).permutation(indices)[:n])


@dataclasses.dataclass(frozen=True)
class _Tag:
  source: int

  def __call__(self, index: int) -> tuple[int, int]:
    return self.source, index


def _select(ds: reader.Dataset, labels: dict[str, np.ndarray], filters: Mapping, where: str,
            indices=()) -> np.ndarray:
  """Record indices whose labels pass the filters ({field: allowed names}; empty lists allow all), within
  `indices` when given (e.g. a k-shot subset)."""
  keep = np.ones(len(labels["pathology"]), bool)
  if len(indices):
    indices = np.asarray(indices, np.int64)
    if indices.min() < 0 or indices.max() >= len(keep):
      raise ValueError(f"{where}: record indices outside {ds.dir}'s split ({len(keep)} records)")
    keep &= np.isin(np.arange(len(keep)), indices)
  for field, allowed in filters.items():
    if allowed:
      unknown = sorted(set(allowed) - set(ds.vocab(field)))
      if unknown:
        raise ValueError(f"{where}{field}: {unknown} not in {ds.dir}'s {field} vocabulary {ds.vocab(field)}")
      keep &= np.isin(labels[field], [ds.vocab(field).index(a) for a in allowed])
  return np.flatnonzero(keep)


def _label_map(ds: reader.Dataset, vocab: dict[str, list[str]]) -> dict[str, np.ndarray]:
  """Per label field: the dataset's index -> the global vocabulary's index."""
  return {f: np.array([_global_index(vocab[f], name) for name in ds.vocab(f)], np.int32) for f in schema.LABEL_FIELDS}


def _global_index(names: list[str], name: str) -> int:
  return names.index(name) if name in names else 0  # a label outside the global vocabulary is the null row


def _process() -> tuple[int, int]:
  try:
    import jax
    return jax.process_index(), jax.process_count()
  except ImportError:
    return 0, 1



# ------------------------------------------------------------------------------------------------ evaluation

@dataclasses.dataclass(frozen=True)
class _EvalLoad(grain.MapTransform):
  load: LoadAndTransform

  def map(self, element):
    index, valid = element
    out = self.load.random_map((0, index), np.random.default_rng(0))  # centre crop, no flip: rng unused
    out["index"], out["valid"] = np.int32(index), np.bool_(valid)
    return out


def build_eval(path: str, split: str, *, image_size: int, batch_size: int, filters: Mapping | None = None,
               indices=(), device_vocab: tuple[str, ...] = (), process_index: int | None = None,
               process_count: int | None = None) -> Pipeline:
  """One deterministic pass over a split (centre crop, no flip, no augmentation): every selected example once,
  in record order. The last global batch is padded; `valid` marks real rows and `index` their record.
  Global batch k holds examples k*B..(k+1)*B-1, process p its slice p*B/P..(p+1)*B/P-1 of them."""
  if process_index is None or process_count is None:
    process_index, process_count = _process()
  if batch_size % process_count:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {process_count} processes")
  ds = reader.open_dataset(path)
  vocab = global_vocab({"eval": ds}, tuple(device_vocab))
  idx = _select(ds, scan_labels(ds, split), filters or {}, "filters.", indices)
  if not len(idx):
    raise ValueError(f"{ds.dir} split {split!r}: no examples selected (filters {dict(filters or {})})")
  pad = -len(idx) % batch_size
  items = np.concatenate([idx, np.full(pad, idx[-1])])
  valid = np.concatenate([np.ones(len(idx), bool), np.zeros(pad, bool)])
  local = batch_size // process_count
  mine = np.arange(len(items)).reshape(-1, process_count, local)[:, process_index].reshape(-1)
  load = LoadAndTransform((ds.source(split),), (_label_map(ds, vocab),), image_size, "center", False, ())
  elements = [(int(items[i]), bool(valid[i])) for i in mine]
  return Pipeline(grain.MapDataset.source(elements).map(_EvalLoad(load)).batch(local, drop_remainder=False),
                  vocab, local, (ds.name,))
