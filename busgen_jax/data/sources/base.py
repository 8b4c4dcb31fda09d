"""What every source shares: planned items, rejections, and careful image/mask loading.

A source works in two phases. `plan()` is cheap and deterministic (metadata only, run identically on every
host): it lists the inputs as `Item`s, with the labels needed to split them, plus inputs rejected up front.
`load(item)` runs in worker processes and returns an `Example` or raises `Reject` with a reason. Nothing is
dropped silently: every input ends up converted or rejected, and files that are not inputs are listed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from busgen_jax.data import schema


class Reject(Exception):
  """An input that cannot be converted; `code` is a stable category, the message says what is wrong."""

  def __init__(self, code: str, message: str):
    super().__init__(message)
    self.code = code
    self.message = message


@dataclasses.dataclass(frozen=True)
class Item:
  key: str                    # unique id of the example
  source_file: str            # path relative to the input root, for reports
  case_id: str
  pathology: str              # known at plan time, for stratified splits
  fold: int = -1
  split: str = ""              # the input's own split, if it has one
  payload: Any = None         # source-specific, picklable


@dataclasses.dataclass(frozen=True)
class Rejection:
  file: str
  code: str
  reason: str


@dataclasses.dataclass
class Plan:
  items: list[Item]
  vocab: schema.Vocab
  rejected: list[Rejection] = dataclasses.field(default_factory=list)   # inputs rejected at plan time
  duplicates: list[dict] = dataclasses.field(default_factory=list)      # byte-identical input groups
  ignored_files: list[dict] = dataclasses.field(default_factory=list)   # files seen that are not inputs
  warnings: list[dict] = dataclasses.field(default_factory=list)

  @property
  def num_inputs(self) -> int:
    return len(self.items) + len(self.rejected)


class Source(Protocol):
  name: str

  def plan(self) -> Plan: ...

  def load(self, item: Item) -> tuple[schema.Example, list[dict]]:
    """The example, plus warnings (dicts with "file" and "message") that do not reject it."""
    ...


# ----------------------------------------------------------------------------------------------------------
# Loading with clear reasons.

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_REJECTED_MODES = {
    "I;16": "16-bit grayscale image (expected 8-bit)",
    "I;16B": "16-bit grayscale image (expected 8-bit)",
    "I;16L": "16-bit grayscale image (expected 8-bit)",
    "I": "32-bit integer image (expected 8-bit)",
    "F": "floating-point image (expected 8-bit)",
    "RGBA": "RGBA image with an alpha channel (expected 8-bit grayscale or RGB of grayscale content)",
    "LA": "grayscale image with an alpha channel (expected 8-bit grayscale)",
    "CMYK": "CMYK image (expected 8-bit grayscale)",
    "P": "palette image (expected 8-bit grayscale)",
    "PA": "palette image with alpha (expected 8-bit grayscale)",
    "1": "1-bit image (expected 8-bit grayscale)",
    "YCbCr": "YCbCr image (expected 8-bit grayscale)",
}


def resolve_inside(root: Path, relative: str) -> Path:
  """`root/relative`, refusing absolute paths and paths that escape `root` (symlinks included)."""
  if not relative:
    raise Reject("bad_path", "empty file path")
  if os.path.isabs(relative):
    raise Reject("path_escapes_root", f"absolute path {relative!r} is not allowed; paths are relative to {root}")
  path = (root / relative).resolve()
  if not path.is_relative_to(root.resolve()):
    raise Reject("path_escapes_root", f"path {relative!r} escapes the input root {root}")
  return path


def file_sha256(path: Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def _open(path: Path, max_pixels: int, what: str) -> Image.Image:
  if not path.is_file():
    raise Reject("missing_file", f"{what} file {path} does not exist")
  try:
    im = Image.open(path)
  except Image.DecompressionBombError as e:
    raise Reject("too_large", f"{what} is absurdly large (decompression bomb guard): {e}") from None
  except Exception as e:  # PIL raises several types for non-images
    raise Reject("not_an_image", f"{what} is not a readable image: {type(e).__name__}: {e}") from None
  w, h = im.size
  if w * h > max_pixels:  # checked on the header, before decoding any pixel
    raise Reject("too_large", f"{what} is {w}x{h} = {w * h} pixels, above the limit of {max_pixels}")
  if w < 1 or h < 1:
    raise Reject("not_an_image", f"{what} has an empty size {w}x{h}")
  try:
    im.load()
  except Exception as e:
    raise Reject("truncated", f"{what} could not be decoded (truncated or corrupt): {type(e).__name__}: {e}") from None
  return im


COLOUR_MODES = ("luma", "reject")


def load_grayscale(path: Path, *, max_pixels: int, colour: str = "luma", name: str = "",
                   gray_tolerance: int = 8) -> tuple[np.ndarray, list[dict]]:
  """An 8-bit grayscale image as uint8 (H, W), and warnings. RGB of gray content is read as is (BUSI's files);
  RGB with colour content (annotation marks, Doppler) becomes luma with a warning (`colour="luma"`, what the
  official BUSGen's `convert("RGB")` keeps) or is rejected (`colour="reject"`). `name` is the file as reports show it."""
  if colour not in COLOUR_MODES:
    raise ValueError(f"image.colour must be one of {COLOUR_MODES}, got {colour!r}")
  im = _open(path, max_pixels, "image")
  if im.mode in _REJECTED_MODES:
    raise Reject("unsupported_mode", f"{_REJECTED_MODES[im.mode]}: mode {im.mode}")
  if im.mode == "L":
    return np.asarray(im, np.uint8), []
  if im.mode == "RGB":
    rgb = np.asarray(im, np.int16)
    coloured = float(np.mean((rgb.max(-1) - rgb.min(-1)) > gray_tolerance))
    warnings = []
    if coloured > 0.01:
      if colour == "reject":
        raise Reject("unsupported_mode", f"RGB image with colour content in {coloured:.1%} of its pixels (Doppler "
                                         "or annotations?); image.colour=luma converts it")
      warnings.append({"file": name or path.name, "code": "colour_to_luma",
                       "message": f"RGB image with colour content in {coloured:.1%} of its pixels (annotation "
                                  "marks or Doppler?) converted to luma"})
    return np.asarray(im.convert("L"), np.uint8), warnings
  raise Reject("unsupported_mode", f"unsupported image mode {im.mode}")


def load_mask(path: Path, *, shape: tuple[int, int], max_pixels: int) -> np.ndarray:
  """A binary lesion mask (bool (H, W)) that must match the image size."""
  im = _open(path, max_pixels, "mask")
  if im.size != (shape[1], shape[0]):
    raise Reject("mask_size_mismatch",
                 f"mask {path.name} is {im.size[0]}x{im.size[1]} but its image is {shape[1]}x{shape[0]}")
  if im.mode in ("1", "L", "P"):
    a = np.asarray(im.convert("L"))
  elif im.mode in ("RGB", "RGBA", "LA"):
    a = np.asarray(im.convert("L"))
  elif im.mode.startswith("I"):
    a = np.asarray(im, np.int64)
  else:
    raise Reject("unsupported_mode", f"mask {path.name} has unsupported mode {im.mode}")
  return a > (127 if a.max() > 1 else 0)


def boxes_from_mask(mask: np.ndarray, *, per_component: bool = True, min_pixels: int = 16) -> np.ndarray:
  """Normalised [x1, y1, x2, y2] boxes: one per connected component (>= min_pixels), or one around all."""
  from scipy import ndimage
  h, w = mask.shape
  if not mask.any():
    return np.zeros((0, 4), np.float32)
  if per_component:
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum_labels(mask, labels, np.arange(1, n + 1))
    slices = [s for s, size in zip(ndimage.find_objects(labels), sizes) if size >= min_pixels]
    if not slices:  # only specks: keep the largest rather than lose the lesion
      slices = [ndimage.find_objects(labels)[int(np.argmax(sizes))]]
  else:
    slices = ndimage.find_objects(mask.astype(np.int32))
  boxes = [(s[1].start / w, s[0].start / h, s[1].stop / w, s[0].stop / h) for s in slices]
  boxes.sort()
  return np.asarray(boxes, np.float32).reshape(-1, 4)


def check_boxes(boxes: np.ndarray, *, tol: float = 1e-6) -> np.ndarray:
  """Validates normalised boxes (x1 < x2, y1 < y2, inside [0, 1]); returns float32 (n, 4)."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  if not np.all(np.isfinite(b)):
    raise Reject("bad_box", f"box has non-finite coordinates: {b.tolist()}")
  if np.any(b < -tol) or np.any(b > 1 + tol):
    raise Reject("box_outside_image", f"box outside the image: {np.round(b, 4).tolist()}")
  if np.any(b[:, 2] <= b[:, 0]) or np.any(b[:, 3] <= b[:, 1]):
    raise Reject("bad_box", f"box with x2 <= x1 or y2 <= y1: {np.round(b, 4).tolist()}")
  return np.clip(b, 0, 1).astype(np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return float(inter / union) if union > 0 else 0.0


def check_lesion_mask(mask: np.ndarray | None, pathology: str, what: str) -> None:
  if pathology in schema.LESION_PATHOLOGIES and mask is not None and not mask.any():
    raise Reject("empty_mask", f"{what}: empty lesion mask on a {pathology} image")
  if pathology == "normal" and mask is not None and mask.any():
    raise Reject("label_conflict", f"{what}: non-empty lesion mask on an image labelled normal")
