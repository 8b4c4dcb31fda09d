"""Per-example transforms, in NumPy/PIL, run inside Grain workers (picklable, importable, no JAX).

BUSGen's semantics: a random square crop that keeps every lesion box inside (a centre square crop when no such
crop exists), a horizontal flip that flips the boxes too, a resize to the model size, images scaled to [-1, 1]
with the grayscale replicated to 3 channels, and lesion boxes rasterised into one condition channel exactly as
the official code does (../shared/reference/README.md): each valid box is ones on rows int(y1*H):int(y2*H),
columns int(x1*W):int(x2*W), truncating. Ultrasound-specific augmentations (gain, speckle, depth attenuation)
are offered for classifiers.

Boxes are normalised float [x1, y1, x2, y2] throughout; images uint8 (H, W) until `to_model_range`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def square_crop_window(height: int, width: int, boxes: np.ndarray, rng: np.random.Generator | None
                       ) -> tuple[int, int, int]:
  """(top, left, side) of a square crop of side min(H, W) containing every box; random among those if `rng`,
  else (or when none exists) the centre crop."""
  side = min(height, width)
  long_len, long_axis = (width, 1) if width >= height else (height, 0)
  centre = (long_len - side) // 2
  start = centre
  if rng is not None and long_len > side:
    lo, hi = 0, long_len - side
    if len(boxes):
      b = np.asarray(boxes, np.float64)
      first = b[:, 0 if long_axis == 1 else 1].min() * long_len   # leftmost/topmost box edge (pixels)
      last = b[:, 2 if long_axis == 1 else 3].max() * long_len    # rightmost/bottommost box edge
      lo, hi = max(lo, int(np.ceil(last)) - side), min(hi, int(np.floor(first)))
    start = int(rng.integers(lo, hi + 1)) if lo <= hi else centre
  return (start, 0, side) if long_axis == 0 else (0, start, side)


def crop(image: np.ndarray, boxes: np.ndarray, mask: np.ndarray | None, window: tuple[int, int, int]):
  """Crops image (and mask) to the window; boxes re-normalised to it and clipped (boxes left empty dropped)."""
  top, left, side = window
  h, w = image.shape[:2]
  image = image[top:top + side, left:left + side]
  mask = None if mask is None else mask[top:top + side, left:left + side]
  b = np.asarray(boxes, np.float64).reshape(-1, 4) * [w, h, w, h]
  b = (b - [left, top, left, top]) / side
  b = np.clip(b, 0, 1)
  b = b[(b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])]
  return image, b.astype(np.float32), mask


def hflip(image: np.ndarray, boxes: np.ndarray, mask: np.ndarray | None):
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  flipped = np.stack([1 - b[:, 2], b[:, 1], 1 - b[:, 0], b[:, 3]], axis=-1) if len(b) else b
  return image[:, ::-1], flipped.astype(np.float32), None if mask is None else mask[:, ::-1]


def resize(image: np.ndarray, size: int, *, is_mask: bool = False) -> np.ndarray:
  if image.shape[0] == size and image.shape[1] == size:
    return image
  method = Image.Resampling.NEAREST if is_mask else Image.Resampling.BILINEAR
  return np.asarray(Image.fromarray(image).resize((size, size), method))


# Boxes are stored as float32, so a box edge on a pixel boundary (k / W, exact in the official code's doubles)
# can land a hair below k and truncate to k - 1; this tolerance (in pixels) absorbs float32 rounding only.
_EDGE_EPS = 1e-4


def rasterize_boxes(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
  """The official box condition: float32 (H, W), ones inside each box (truncated indices), zeros elsewhere."""
  out = np.zeros((height, width), np.float32)
  for x1, y1, x2, y2 in np.asarray(boxes, np.float64).reshape(-1, 4):
    r0, r1 = int(y1 * height + _EDGE_EPS), int(y2 * height + _EDGE_EPS)
    c0, c1 = int(x1 * width + _EDGE_EPS), int(x2 * width + _EDGE_EPS)
    out[r0:r1, c0:c1] = 1.0
  return out


def to_model_range(image: np.ndarray, channels: int = 3) -> np.ndarray:
  """uint8 (H, W) -> float32 (H, W, channels) in [-1, 1] (grayscale replicated, as the official model takes)."""
  x = image.astype(np.float32) * (2 / 255) - 1
  return np.repeat(x[..., None], channels, axis=-1)


# --------------------------------------------------------------------------------- ultrasound augmentations

def gain(image: np.ndarray, rng: np.random.Generator, max_db: float = 3.0) -> np.ndarray:
  """Overall gain change: log-compressed display, so a dB gain is an offset (dynamic range assumed 60 dB)."""
  offset = rng.uniform(-max_db, max_db) * 255 / 60
  return np.clip(image.astype(np.float32) + offset, 0, 255).astype(np.uint8)


def speckle(image: np.ndarray, rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
  """Multiplicative Rayleigh-like speckle (unit mean), mixed in by `strength`."""
  rayleigh = np.hypot(rng.standard_normal(image.shape), rng.standard_normal(image.shape))
  factor = 1 + strength * (rayleigh / rayleigh.mean() - 1)
  return np.clip(image.astype(np.float32) * factor, 0, 255).astype(np.uint8)


def depth_attenuation(image: np.ndarray, rng: np.random.Generator, max_db: float = 6.0) -> np.ndarray:
  """A linear-in-depth gain error, as a mis-set time-gain compensation gives (top unchanged)."""
  slope_db = rng.uniform(-max_db, max_db)
  depth = np.linspace(0, 1, image.shape[0], dtype=np.float32)[:, None]
  return np.clip(image.astype(np.float32) + slope_db * depth * 255 / 60, 0, 255).astype(np.uint8)


US_AUGMENTATIONS = {"gain": gain, "speckle": speckle, "depth_attenuation": depth_attenuation}


def deform_mask(mask: np.ndarray, rng: np.random.Generator, c) -> np.ndarray:
  """A random affine deformation (rotation, scale, shift about the lesion centre) of a boolean mask."""
  h, w = mask.shape
  ys, xs = np.nonzero(mask)
  cy, cx = ys.mean(), xs.mean()
  a = np.deg2rad(rng.uniform(-c.max_rotate, c.max_rotate))
  s = rng.uniform(c.min_scale, c.max_scale)
  ty, tx = rng.uniform(-c.max_shift, c.max_shift, 2) * (h, w)
  # PIL maps output (x, y) to input: inverse of "scale+rotate about the centre, then shift".
  cos, sin = np.cos(a) / s, np.sin(a) / s
  ox, oy = cx + tx, cy + ty
  coeffs = (cos, sin, cx - cos * ox - sin * oy, -sin, cos, cy + sin * ox - cos * oy)
  out = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).transform((w, h), Image.Transform.AFFINE, coeffs,
                                                                         Image.Resampling.NEAREST)) > 127
  return out if out.any() else mask


def mask_box(mask: np.ndarray) -> np.ndarray:
  """(1, 4) the normalised box around a boolean mask's pixels."""
  ys, xs = np.nonzero(mask)
  h, w = mask.shape
  return np.array([[xs.min() / w, ys.min() / h, (xs.max() + 1) / w, (ys.max() + 1) / h]], np.float32)
