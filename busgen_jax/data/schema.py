"""The one record schema shared by every dataset in the project, real or generated.

Each example is a TFDS-serialised `tf.train.Example` (TFDS's own proto: no TensorFlow needed to write or read)
stored one per ArrayRecord record. Label vocabularies live in the dataset's `features.json` (ClassLabel
names), so an index means nothing without the dataset it came from.

Fields:
  id              unique example key within the dataset
  image           uint8 grayscale (H, W, 1), PNG-encoded, stored at the converter's configured size
  mask            uint8 (H, W, 1) lesion mask, 0/255; all zeros when `has_mask` is false
  has_mask        whether `mask` is a real segmentation
  boxes           float32 (n, 4) lesion boxes, normalised [x1, y1, x2, y2] in [0, 1]; n may be 0
  pathology       ClassLabel PATHOLOGY: index 0 "unknown" is the null condition, 1 benign, 2 malignant
                  (the official BUSGen indices), 3 normal
  device          ClassLabel, "unknown" first, then the dataset's devices
  birads          ClassLabel BIRADS ("unknown" first)
  histology       ClassLabel, "unknown" first, then the dataset's histologies
  case_id         patient/lesion case; views of one case never straddle splits
  source_dataset  e.g. "busbra", "busi", "phantom", or the generated dataset's name
  source_file     path relative to the input root ("" for procedural or generated data)
  sha256          sha256 of the source image file bytes (or of the stored PNG for procedural/generated data)
  split           split name the example was written to
  fold            the dataset's own cross-validation fold, -1 when it has none
  orig_height/orig_width   size of the source image before resizing
  gen_model, gen_step, gen_seed, gen_conditions   provenance of generated data ("", -1, -1, "" for real data;
                  gen_conditions is a JSON object)
"""

from __future__ import annotations

import dataclasses
import io
import json
from typing import Any, Mapping, Sequence

import numpy as np

SCHEMA_VERSION = "1.0.0"
UNKNOWN = "unknown"
PATHOLOGY = ("unknown", "benign", "malignant", "normal")
BIRADS = ("unknown", "0", "1", "2", "3", "4", "4A", "4B", "4C", "5", "6")
LESION_PATHOLOGIES = ("benign", "malignant")
LABEL_FIELDS = ("pathology", "device", "birads", "histology")  # the ClassLabel fields

_PATHOLOGY_SYNONYMS = {"b": "benign", "m": "malignant", "n": "normal", "": UNKNOWN, "none": UNKNOWN, "null": UNKNOWN}


def normalize_pathology(value: Any) -> str:
  """Maps a user's pathology label (name, synonym or official integer index) to PATHOLOGY; ValueError if unknown."""
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"unknown pathology {value!r}")
  if isinstance(value, (int, np.integer)) or (isinstance(value, str) and value.strip().isdigit()):
    i = int(value)
    if 0 <= i < len(PATHOLOGY):
      return PATHOLOGY[i]
    raise ValueError(f"unknown pathology index {i} (expected 0..{len(PATHOLOGY) - 1}: {', '.join(PATHOLOGY)})")
  if value is None:
    return UNKNOWN
  name = str(value).strip().lower()
  name = _PATHOLOGY_SYNONYMS.get(name, name)
  if name not in PATHOLOGY:
    raise ValueError(f"unknown pathology {value!r} (expected one of {', '.join(PATHOLOGY)})")
  return name


def normalize_birads(value: Any) -> str:
  if value is None:
    return UNKNOWN
  s = str(value).strip().upper().removeprefix("BI-RADS").removeprefix("BIRADS").strip()
  if s in ("", "UNKNOWN", "NAN", "NONE"):
    return UNKNOWN
  if s.endswith(".0"):  # "4.0" from a spreadsheet
    s = s[:-2]
  if s not in BIRADS:
    raise ValueError(f"unknown BI-RADS category {value!r} (expected one of {', '.join(BIRADS[1:])})")
  return s


@dataclasses.dataclass(frozen=True)
class Vocab:
  """Dataset-specific label vocabularies (PATHOLOGY and BIRADS are fixed project-wide)."""
  device: tuple[str, ...] = (UNKNOWN,)
  histology: tuple[str, ...] = (UNKNOWN,)

  @classmethod
  def from_values(cls, devices: Sequence[str] = (), histologies: Sequence[str] = ()) -> "Vocab":
    """Sorted, de-duplicated names with "unknown" first (index 0 is the null condition)."""
    def names(values):
      return (UNKNOWN,) + tuple(sorted({v for v in values if v and v != UNKNOWN}))
    return cls(device=names(devices), histology=names(histologies))

  def to_json(self) -> dict:
    return {"device": list(self.device), "histology": list(self.histology)}


def features(vocab: Vocab):
  """The TFDS FeaturesDict of the record schema for a dataset with these vocabularies."""
  import tensorflow_datasets as tfds  # imported lazily: planning and phantom generation do not need it
  F = tfds.features
  text, i64, i32 = F.Text(), F.Scalar(dtype=np.int64), F.Scalar(dtype=np.int32)
  return F.FeaturesDict({
      "id": F.Text(),
      "image": F.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
      "mask": F.Image(shape=(None, None, 1), dtype=np.uint8, encoding_format="png"),
      "has_mask": F.Scalar(dtype=np.bool_),
      "boxes": F.Tensor(shape=(None, 4), dtype=np.float32),
      "pathology": F.ClassLabel(names=list(PATHOLOGY)),
      "device": F.ClassLabel(names=list(vocab.device)),
      "birads": F.ClassLabel(names=list(BIRADS)),
      "histology": F.ClassLabel(names=list(vocab.histology)),
      "case_id": text,
      "source_dataset": text,
      "source_file": text,
      "sha256": text,
      "split": text,
      "fold": i32,
      "orig_height": i32,
      "orig_width": i32,
      "gen_model": text,
      "gen_step": i64,
      "gen_seed": i64,
      "gen_conditions": text,
  })


@dataclasses.dataclass
class Example:
  """One decoded example before encoding: what a source yields. Labels are vocabulary names."""
  id: str
  image: np.ndarray                      # uint8 (H, W)
  boxes: np.ndarray                      # float32 (n, 4) normalised x1, y1, x2, y2
  pathology: str = UNKNOWN
  mask: np.ndarray | None = None         # bool/uint8 (H, W) or None
  device: str = UNKNOWN
  birads: str = UNKNOWN
  histology: str = UNKNOWN
  case_id: str = ""
  source_dataset: str = ""
  source_file: str = ""
  sha256: str = ""
  fold: int = -1
  orig_height: int = 0
  orig_width: int = 0
  gen_model: str = ""
  gen_step: int = -1
  gen_seed: int = -1
  gen_conditions: Mapping[str, Any] | None = None


def encode_png(array: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=3)
  return buf.getvalue()


def to_feature_dict(ex: Example, split: str) -> dict:
  """The dict `features(vocab).serialize_example` takes: images as PNG bytes (no TensorFlow needed)."""
  h, w = ex.image.shape
  mask = np.zeros((h, w), np.uint8) if ex.mask is None else (np.asarray(ex.mask) > 0).astype(np.uint8) * 255
  return {
      "id": ex.id,
      "image": encode_png(ex.image),
      "mask": encode_png(mask),
      "has_mask": ex.mask is not None,
      "boxes": np.asarray(ex.boxes, np.float32).reshape(-1, 4),
      "pathology": ex.pathology,
      "device": ex.device,
      "birads": ex.birads,
      "histology": ex.histology,
      "case_id": ex.case_id,
      "source_dataset": ex.source_dataset,
      "source_file": ex.source_file,
      "sha256": ex.sha256,
      "split": split,
      "fold": ex.fold,
      "orig_height": ex.orig_height or h,
      "orig_width": ex.orig_width or w,
      "gen_model": ex.gen_model,
      "gen_step": ex.gen_step,
      "gen_seed": ex.gen_seed,
      "gen_conditions": json.dumps(dict(ex.gen_conditions), sort_keys=True) if ex.gen_conditions else "",
  }


class Serializer:
  """Example dict -> record bytes, deterministically: tf.Example's feature map is otherwise written in hash
  order, which differs between processes, and identical inputs must give identical shards."""

  def __init__(self, vocab: Vocab):
    from tensorflow_datasets.core import example_serializer
    self.features = features(vocab)
    self._serializer = example_serializer.ExampleSerializer(self.features.get_serialized_info())

  def __call__(self, feature_dict: dict) -> bytes:
    proto = self._serializer.get_tf_example(self.features.encode_example(feature_dict))
    return proto.SerializeToString(deterministic=True)
