"""Our reader of record-schema datasets: random access, decoded to NumPy, no TensorFlow imported.

The same directory is also readable as `tfds.builder_from_directory(dir).as_data_source(split)`,
`tfds.data_source(name, data_dir=<output>)`, and raw with `grain.ArrayRecordDataSource(ds.files(split))`
(records are TFDS-serialised tf.train.Example; decode with `ds.decode(record)`).

    ds = busgen_jax.data.reader.open_dataset("/data/busbra")   # data_dir, <name>/ or <name>/<version>/
    src = ds.source("train")           # len(src), src[i] -> dict of NumPy arrays / str
    ds.vocab("device")                 # the dataset's own label names
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

TEXT_FIELDS = ("id", "case_id", "source_dataset", "source_file", "sha256", "split", "gen_model", "gen_conditions")


def find_dataset_dir(path: str | Path) -> Path:
  """The folder holding dataset_info.json: `path` itself, or the single dataset/version below it."""
  from busgen_jax import paths
  p = paths.local(path)
  if (p / "dataset_info.json").is_file():
    return p
  dirs = sorted({q.parent for pattern in ("*/dataset_info.json", "*/*/dataset_info.json") for q in p.glob(pattern)})
  if len(dirs) == 1:
    return dirs[0]
  if not dirs:
    raise FileNotFoundError(f"{p}: no dataset here (no dataset_info.json in it or one or two levels below)")
  raise ValueError(f"{p}: several datasets below ({', '.join(str(d.relative_to(p)) for d in dirs)}); name one")


class Dataset:
  """A converted or generated dataset directory."""

  def __init__(self, path: str | Path):
    self.dir = find_dataset_dir(path)
    self.info = json.loads((self.dir / "dataset_info.json").read_text())
    self.name = self.info["name"]
    self._splits = {s["name"]: [int(n) for n in s.get("shardLengths", [])] for s in self.info.get("splits", [])}

  @property
  def splits(self) -> dict[str, int]:
    return {name: sum(lengths) for name, lengths in self._splits.items()}

  @functools.cached_property
  def features(self):
    import tensorflow_datasets as tfds  # tfds itself does not import TensorFlow for this
    return tfds.features.FeatureConnector.from_config(str(self.dir))

  def vocab(self, field: str) -> list[str]:
    """Label names of a ClassLabel field (pathology, device, birads, histology)."""
    return list(self.features[field].names)

  @property
  def report(self) -> dict[str, Any]:
    p = self.dir / "conversion_report.json"
    if not p.exists():
      p = self.dir / "generation_report.json"
    return json.loads(p.read_text()) if p.exists() else {}

  def shard_lengths(self, split: str) -> list[int]:
    """Records per shard file of a split, in file order."""
    if split not in self._splits:
      raise KeyError(f"{self.dir}: no split {split!r} (splits: {sorted(self._splits)})")
    return list(self._splits[split])

  def files(self, split: str) -> list[str]:
    if split not in self._splits:
      raise KeyError(f"{self.dir}: no split {split!r} (splits: {sorted(self._splits)})")
    n = len(self._splits[split])
    return [str(self.dir / f"{self.name}-{split}.array_record-{i:05d}-of-{n:05d}") for i in range(n)]

  def decode(self, record: bytes, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """One record as numpy; fields in `skip` (e.g. "image", "mask") stay undecoded bytes, which makes
    label and box scans cheap."""
    decoders = None
    if skip:
      import tensorflow_datasets as tfds
      decoders = {k: tfds.decode.SkipDecoding() for k in skip}
    ex = self.features.deserialize_example_np(record, decoders=decoders)
    out = dict(ex)
    for k in TEXT_FIELDS:
      if isinstance(out.get(k), bytes):
        out[k] = out[k].decode("utf-8")
    out["boxes"] = np.asarray(out["boxes"], np.float32).reshape(-1, 4)
    return out

  def case_ids(self, split: str, indices=None) -> np.ndarray:
    """Case ids of a split's records (all, or `indices`), images not decoded; "#<index>" where a record has
    none, so such records count as their own case."""
    records = self.records(split)
    indices = range(len(records)) if indices is None else indices
    return np.asarray([self.decode(records[int(i)], skip=("image", "mask"))["case_id"] or f"#{int(i)}"
                       for i in indices])

  def records(self, split: str) -> "Records | list":
    """Raw records of a split (bytes), random access; shards left empty by rejections are skipped."""
    kept = [(f, n) for f, n in zip(self.files(split), self._splits[split]) if n > 0]
    return Records([f for f, _ in kept], [n for _, n in kept]) if kept else []

  def source(self, split: str) -> "RecordSource":
    return RecordSource(str(self.dir), split)


class Records:
  """A split's raw records over its shard files, random access. A missing, truncated or corrupted shard, or one
  holding a different number of records than dataset_info.json says, is an error naming the file."""

  def __init__(self, files: list[str], lengths: list[int]):
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    self.files, self._ends = files, np.cumsum(lengths)
    try:
      self._source = ArrayRecordDataSource(files)
    except Exception as e:  # noqa: BLE001 - find the file that fails on its own, keep the cause
      raise IOError(f"{self._culprit(files)}: cannot open the shard ({type(e).__name__}: "
                    f"{e or 'truncated or corrupted'}); {_REDO}") from e
    if len(self._source) != self._ends[-1]:
      counts = [len(ArrayRecordDataSource([f])) for f in files]
      bad = [(f, c, n) for f, c, n in zip(files, counts, lengths) if c != n]
      raise IOError("; ".join(f"{f}: holds {c} records, dataset_info.json says {n}" for f, c, n in bad) + f"; {_REDO}")

  @staticmethod
  def _culprit(files: list[str]) -> str:
    from array_record.python.array_record_data_source import ArrayRecordDataSource
    for f in files:
      try:
        ArrayRecordDataSource([f])
      except Exception:  # noqa: BLE001
        return f
    return ", ".join(files)

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> bytes:
    try:
      return self._source[index]
    except Exception as e:  # noqa: BLE001 - name the shard and record, keep the cause
      k = int(np.searchsorted(self._ends, index, side="right"))
      if k >= len(self.files):
        raise IndexError(f"record {index} of {len(self)}") from e
      local = index - (int(self._ends[k - 1]) if k else 0)
      raise IOError(f"{self.files[k]}: cannot read record {local} ({type(e).__name__}: "
                    f"{e or 'truncated or corrupted'}); {_REDO}") from e


_REDO = ("the shard is damaged: delete it and run the same `busgen-jax convert` (or `sample`) command again, "
         "which rewrites only missing shards")


class RecordSource:
  """A random-access source of decoded examples (Grain's RandomAccessDataSource protocol); picklable."""

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir = dataset_dir
    self.split = split
    self._dataset = None
    self._records = None
    self._len = Dataset(dataset_dir).splits[split]

  def _open(self):
    if self._records is None:
      self._dataset = Dataset(self.dataset_dir)
      self._records = self._dataset.records(self.split)
    return self._records

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._len:
      raise IndexError(f"index {index} out of range for split {self.split!r} of {self._len}")
    records = self._open()
    return self._dataset.decode(records[index])

  def __getstate__(self):
    return {"dataset_dir": self.dataset_dir, "split": self.split, "_len": self._len}

  def __setstate__(self, state):
    self.__dict__.update(state, _dataset=None, _records=None)

  def __repr__(self):
    return f"RecordSource({self.dataset_dir!r}, {self.split!r}, len={self._len})"


def open_dataset(path: str | Path) -> Dataset:
  if not str(path).strip():   # never the current directory by accident
    raise ValueError("no dataset path given (an empty path): pass the converted dataset's directory")
  return Dataset(path)


# ------------------------------------------------------------------------------------------------ images
# The one image reader of the evaluation stages (audit, quality, sample's protection bank): uint8 arrays as
# stored, with the labels they are matched on; the Grain pipeline is the reader for training.

def read_images(path: str | Path, split: str, indices=None) -> dict:
  """uint8 grayscale images of a split's records (all or `indices`) with their case ids, lesion boxes and record
  indices."""
  import concurrent.futures
  ds = open_dataset(path)
  records = ds.records(split)
  indices = np.arange(len(records)) if indices is None else np.asarray(indices, np.int64)

  def one(i):
    ex = ds.decode(records[int(i)], skip=("mask",))
    return ex["image"][..., 0], ex["case_id"] or f"#{int(i)}", ex["boxes"]

  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    out = list(pool.map(one, indices))
  return {"images": [o[0] for o in out], "cases": np.asarray([o[1] for o in out]), "boxes": [o[2] for o in out],
          "index": indices, "dataset": str(ds.dir), "split": split}


def subsample(n: int, limit: int, seed: int) -> np.ndarray:
  """Sorted indices of at most `limit` of n items (all when limit is 0), seeded."""
  if not limit or limit >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  """float32 box-filtered resize of a 2-D uint8 image (area averaging: no aliasing when shrinking)."""
  from PIL import Image
  return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BOX), np.float32)


def centre_square(image: np.ndarray) -> np.ndarray:
  """The largest centred square of a 2-D image: what a generated (square) image corresponds to."""
  h, w = image.shape
  s = min(h, w)
  return image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]

