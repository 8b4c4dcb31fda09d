"""Memorisation and privacy audit of a generated repository: `busgen-jax audit --config configs/audit_phantom.py`.

For every generated image, its nearest training *cases* (patients: several views of one case count once):

  pixel space  images compared after alignment. Candidates come from low-resolution descriptors of many views of
               each training image (flips x crops at several scales and positions); each candidate is then
               aligned to the generated image by normalised cross-correlation over flips, scales and every
               translation (FFT), at `pixel.resolution`. Distance sqrt(2 - 2 NCC): 0 = identical up to gain
               and offset, ~1.4 = unrelated.
  feature space  cosine distance of a domain encoder's features (a `classify` checkpoint; optional).

A generated image is a near-copy when its nearest training case is closer than real unseen patients get:
distance < `distance_factor` x the `holdout_quantile` of held-out (test-split) images' nearest distances, or its
distance ratio (nearest / second-nearest case) < min(`ratio`, that quantile of the held-out ratios): a copy sits
far closer to one case than to any other, a new image does not. The distance-to-closest-record test compares all
generated nearest distances with the held-out ones (AUC of "generated is closer"; 0.5 = no pull toward training).

Membership inference (denoising-loss attack, Carlini et al. 2023, Matsumoto et al. 2023): the diffusion model's
loss at fixed timesteps and noise is lower on images it was trained on; the attack's AUC (members = training split,
non-members = held-out split) with a case-level bootstrap CI. 0.5 means the loss does not tell them apart.

The verdict: safe to share when no image is flagged (or at most `max_flagged`), the distance test and the attack
stay below their AUC thresholds. `filter_dataset` writes a copy of the generated dataset without flagged images,
every removal accounted for in its conversion report.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from busgen_jax.data import reader
from busgen_jax.evaluate import metrics
from busgen_jax.evaluate.report import tstr_config


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.generated = ""              # the generated dataset directory (`busgen-jax sample` output)
  c.generated_split = "train"
  c.train = ""                  # the real dataset the diffusion model was trained on
  c.train_split = "train"
  c.holdout_split = "test"      # same dataset, cases the model never saw: calibration and attack non-members
  c.max_generated = 0           # audit at most this many generated images (0: all)
  c.max_holdout = 0             # at most this many held-out images for calibration (0: all)
  c.seed = 0
  c.encoder = ""                # `busgen-jax classify` <workdir>/best: feature-space neighbours ("" = pixels only)
  c.pixel = ml_collections.ConfigDict({
      "resolution": 48,         # alignment working size: the short side of training images, generated images
      "coarse_resolution": 16,  # candidate search descriptors
      "blur": 1.0,              # Gaussian blur (pixels at `resolution`) against speckle
      "scales": (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0),   # generated = crop of this share of a side
      "max_aspect": 1.5,        # training images are centre-cropped to this aspect ratio
      "candidates": 8,          # training cases aligned per generated image
      "batch": 32})             # generated images aligned at once
  c.thresholds = ml_collections.ConfigDict({
      "holdout_quantile": 0.01,
      "distance_factor": 0.5,
      "ratio": 0.8,
      "max_flagged": 0,         # more flagged images than this: not safe (filter them out, then re-audit)
      "dcr_auc": 0.6,           # distance-to-closest-record AUC above this (and CI above 0.5): not safe
      "mia_auc": 0.6})          # membership-inference AUC above this (and CI above 0.5): not safe
  c.mia = ml_collections.ConfigDict({
      "checkpoint": "",         # the diffusion model (`train` <workdir>/checkpoints or an adapted `merged`); "" = skip
      "which": "ema",
      "step": -1,
      "timesteps": (10, 25, 50, 100, 200),   # fixed timesteps (of T); low noise separates members best
      "repeats": 1,             # noise draws per timestep
      "max_per_group": 512,     # members and non-members each
      "batch_size": 32,
      "bootstrap": 1000})
  c.sheet_max = 24              # near-copies shown side by side
  c.tstr = tstr_config()        # the headline TSTR / TRTR ratio, from two `classify` runs
  c.filter_output = ""          # write the generated dataset without flagged images here ("" = no filtering)
  return c


# ------------------------------------------------------------------------------------------------ images

def read_images(path: str | Path, split: str, indices: Sequence[int] | None = None) -> dict:
  """uint8 grayscale images of a split's records (all or `indices`) with their case ids, lesion boxes and record
  indices."""
  ds = reader.open_dataset(path)
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
  if not limit or limit >= n:
    return np.arange(n)
  return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _resize(image: np.ndarray, h: int, w: int) -> np.ndarray:
  return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BOX), np.float32)


def _square(image: np.ndarray) -> np.ndarray:
  h, w = image.shape
  s = min(h, w)
  return image[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


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
      views.append(_resize(np.ascontiguousarray(im[t:t + s, l:l + s]), res, res))
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
  out[:hh, :ww] = _blur(_resize(image, hh, ww), c.blur)
  return out, (hh, ww)


@functools.partial(jax.jit, static_argnames=("ts",))
def _ncc_max(canvas: jax.Array, extent: jax.Array, template: jax.Array, ts: int):
  """Max normalised cross-correlation of each template (B, ts, ts) over every position inside its canvas's image
  (B, C, C; extent (B, 2) = its height and width): (max (B,), row (B,), col (B,))."""
  C = canvas.shape[-1]
  n = ts * ts
  canvas = canvas - jnp.mean(canvas, (1, 2), keepdims=True)   # NCC ignores offsets; float32 FFTs like small values
  t = template - template.mean((1, 2), keepdims=True)
  t = t / (jnp.sqrt(jnp.sum(t * t, (1, 2), keepdims=True)) + 1e-6)
  corr = jnp.fft.irfft2(jnp.fft.rfft2(canvas) * jnp.conj(jnp.fft.rfft2(t, s=(C, C))), s=(C, C))
  m = C - ts + 1
  corr = corr[:, :m, :m]

  def box(x):   # sums over every ts x ts window, from an integral image
    s = jnp.pad(jnp.cumsum(jnp.cumsum(x, 1), 2), ((0, 0), (1, 0), (1, 0)))
    return s[:, ts:, ts:] - s[:, :-ts, ts:] - s[:, ts:, :-ts] + s[:, :-ts, :-ts]

  s1, s2 = box(canvas), box(canvas * canvas)
  var = jnp.maximum(s2 - s1 * s1 / n, 0.0)
  ncc = corr / jnp.sqrt(var + n)      # + n: one grey level of noise floor, so flat regions do not match anything
  rows, cols = jnp.arange(m)[:, None], jnp.arange(m)[None, :]
  valid = (rows[None] <= extent[:, 0, None, None] - ts) & (cols[None] <= extent[:, 1, None, None] - ts)
  ncc = jnp.where(valid, ncc, -2.0).reshape(len(canvas), -1)
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
    q = _unit(np.stack([_resize(_square(im), self.c.coarse_resolution, self.c.coarse_resolution) for im in images]))
    sims = np.asarray(jnp.max((jnp.asarray(q) @ jnp.asarray(self.views).T).reshape(len(q), -1, self.nviews), -1))
    k = min(self.c.candidates, int(self.case_of.max()) + 1)
    return _top_cases(-sims, self.case_of, k)[1]

  def query(self, images: Sequence[np.ndarray]) -> Neighbours:
    c, out_d, out_i, out_a = self.c, [], [], []
    for b0 in range(0, len(images), c.batch):
      batch = images[b0:b0 + c.batch]
      cand = self.candidates(batch)                                # (Q, K)
      Q, K = cand.shape
      work = [_blur(_resize(_square(im), c.resolution, c.resolution), c.blur) for im in batch]
      pairs = [(q, k, f) for q in range(Q) for k in range(K) for f in (0, 1)]
      cv = [self.canvas(int(cand[q, k]), f) for q, k, f in pairs]
      canvases = jnp.asarray(np.stack([x[0] for x in cv]))
      extents = jnp.asarray(np.array([x[1] for x in cv], np.int32))
      best = np.full((Q, K), -2.0)
      align = np.zeros((Q, K, 4))
      for s in c.scales:
        ts = max(4, int(round(s * c.resolution)))
        tmpl = np.stack([np.asarray(Image.fromarray(w).resize((ts, ts), Image.Resampling.BILINEAR)) for w in work])
        tmpl = jnp.asarray(tmpl[[q for q, _, _ in pairs]])
        ncc, row, col = (np.asarray(a).reshape(Q, K, 2) for a in _ncc_max(canvases, extents, tmpl, ts=ts))
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


def membership_auc(member_losses: np.ndarray, nonmember_losses: np.ndarray, *, member_cases=None,
                   nonmember_cases=None, n_bootstrap: int = 1000, seed: int = 0) -> dict:
  """The denoising-loss attack's AUC (lower loss = "member"), with a case-level bootstrap CI."""
  y = np.r_[np.ones(len(member_losses)), np.zeros(len(nonmember_losses))]
  cases = None
  if member_cases is not None and nonmember_cases is not None:
    cases = np.r_[[f"m:{c}" for c in member_cases], [f"n:{c}" for c in nonmember_cases]]
  auc, lo, hi = metrics.bootstrap_ci(y, -np.r_[member_losses, nonmember_losses], cases=cases, n=n_bootstrap,
                                     seed=seed)
  return {"auc": auc, "auc_ci95": [lo, hi], "n_members": int(len(member_losses)),
          "n_nonmembers": int(len(nonmember_losses)), "mean_loss_members": float(np.mean(member_losses)),
          "mean_loss_nonmembers": float(np.mean(nonmember_losses))}


# ------------------------------------------------------------------------------------------------ the attack

def denoising_losses(model, path: str | Path, split: str, indices: Sequence[int], *, timesteps: Sequence[int],
                     repeats: int, batch_size: int, seed: int = 0, rows: Mapping[str, int] | None = None
                     ) -> np.ndarray:
  """Per-image eps-prediction MSE of a diffusion model (generate.Model) averaged over fixed timesteps and noise
  draws (noise seeded by record index, so a re-run gives the same losses). Conditions: the image's own labels
  and lesion box, mapped to the model's vocabularies by name (unknown names -> the null row); `rows` fixes the
  model row of some fields for every image instead (e.g. {"pathology": r}: scoring each image under each class
  makes the model a classifier, which says whether its label rows carry the classes apart)."""
  from flax import nnx
  from busgen_jax import parallel
  from busgen_jax.data import pipeline
  from busgen_jax.diffusion import objectives, schedule
  from busgen_jax.models import unet
  tc = model.train_config
  sched = schedule.Schedule.from_config(ml_collections.ConfigDict(tc.get("schedule") or
                                                                  schedule.default_config().to_dict()))
  prediction = (tc.get("objective") or {}).get("prediction", "eps")
  bad = [t for t in timesteps if not 0 <= t < sched.T]
  if bad:
    raise ValueError(f"mia.timesteps {bad} outside [0, {sched.T})")
  mesh = parallel.make_mesh({"data": -1}, jax.local_devices())
  batch_size = -(-batch_size // mesh.size) * mesh.size
  fixed = dict(rows or {})
  rows = parallel.rows(mesh)
  repl = parallel.replicated(mesh)
  graphdef = nnx.graphdef(unet.abstract(model.cfg))
  conds = tuple(model.cfg.conditions)
  draws = jnp.asarray([(t, r) for t in timesteps for r in range(repeats)], jnp.int32)
  key0 = jax.random.PRNGKey(seed)

  @functools.partial(jax.jit, in_shardings=(repl, rows, rows, rows), out_shardings=rows)
  def losses(params, x0, index, cond):
    net = nnx.merge(graphdef, params)

    def one(tr):
      t = jnp.full((x0.shape[0],), tr[0], jnp.int32)
      noise = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(jax.random.fold_in(key0, i), tr[1]),
                                                   x0.shape[1:]))(index)
      a = jnp.asarray(sched.sqrt_ab, jnp.float32)[t][:, None, None, None]
      s = jnp.asarray(sched.sqrt_1m_ab, jnp.float32)[t][:, None, None, None]
      xt = a * x0 + s * noise
      eps = objectives.eps_from_prediction(net(xt, t, cond), xt, t, sched, prediction)
      return jnp.mean(jnp.square(eps.astype(jnp.float32) - noise), axis=(1, 2, 3))

    return jnp.mean(jax.lax.map(one, draws), axis=0)

  params = jax.device_put(jax.tree.map(jnp.asarray, model.params), repl)
  pipe = pipeline.build_eval(str(path), split, image_size=model.image_size, batch_size=batch_size,
                             indices=np.asarray(indices), process_index=0, process_count=1)
  lut = {f: np.array([model.vocab[f].index(n) if n in model.vocab[f] else 0 for n in pipe.vocab[f]], np.int32)
         for f in ("pathology", "device")}
  out, idx = [], []
  it = iter(pipe)
  try:
    for b in it:
      cond = {k: np.full(len(b[k]), fixed[k], np.int32) if k in fixed else lut[k][b[k]] if k in lut else b[k]
              for k in conds}
      put = lambda a: jax.device_put(np.asarray(a), rows)
      loss = losses(params, put(b["image"]), put(b["index"]), jax.tree.map(put, cond))
      keep = np.asarray(b["valid"])
      out.append(np.asarray(loss)[keep])
      idx.append(np.asarray(b["index"])[keep])
  finally:
    it.close()
  order = np.argsort(np.concatenate(idx), kind="stable")   # back to the order of `indices` (sorted record order)
  return np.concatenate(out)[order]


# ------------------------------------------------------------------------------------------------ sheets

def near_copy_sheet(path: Path, rows: Sequence[dict], size: int = 96) -> Path:
  """Rows of (generated | aligned training match | |difference|), each captioned; rows: {"generated",
  "train" (uint8 images), "caption"}."""
  pad, cap = 4, 14
  sheet = Image.new("L", (3 * size + 4 * pad, max(1, len(rows)) * (size + cap + pad) + pad), 255)
  draw = ImageDraw.Draw(sheet)
  for r, row in enumerate(rows):
    g = np.asarray(Image.fromarray(_square(row["generated"])).resize((size, size), Image.Resampling.BILINEAR))
    t = np.asarray(Image.fromarray(row["train"]).resize((size, size), Image.Resampling.BILINEAR))
    diff = np.abs(g.astype(np.int16) - t.astype(np.int16)).astype(np.uint8)
    y = pad + r * (size + cap + pad)
    draw.text((pad, y), row["caption"], fill=0)
    for k, im in enumerate((g, t, diff)):
      sheet.paste(Image.fromarray(im), (pad + k * (size + pad), y + cap))
  path.parent.mkdir(parents=True, exist_ok=True)
  sheet.save(path)
  return path


# ------------------------------------------------------------------------------------------------ the filter

FLAGGED = "privacy_flagged"


def filter_dataset(src: str | Path, split: str, remove: Mapping[int, str], output: str | Path) -> Path:
  """A copy of dataset `src` without the records `remove` ({record index of `split`: reason}); other splits are
  copied whole. Records are copied byte for byte; the conversion report accounts for every record (removed ones
  as rejections with code "privacy_flagged" and the reason). Returns the new dataset directory."""
  from busgen_jax.data import convert
  ds = reader.open_dataset(src)
  if split not in ds.splits:
    raise KeyError(f"{ds.dir}: no split {split!r} (splits: {sorted(ds.splits)})")
  bad = [i for i in remove if not 0 <= int(i) < ds.splits[split]]
  if bad:
    raise ValueError(f"{ds.dir} split {split!r}: record indices {bad[:5]} out of range ({ds.splits[split]} records)")
  picks = {s: [(s, i) for i in range(n) if not (s == split and i in remove)] for s, n in ds.splits.items()}
  records = ds.records(split)
  rejections = []
  for i in sorted(remove):
    ex = ds.decode(records[int(i)], skip=("image", "mask"))
    rejections.append({"code": FLAGGED, "key": ex["id"], "index": int(i), "file": ex["source_file"],
                       "reason": remove[i]})
  out = convert.copy_records(ds, picks, output, fmt="filtered", rejections=rejections,
                             note={"filter": {"split": split, "removed": len(remove)}}, examples_per_shard=4096)
  logging.info("%s: %d records kept, %d removed (%s)", out, sum(map(len, picks.values())), len(remove), FLAGGED)
  return out


# ------------------------------------------------------------------------------------------------ the audit

def _space_report(nb_gen: Neighbours, nb_hold: Neighbours, c) -> dict:
  th = calibrate(nb_hold, c)
  flagged = flags(nb_gen, th)
  return {"thresholds": th, "flagged": flagged, "n_flagged": int(flagged.sum()),
          "dcr": dcr_test(nb_gen.d1, nb_hold.d1, seed=0),
          "generated_d1_median": float(np.median(nb_gen.d1)), "generated_ratio_min": float(nb_gen.ratio.min())}


def verdict(report: dict, c: ml_collections.ConfigDict) -> dict:
  """Safe to share by the configured thresholds? Every reason it is not, in words."""
  reasons, checks = [], []
  n = report["n_flagged"]
  checks.append(f"near-copies: {n} of {report['n_generated']} audited images flagged (allowed {c.max_flagged})")
  if n > c.max_flagged:
    reasons.append(f"{n} generated images are near-copies of training cases (allowed: {c.max_flagged}); remove "
                   "them with --config.filter_output=DIR and audit the filtered copy")
  for space, s in report["spaces"].items():
    d = s["dcr"]
    checks.append(f"{space} distance to closest record: AUC {d['auc']:.3f} [{d['auc_ci95'][0]:.3f}, "
                  f"{d['auc_ci95'][1]:.3f}] (threshold {c.dcr_auc})")
    if d["auc"] > c.dcr_auc and d["auc_ci95"][0] > 0.5:
      reasons.append(f"{space} space: generated images sit closer to training cases than new patients do "
                     f"(AUC {d['auc']:.3f} > {c.dcr_auc})")
  mia = report.get("membership_inference")
  if mia:
    checks.append(f"membership inference: AUC {mia['auc']:.3f} [{mia['auc_ci95'][0]:.3f}, {mia['auc_ci95'][1]:.3f}] "
                  f"(threshold {c.mia_auc})")
    if mia["auc"] > c.mia_auc and mia["auc_ci95"][0] > 0.5:
      reasons.append(f"the model's denoising loss reveals training membership (AUC {mia['auc']:.3f} > {c.mia_auc})")
  else:
    checks.append("membership inference: not run (no --config.mia.checkpoint)")
  if report["n_generated"] < report["n_generated_total"]:
    reasons.append(f"only {report['n_generated']} of {report['n_generated_total']} generated images were audited "
                   "(--config.max_generated): audit them all before sharing")
  return {"safe_to_share": not reasons, "reasons": reasons, "checks": checks}


def run(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """The audit: writes DIR/audit.json, audit.md, audit.html, audit_images.csv and near_copies.png (+ the
  filtered dataset with --config.filter_output). Returns the report."""
  from busgen_jax.evaluate import report as report_lib
  t0 = time.time()
  work = Path(workdir).expanduser()
  work.mkdir(parents=True, exist_ok=True)
  for name in ("generated", "train"):
    if not cfg[name]:
      raise ValueError(f"--config.{name} is required (a dataset directory)")
  n_total = reader.open_dataset(cfg.generated).splits.get(cfg.generated_split)
  if n_total is None:
    raise KeyError(f"{cfg.generated}: no split {cfg.generated_split!r}")
  gen = read_images(cfg.generated, cfg.generated_split, subsample(n_total, cfg.max_generated, cfg.seed))
  train = read_images(cfg.train, cfg.train_split)
  n_hold = reader.open_dataset(cfg.train).splits.get(cfg.holdout_split)
  if not n_hold:
    raise ValueError(f"{cfg.train}: the held-out split {cfg.holdout_split!r} is missing or empty; the audit "
                     "calibrates its thresholds on cases the model never saw")
  hold = read_images(cfg.train, cfg.holdout_split, subsample(n_hold, cfg.max_holdout, cfg.seed + 1))
  logging.info("audit: %d generated, %d training, %d held-out images", len(gen["images"]), len(train["images"]),
               len(hold["images"]))

  times = {"read": time.time() - t0}
  t = time.time()
  pixel = PixelIndex(train["images"], train["cases"], cfg.pixel)
  neighbours = {"pixel": (pixel.query(gen["images"]), pixel.query(hold["images"]))}
  times["pixel"] = time.time() - t
  t = time.time()
  encoder_name = None
  if cfg.encoder:
    from busgen_jax.evaluate import encoder as encoder_lib
    enc = encoder_lib.ClassifierEncoder(cfg.encoder)
    encoder_name = enc.name
    feats = {}
    for key, d in (("generated", gen), ("train", train), ("holdout", hold)):
      f = enc(d["dataset"], d["split"], indices=d["index"])
      if not np.array_equal(f["index"], d["index"]):
        raise AssertionError("encoder features are not in record order")
      feats[key] = f["features"]
    fi = FeatureIndex(feats["train"], train["cases"])
    neighbours["feature"] = (fi.query(feats["generated"]), fi.query(feats["holdout"]))
    times["feature"] = time.time() - t
  spaces = {name: _space_report(g, h, cfg.thresholds) for name, (g, h) in neighbours.items()}
  flagged = np.zeros(len(gen["images"]), bool)
  for s in spaces.values():
    flagged |= s["flagged"]

  mia = None
  t = time.time()
  if cfg.mia.checkpoint:
    from busgen_jax import generate
    g = generate.default_config()
    g.update(checkpoint=cfg.mia.checkpoint, which=cfg.mia.which, step=cfg.mia.step)
    model = generate.load_model(g)
    members = subsample(len(train["images"]), cfg.mia.max_per_group, cfg.seed + 2)
    nonmembers = subsample(n_hold, cfg.mia.max_per_group, cfg.seed + 3)
    kw = dict(timesteps=tuple(cfg.mia.timesteps), repeats=cfg.mia.repeats, batch_size=cfg.mia.batch_size,
              seed=cfg.seed)
    lm = denoising_losses(model, cfg.train, cfg.train_split, members, **kw)
    ln = denoising_losses(model, cfg.train, cfg.holdout_split, nonmembers, **kw)
    hold_cases = reader.open_dataset(cfg.train).case_ids(cfg.holdout_split, nonmembers)
    mia = {**membership_auc(lm, ln, member_cases=train["cases"][members], nonmember_cases=hold_cases,
                            n_bootstrap=cfg.mia.bootstrap, seed=cfg.seed),
           "model": f"{model.name}@{model.step}", "timesteps": list(cfg.mia.timesteps), "repeats": cfg.mia.repeats}
    times["membership_inference"] = time.time() - t

  # Per image: the evidence, and the reason for each flag.
  reasons = {}
  rows = [["record", "flagged"] + [f"{s}_{k}" for s in neighbours for k in ("d1", "ratio", "train_record")]]
  for j, rec in enumerate(gen["index"]):
    why = []
    row = [str(int(rec)), str(bool(flagged[j]))]
    for s, (nb, _) in neighbours.items():
      th = spaces[s]["thresholds"]
      t_rec = int(train["index"][nb.train[j, 0]])
      row += [f"{nb.d1[j]:.4f}", f"{nb.ratio[j]:.4f}", str(t_rec)]
      if spaces[s]["flagged"][j]:
        why.append(f"{s}: distance {nb.d1[j]:.3f} (threshold {th['distance']:.3f}), ratio {nb.ratio[j]:.3f} "
                   f"(threshold {th['ratio']:.3f}) to training record {t_rec} (case {train['cases'][nb.train[j, 0]]})")
    rows.append(row)
    if why:
      reasons[int(rec)] = "; ".join(why)
  (work / "audit_images.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")

  sheet = None
  order = np.argsort(neighbours["pixel"][0].d1)
  shown = [j for j in order if flagged[j]][:cfg.sheet_max]
  if shown:
    nb = neighbours["pixel"][0]
    sheet = near_copy_sheet(work / "near_copies.png", [
        {"generated": gen["images"][j], "train": pixel.aligned_crop(int(nb.train[j, 0]), nb.align[j], 96),
         "caption": f"gen {gen['index'][j]} ~ train {train['index'][nb.train[j, 0]]} d={nb.d1[j]:.2f} "
                    f"r={nb.ratio[j]:.2f}"} for j in shown])

  report = {
      "generated": {"dataset": gen["dataset"], "split": cfg.generated_split,
                    "name": reader.open_dataset(cfg.generated).name},
      "train": {"dataset": train["dataset"], "split": cfg.train_split, "images": len(train["images"]),
                "cases": int(pixel.case_of.max() + 1)},
      "holdout": {"split": cfg.holdout_split, "images": len(hold["images"])},
      "n_generated": len(gen["images"]), "n_generated_total": int(n_total), "n_flagged": int(flagged.sum()),
      "flagged": [{"record": r, "reason": why} for r, why in reasons.items()],
      "spaces": {s: {k: v for k, v in r.items() if k != "flagged"} for s, r in spaces.items()},
      "encoder": encoder_name, "membership_inference": mia, "config": cfg.to_dict(),
      "near_copy_sheet": str(sheet) if sheet else None,
  }
  report["verdict"] = verdict(report, cfg.thresholds)
  if cfg.filter_output:
    report["filtered_dataset"] = str(filter_dataset(cfg.generated, cfg.generated_split, reasons, cfg.filter_output))
  report["tstr"] = report_lib.tstr_headline(cfg.tstr)
  report["seconds"] = time.time() - t0
  report["seconds_by_part"] = times
  logging.info("audit: %.0fs (%s)", report["seconds"], ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
  write_report(work, report)
  return report


def write_report(work: Path, rep: dict) -> dict[str, Path]:
  from busgen_jax.evaluate import report as report_lib
  v = rep["verdict"]
  head = ("SAFE TO SHARE by the configured thresholds" if v["safe_to_share"] else
          "NOT SAFE TO SHARE: " + "; ".join(v["reasons"]))
  rows = [["space", "flagged", "distance threshold", "ratio threshold", "median NN distance (gen / held-out)",
           "DCR AUC [95% CI]"]]
  for s, r in rep["spaces"].items():
    d, th = r["dcr"], r["thresholds"]
    rows.append([s, str(r["n_flagged"]), f"{th['distance']:.3f}", f"{th['ratio']:.3f}",
                 f"{d['median_generated']:.3f} / {d['median_holdout']:.3f}",
                 f"{d['auc']:.3f} [{d['auc_ci95'][0]:.3f}, {d['auc_ci95'][1]:.3f}]"])
  mia = rep["membership_inference"]
  lines = [f"# Privacy audit: {rep['generated']['name']}", "", f"**{head}**", "",
           report_lib.tstr_line(rep.get("tstr")), "",
           f"{rep['n_generated']} generated images (of {rep['n_generated_total']}) against {rep['train']['images']} "
           f"training images ({rep['train']['cases']} cases) of `{rep['train']['dataset']}`; thresholds calibrated on "
           f"{rep['holdout']['images']} held-out images (split {rep['holdout']['split']}). Feature encoder: "
           f"{rep['encoder'] or 'none (pixel space only)'}.", "", report_lib.markdown_table(rows), ""]
  if mia:
    lines += [f"Membership inference ({mia['model']}, denoising loss at t in {mia['timesteps']}): AUC "
              f"{mia['auc']:.3f} [{mia['auc_ci95'][0]:.3f}, {mia['auc_ci95'][1]:.3f}] over {mia['n_members']} members "
              f"and {mia['n_nonmembers']} non-members (0.5 = no leakage).", ""]
  lines += ["Checks:", ""] + [f"- {c}" for c in v["checks"]] + [""]
  if rep["flagged"]:
    lines += ["Flagged images (record: reason):", ""] + [f"- {f['record']}: {f['reason']}" for f in rep["flagged"][:50]]
    if len(rep["flagged"]) > 50:
      lines.append(f"- ... {len(rep['flagged']) - 50} more in audit.json")
    lines.append("")
  if rep.get("near_copy_sheet"):
    lines += ["Near-copies (generated | aligned training match | difference):", "", "![near copies](near_copies.png)", ""]
  if rep.get("filtered_dataset"):
    lines += [f"Filtered copy without the flagged images: `{rep['filtered_dataset']}`.", ""]
  paths = {"json": work / "audit.json", "md": work / "audit.md", "html": work / "audit.html"}
  paths["json"].write_text(json.dumps(rep, indent=1, default=float))
  paths["md"].write_text("\n".join(lines))
  body = report_lib.markdown_to_html("\n".join(lines), work)
  paths["html"].write_text(report_lib.html_page("busgen-jax privacy audit", body))
  return paths
