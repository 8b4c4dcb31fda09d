"""Fidelity and diversity of generated images in a feature space: Fréchet distance, kernel (KID) distance,
improved precision and recall, each with a confidence interval and per condition.

Pure numpy/scipy on (n, d) feature arrays, so any encoder plugs in; the report names the encoder.

  FD         ||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^1/2) of Gaussians fitted to the two sets
             (Heusel et al. 2017). Biased in n: compare FDs only at equal set sizes. CI: bootstrap of both sets
             (centred, see bootstrap()).
  KID        unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3 (Binkowski et al. 2018), averaged
             over random subsets; unbiased, so ~0 for the same distribution at any n. CI: over the subsets.
  precision  share of generated samples inside the real manifold (the union of k-NN balls around real
             samples); recall: share of real samples inside the generated manifold (Kynkäänniemi et al. 2019).
             CI: bootstrap of both sets.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import scipy.linalg


def _check(real: np.ndarray, gen: np.ndarray, minimum: int = 2) -> tuple[np.ndarray, np.ndarray]:
  real, gen = np.asarray(real, np.float64), np.asarray(gen, np.float64)
  if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
    raise ValueError(f"features must be (n, d) arrays of the same d, got {real.shape} and {gen.shape}")
  if min(len(real), len(gen)) < minimum:
    raise ValueError(f"need at least {minimum} samples per set, got {len(real)} real and {len(gen)} generated")
  if not (np.isfinite(real).all() and np.isfinite(gen).all()):
    raise ValueError("features contain NaN or infinity")
  return real, gen


def gaussian_frechet(mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray) -> float:
  """Fréchet (2-Wasserstein) distance between N(mu1, cov1) and N(mu2, cov2)."""
  with np.errstate(all="ignore"):
    covmean = scipy.linalg.sqrtm(cov1 @ cov2)
  if not np.isfinite(covmean).all():   # singular product: regularise as pytorch-fid does
    eps = 1e-6 * np.eye(len(cov1))
    covmean = scipy.linalg.sqrtm((cov1 + eps) @ (cov2 + eps))
  covmean = np.real(covmean)
  d = float(np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean))
  return max(d, 0.0)


def frechet_distance(real: np.ndarray, gen: np.ndarray) -> float:
  real, gen = _check(real, gen)
  return gaussian_frechet(real.mean(0), np.cov(real, rowvar=False), gen.mean(0), np.cov(gen, rowvar=False))


def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3."""
  d = x.shape[1]
  kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
  m, n = len(x), len(y)
  return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
               - 2 * kxy.mean())


def kid(real: np.ndarray, gen: np.ndarray, *, subsets: int = 100, subset_size: int = 1000, seed: int = 0,
        level: float = 0.95) -> dict:
  """KID: mean unbiased MMD^2 over `subsets` random subsets (without replacement inside a subset), its
  standard deviation and a percentile interval over the subsets."""
  real, gen = _check(real, gen)
  rng = np.random.default_rng(seed)
  m = min(subset_size, len(real), len(gen))
  vals = np.array([_poly_mmd2(real[rng.choice(len(real), m, replace=False)],
                              gen[rng.choice(len(gen), m, replace=False)]) for _ in range(subsets)])
  lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
  return {"value": float(vals.mean()), "std": float(vals.std(ddof=1)) if subsets > 1 else 0.0,
          "ci": [float(lo), float(hi)], "subsets": subsets, "subset_size": m}


def _sq_dists(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  return np.maximum((a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T, 0.0)


def _kth_radii(x: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
  """Squared distance of each row to its k-th nearest other row."""
  out = np.empty(len(x))
  for i in range(0, len(x), chunk):
    d = _sq_dists(x[i:i + chunk], x)
    out[i:i + chunk] = np.partition(d, k, axis=1)[:, k]   # column 0 is the point itself (distance 0)
  return out


def _coverage(points: np.ndarray, centres: np.ndarray, radii: np.ndarray, chunk: int = 2048) -> np.ndarray:
  """Whether each point lies in any ball (centre, radius^2)."""
  return np.concatenate([(_sq_dists(points[i:i + chunk], centres) <= radii[None]).any(1)
                         for i in range(0, len(points), chunk)])


def precision_recall(real: np.ndarray, gen: np.ndarray, *, k: int = 3) -> dict:
  real, gen = _check(real, gen, minimum=k + 1)
  precision = _coverage(gen, real, _kth_radii(real, k)).mean()
  recall = _coverage(real, gen, _kth_radii(gen, k)).mean()
  return {"precision": float(precision), "recall": float(recall), "k": k}


def bootstrap(fn: Callable[[np.ndarray, np.ndarray], float], real: np.ndarray, gen: np.ndarray, *,
              samples: int = 200, seed: int = 0, level: float = 0.95,
              bounds: tuple[float, float] = (-np.inf, np.inf)) -> dict:
  """fn(real, gen) with an interval from resampling both sets with replacement.

  Resampling repeats rows, which by itself moves these statistics (FD up: fewer distinct points; precision and
  recall down: a repeated point's k-th neighbour is itself). So the bootstrap distribution is centred on the
  estimate (its shift is reported as `bootstrap_shift`) and only its spread makes the interval, clipped to the
  statistic's `bounds` (precision and recall live in [0, 1])."""
  rng = np.random.default_rng(seed)
  value = fn(real, gen)
  vals = np.array([fn(real[rng.integers(0, len(real), len(real))], gen[rng.integers(0, len(gen), len(gen))])
                   for _ in range(samples)])
  lo, hi = np.quantile(vals - vals.mean(), [(1 - level) / 2, (1 + level) / 2])
  return {"value": float(value), "ci": [float(max(value + lo, bounds[0])), float(min(value + hi, bounds[1]))],
          "bootstrap_shift": float(vals.mean() - value), "bootstrap_samples": samples}


def report(real: np.ndarray, gen: np.ndarray, *, encoder: str, k: int = 3, bootstrap_samples: int = 100,
           kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0, level: float = 0.95) -> dict:
  """Every metric with its interval for one pair of feature sets; `encoder` names the feature extractor."""
  real, gen = _check(real, gen, minimum=k + 1)
  pr = lambda which: (lambda r, g: precision_recall(r, g, k=k)[which])
  return {
      "encoder": encoder, "num_real": len(real), "num_generated": len(gen), "feature_dim": real.shape[1],
      "confidence_level": level,
      "fd": bootstrap(frechet_distance, real, gen, samples=bootstrap_samples, seed=seed, level=level, bounds=(0, np.inf)),
      "kid": kid(real, gen, subsets=kid_subsets, subset_size=kid_subset_size, seed=seed, level=level),
      "precision": bootstrap(pr("precision"), real, gen, samples=bootstrap_samples, seed=seed, level=level,
                             bounds=(0, 1)),
      "recall": bootstrap(pr("recall"), real, gen, samples=bootstrap_samples, seed=seed, level=level, bounds=(0, 1)),
  }


def per_condition(real: np.ndarray, real_labels: Sequence, gen: np.ndarray, gen_labels: Sequence, *,
                  encoder: str, min_count: int = 10, **kw) -> dict:
  """report() over all samples ("all") and per condition label (e.g. "malignant/LOGIQ-E9"); conditions with
  fewer than `min_count` samples on either side are listed as skipped, not silently dropped."""
  real_labels, gen_labels = np.asarray(real_labels), np.asarray(gen_labels)
  if len(real_labels) != len(real) or len(gen_labels) != len(gen):
    raise ValueError("one label per feature row is needed")
  out = {"all": report(real, gen, encoder=encoder, **kw), "conditions": {}, "skipped": {}}
  for c in sorted(set(real_labels.tolist()) | set(gen_labels.tolist())):
    r, g = real[real_labels == c], gen[gen_labels == c]
    if min(len(r), len(g)) < min_count:
      out["skipped"][str(c)] = {"num_real": len(r), "num_generated": len(g)}
      continue
    out["conditions"][str(c)] = report(r, g, encoder=encoder, **kw)
  return out
