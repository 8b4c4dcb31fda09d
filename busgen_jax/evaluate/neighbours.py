"""Nearest training cases of images, in pixel space (aligned) and feature space, and the statistics on them.

Pixel space: candidates come from low-resolution descriptors of many views of each training image (flips x
crops at several scales and positions); each candidate is then aligned to the query by normalised
cross-correlation over flips, scales and every translation (FFT). Distance sqrt(2 - 2 NCC): 0 = identical up to
gain and offset, ~1.4 = unrelated. Feature space: cosine distance of a domain encoder's features. Used by the
audit (evaluate/privacy.py).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from busgen_jax import console
from busgen_jax.data import reader
from busgen_jax.evaluate import metrics


# ------------------------------------------------------------------------------------------------ images

def _unit(x: np.ndarray) -> np.ndarray:
  x = x.reshape(len(x), -1) if x.ndim > 2 else x.reshape(1, -1)
  x = x - x.mean(1, keepdims=True)
  return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def _windows(h: int, w: int, scales: Sequence[float], grid: int = 3):
  """Square crop windows (top, left, side): each scale of the short side at grid x grid positions."""
  out = set()
  for s in scales:
    side = max(1, int(round(s * min(h, w))))
    for t in np.linspace(0, h - side, grid).round().astype(int):
      for l in np.linspace(0, w - side, grid).round().astype(int):
        out.add((int(t), int(l), side))
  return sorted(out)


COARSE_SCALES = (1.0, 0.8, 0.65)


def coarse_views(image: np.ndarray, res: int) -> np.ndarray:
  """(V, res*res) unit descriptors of flips x crop windows: the candidate search's view of a training image."""
  views = []
  for im in (image, image[:, ::-1]):
    for t, l, s in _windows(*im.shape, COARSE_SCALES):
      views.append(reader.resize(np.ascontiguousarray(im[t:t + s, l:l + s]), res, res))
  return _unit(np.stack(views))


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
  if not sigma:
    return x
  from scipy import ndimage
  return ndimage.gaussian_filter(x, sigma, mode="nearest")


def _cap_aspect(image: np.ndarray, a: float) -> np.ndarray:
  """Centre-crops the long side so that long / short <= a."""
  h, w = image.shape
  if max(h, w) <= a * min(h, w):
    return image
  long = int(a * min(h, w))
  return image[(h - long) // 2:(h - long) // 2 + long] if h > w else image[:, (w - long) // 2:(w - long) // 2 + long]


def _canvas(image: np.ndarray, c) -> tuple[np.ndarray, tuple[int, int]]:
  """A training image at the working resolution (short side = resolution, aspect capped), blurred, placed top-left
  on a square canvas; returns (canvas, (h, w) of the image on it)."""
  r, a = c.resolution, c.max_aspect
  image = _cap_aspect(image, a)
  h, w = image.shape
  f = r / min(h, w)
  hh, ww = max(r, int(round(h * f))), max(r, int(round(w * f)))
  side = int(math.ceil(a * r))
  out = np.zeros((side, side), np.float32)
  out[:hh, :ww] = _blur(reader.resize(image, hh, ww), c.blur)
  return out, (hh, ww)


@jax.jit
def _canvas_transforms(canvas: jax.Array):
  """What every template scale reuses of a batch of canvases (B, C, C): the zero-mean canvases' 2-D FFT and the
  integral images of their values and squares (B, C + 1, C + 1)."""
  canvas = canvas - jnp.mean(canvas, (1, 2), keepdims=True)   # NCC ignores offsets; float32 FFTs like small values
  integral = lambda x: jnp.pad(jnp.cumsum(jnp.cumsum(x, 1), 2), ((0, 0), (1, 0), (1, 0)))
  return jnp.fft.rfft2(canvas), integral(canvas), integral(canvas * canvas)


@functools.partial(jax.jit, static_argnames=("ts",))
def _ncc_max(transforms, extent: jax.Array, template: jax.Array, owner: jax.Array, ts: int):
  """Max normalised cross-correlation of templates (T, ts, ts) over every position inside canvases (their
  `_canvas_transforms`; extent (B, 2) = each image's height and width); canvas b is searched for template
  owner[b], whose FFT is taken once: (max (B,), row (B,), col (B,))."""
  canvas_fft, integral, integral_sq = transforms
  C = integral.shape[-1] - 1
  n = ts * ts
  t = template - template.mean((1, 2), keepdims=True)
  t = t / (jnp.sqrt(jnp.sum(t * t, (1, 2), keepdims=True)) + 1e-6)
  corr = jnp.fft.irfft2(canvas_fft * jnp.conj(jnp.fft.rfft2(t, s=(C, C)))[owner], s=(C, C))
  m = C - ts + 1
  corr = corr[:, :m, :m]
  box = lambda i: i[:, ts:, ts:] - i[:, :-ts, ts:] - i[:, ts:, :-ts] + i[:, :-ts, :-ts]   # every ts x ts window
  s1, s2 = box(integral), box(integral_sq)
  var = jnp.maximum(s2 - s1 * s1 / n, 0.0)
  ncc = corr / jnp.sqrt(var + n)      # + n: one grey level of noise floor, so flat regions do not match anything
  rows, cols = jnp.arange(m)[:, None], jnp.arange(m)[None, :]
  valid = (rows[None] <= extent[:, 0, None, None] - ts) & (cols[None] <= extent[:, 1, None, None] - ts)
  ncc = jnp.where(valid, ncc, -2.0).reshape(len(extent), -1)
  best = jnp.argmax(ncc, axis=1)
  return jnp.max(ncc, axis=1), best // m, best % m


# ------------------------------------------------------------------------------------------------ nearest cases

@dataclasses.dataclass
class Neighbours:
  """Per query: its K nearest training cases, nearest first. `train` is the best-matching training image of each
  case (an index into the training images); `align` (pixel space) is (flip, scale, top, left) of that match."""
  distance: np.ndarray    # (Q, K)
  train: np.ndarray       # (Q, K)
  align: np.ndarray | None = None   # (Q, 4): the nearest case's alignment

  @property
  def d1(self) -> np.ndarray:
    return self.distance[:, 0]

  @property
  def ratio(self) -> np.ndarray:
    return self.distance[:, 0] / np.maximum(self.distance[:, 1], 1e-6)


def _top_cases(dist: np.ndarray, case_of: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(Q, N) distances to training images -> the k nearest distinct cases: (distances (Q, k), image (Q, k))."""
  order = np.argsort(dist, axis=1, kind="stable")
  d_out, i_out = np.full((len(dist), k), np.inf), np.zeros((len(dist), k), np.int64)
  for q in range(len(dist)):
    seen = set()
    for i in order[q]:
      c = case_of[i]
      if c in seen:
        continue
      seen.add(c)
      d_out[q, len(seen) - 1], i_out[q, len(seen) - 1] = dist[q, i], i
      if len(seen) == k:
        break
  return d_out, i_out


class FeatureIndex:
  """Training features (n, d): cosine distances, nearest cases."""

  def __init__(self, features: np.ndarray, cases: Sequence[str]):
    self.f = _unit_rows(features)
    self.case_of = np.unique(np.asarray(cases), return_inverse=True)[1]
    if self.case_of.max(initial=-1) < 1:
      raise ValueError("the audit needs at least two training cases")

  def query(self, features: np.ndarray, k: int = 2) -> Neighbours:
    q = _unit_rows(features)
    d = np.sqrt(np.maximum(2 - 2 * (q @ self.f.T), 0))
    return Neighbours(*_top_cases(d, self.case_of, k))


def _unit_rows(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)


class PixelIndex:
  """Training images for aligned pixel-space search: coarse view descriptors for candidates, working-resolution
  canvases for the alignment."""

  def __init__(self, images: Sequence[np.ndarray], cases: Sequence[str], c: ml_collections.ConfigDict):
    self.c = c
    self.case_of = np.unique(np.asarray(cases), return_inverse=True)[1]
    if self.case_of.max(initial=-1) < 1:
      raise ValueError("the audit needs at least two training cases")
    views = [coarse_views(im, c.coarse_resolution) for im in images]
    self.nviews = max(len(v) for v in views)
    # pad every image to the same number of views (repeat its first) so scores reshape to (N, V)
    self.views = np.concatenate([np.concatenate([v, np.repeat(v[:1], self.nviews - len(v), 0)]) for v in views])
    self.images = list(images)
    self._canvases: dict[tuple[int, int], tuple[np.ndarray, tuple[int, int]]] = {}

  def canvas(self, i: int, flip: int):
    key = (i, flip)
    if key not in self._canvases:
      im = self.images[i]
      self._canvases[key] = _canvas(np.ascontiguousarray(im[:, ::-1] if flip else im), self.c)
    return self._canvases[key]

  def candidates(self, images: Sequence[np.ndarray]) -> np.ndarray:
    r = self.c.coarse_resolution
    q = _unit(np.stack([reader.resize(reader.centre_square(im), r, r) for im in images]))
    sims = np.asarray(jnp.max((jnp.asarray(q) @ jnp.asarray(self.views).T).reshape(len(q), -1, self.nviews), -1))
    k = min(self.c.candidates, int(self.case_of.max()) + 1)
    return _top_cases(-sims, self.case_of, k)[1]

  def query(self, images: Sequence[np.ndarray], desc: str = "pixel search") -> Neighbours:
    c, out_d, out_i, out_a = self.c, [], [], []
    bar = console.bar(len(images), desc, unit="image")
    for b0 in range(0, len(images), c.batch):
      batch = images[b0:b0 + c.batch]
      cand = self.candidates(batch)                                # (Q, K)
      Q, K = cand.shape
      work = [_blur(reader.resize(reader.centre_square(im), c.resolution, c.resolution), c.blur) for im in batch]
      pairs = [(q, k, f) for q in range(Q) for k in range(K) for f in (0, 1)]
      cv = [self.canvas(int(cand[q, k]), f) for q, k, f in pairs]
      transforms = _canvas_transforms(jnp.asarray(np.stack([x[0] for x in cv])))   # once for every scale
      extents = jnp.asarray(np.array([x[1] for x in cv], np.int32))
      owner = jnp.asarray(np.array([q for q, _, _ in pairs], np.int32))
      best = np.full((Q, K), -2.0)
      align = np.zeros((Q, K, 4))
      for s in c.scales:
        ts = max(4, int(round(s * c.resolution)))
        tmpl = np.stack([np.asarray(Image.fromarray(w).resize((ts, ts), Image.Resampling.BILINEAR)) for w in work])
        ncc, row, col = (np.asarray(a).reshape(Q, K, 2)
                         for a in _ncc_max(transforms, extents, jnp.asarray(tmpl), owner, ts=ts))
        f = np.argmax(ncc, axis=2)                                  # the better flip of each candidate
        pick = lambda a: np.take_along_axis(a, f[..., None], 2)[..., 0]
        better = pick(ncc) > best
        best = np.where(better, pick(ncc), best)
        align = np.where(better[..., None], np.stack([f, np.full(f.shape, s), pick(row), pick(col)], -1).astype(float), align)
      d = np.sqrt(np.maximum(2 - 2 * best, 0))
      order = np.argsort(d, axis=1, kind="stable")
      take = lambda a: np.take_along_axis(a, order, 1)
      out_d.append(take(d))
      out_i.append(take(cand))
      out_a.append(align[np.arange(Q), order[:, 0]])
      bar.update(Q)
    bar.close()
    return Neighbours(np.concatenate(out_d), np.concatenate(out_i), np.concatenate(out_a))

  def aligned_crop(self, i: int, align: Sequence[float], size: int) -> np.ndarray:
    """The training image region the alignment matched, as a size x size uint8 image (for side-by-side sheets)."""
    flip, s, top, left = align
    _, (hh, ww) = self.canvas(i, int(flip))
    im = _cap_aspect(self.images[i][:, ::-1] if flip else self.images[i], self.c.max_aspect)
    f = im.shape[0] / hh
    ts = max(4, int(round(s * self.c.resolution)))
    y0, x0, side = int(top * f), int(left * f), max(1, int(round(ts * f)))
    crop = np.ascontiguousarray(im[y0:y0 + side, x0:x0 + side])
    return np.asarray(Image.fromarray(crop).resize((size, size), Image.Resampling.BILINEAR))


# ------------------------------------------------------------------------------------------------ the tests

def calibrate(holdout: Neighbours, c: ml_collections.ConfigDict) -> dict:
  """Thresholds from held-out real images (new patients): how close to a training case they get."""
  q = c.holdout_quantile
  return {"distance": float(c.distance_factor * np.quantile(holdout.d1, q)),
          "ratio": float(min(c.ratio, np.quantile(holdout.ratio, q))),
          "holdout_d1_quantile": float(np.quantile(holdout.d1, q)), "holdout_ratio_quantile":
          float(np.quantile(holdout.ratio, q)), "holdout_d1_median": float(np.median(holdout.d1)),
          "n_holdout": int(len(holdout.d1))}


def flags(nb: Neighbours, thresholds: Mapping) -> np.ndarray:
  return (nb.d1 < thresholds["distance"]) | (nb.ratio < thresholds["ratio"])


def dcr_test(d_generated: np.ndarray, d_holdout: np.ndarray, *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
  """Distance to closest record: AUC that a generated image is closer to training than a held-out one is
  (0.5: generation does not pull toward training data), its bootstrap CI and a one-sided Mann-Whitney p."""
  from scipy import stats
  y = np.r_[np.ones(len(d_generated)), np.zeros(len(d_holdout))]
  auc, lo, hi = metrics.bootstrap_ci(y, -np.r_[d_generated, d_holdout], n=n_bootstrap, seed=seed)
  p = float(stats.mannwhitneyu(d_generated, d_holdout, alternative="less").pvalue)
  return {"auc": auc, "auc_ci95": [lo, hi], "p_value": p, "median_generated": float(np.median(d_generated)),
          "median_holdout": float(np.median(d_holdout))}
