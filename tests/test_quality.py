"""Fidelity and diversity metrics against distributions whose answers are known."""

import numpy as np
import pytest

from busgen_jax.evaluate import quality


def _fd_by_eigh(mu1, c1, mu2, c2):
  # Tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2): the symmetric form, computed independently with eigh.
  w, v = np.linalg.eigh(c1)
  r = v @ np.diag(np.sqrt(np.maximum(w, 0))) @ v.T
  inner = np.linalg.eigvalsh(r @ c2 @ r)
  return np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sum(np.sqrt(np.maximum(inner, 0)))


def test_frechet_distance_of_gaussians():
  rng = np.random.default_rng(0)
  d = 6
  a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
  c1, c2 = a @ a.T / d + 0.1 * np.eye(d), b @ b.T / d + 0.1 * np.eye(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  exact = _fd_by_eigh(mu1, c1, mu2, c2)
  assert quality.gaussian_frechet(mu1, c1, mu2, c2) == pytest.approx(exact, rel=1e-8)
  # Diagonal covariances: sum (mu1 - mu2)^2 + sum (s1 - s2)^2 with s the standard deviations.
  s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
  assert quality.gaussian_frechet(np.zeros(3), np.diag(s1 ** 2), np.ones(3), np.diag(s2 ** 2)) == \
      pytest.approx(3 + np.sum((s1 - s2) ** 2))
  # From samples: close to the population value, and its bootstrap interval covers it.
  x = rng.multivariate_normal(mu1, c1, 6000)
  y = rng.multivariate_normal(mu2, c2, 6000)
  assert quality.frechet_distance(x, y) == pytest.approx(exact, rel=0.05)
  boot = quality.bootstrap(quality.frechet_distance, x, y, samples=60)
  assert boot["ci"][0] <= exact <= boot["ci"][1] and boot["ci"][0] < boot["value"] < boot["ci"][1]
  assert quality.frechet_distance(x, rng.multivariate_normal(mu1, c1, 6000)) < 0.02 * exact


def test_kid_is_unbiased_and_matches_the_population_mmd():
  rng = np.random.default_rng(1)
  # Two discrete distributions (uniform over 5 points each): the population MMD^2 is exact.
  A, B = rng.normal(size=(5, 3)), rng.normal(size=(5, 3)) + 0.3
  k = lambda p, q: (p @ q.T / 3 + 1) ** 3
  population = k(A, A).mean() + k(B, B).mean() - 2 * k(A, B).mean()
  x, y = A[rng.integers(0, 5, 4000)], B[rng.integers(0, 5, 4000)]
  out = quality.kid(x, y, subsets=50, subset_size=400)
  assert out["value"] == pytest.approx(population, rel=0.1)
  assert out["ci"][0] > 0
  # The same distribution: about zero (the estimator is unbiased) and the interval straddles it.
  same = quality.kid(rng.normal(size=(3000, 8)), rng.normal(size=(3000, 8)), subsets=50, subset_size=500)
  assert same["ci"][0] < 0 < same["ci"][1] and abs(same["value"]) < 3 * same["std"]
  shifted = quality.kid(rng.normal(size=(3000, 8)), rng.normal(size=(3000, 8)) + 0.5, subsets=50,
                        subset_size=500)
  assert shifted["ci"][0] > same["ci"][1]


def test_precision_recall_separate_fidelity_from_diversity():
  rng = np.random.default_rng(2)
  d = 4
  modes = np.stack([np.full(d, -6.0), np.full(d, 6.0)])
  mixture = lambda n: modes[rng.integers(0, 2, n)] + rng.normal(size=(n, d))
  real = mixture(2000)
  good = quality.precision_recall(real, mixture(2000))
  assert good["precision"] > 0.9 and good["recall"] > 0.9
  collapsed = quality.precision_recall(real, modes[1] + rng.normal(size=(2000, d)))   # one mode only
  assert collapsed["precision"] > 0.9 and 0.4 < collapsed["recall"] < 0.6
  off = quality.precision_recall(real, mixture(2000) + 20.0)                          # nothing realistic
  assert off["precision"] < 0.01 and off["recall"] < 0.01


def test_per_condition_report_names_the_encoder_and_lists_skipped_conditions():
  rng = np.random.default_rng(3)
  real = np.concatenate([rng.normal(size=(60, 4)), rng.normal(size=(60, 4)) + 3, rng.normal(size=(5, 4))])
  real_labels = ["benign"] * 60 + ["malignant"] * 60 + ["normal"] * 5
  gen = np.concatenate([rng.normal(size=(50, 4)), rng.normal(size=(50, 4)) + 3])
  gen_labels = ["benign"] * 50 + ["malignant"] * 50
  out = quality.per_condition(real, real_labels, gen, gen_labels, encoder="test-encoder", bootstrap_samples=10,
                              kid_subsets=5, kid_subset_size=40)
  assert out["all"]["encoder"] == "test-encoder" and out["all"]["num_real"] == 125
  assert sorted(out["conditions"]) == ["benign", "malignant"]
  assert out["skipped"] == {"normal": {"num_real": 5, "num_generated": 0}}
  for c in out["conditions"].values():
    assert c["fd"]["ci"][0] <= c["fd"]["value"] <= c["fd"]["ci"][1]
    assert set(c) >= {"fd", "kid", "precision", "recall", "encoder"}
  # Mixing the conditions up is visible per condition.
  swapped = quality.per_condition(real, real_labels, gen, gen_labels[::-1], encoder="e", bootstrap_samples=5,
                                  kid_subsets=5, kid_subset_size=40)
  assert swapped["conditions"]["benign"]["fd"]["value"] > 5 * out["conditions"]["benign"]["fd"]["value"]


def test_bad_features_are_refused():
  with pytest.raises(ValueError, match="same d"):
    quality.frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
  with pytest.raises(ValueError, match="NaN"):
    quality.kid(np.full((10, 3), np.nan), np.zeros((10, 3)))
  with pytest.raises(ValueError, match="at least 4"):
    quality.precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


def test_box_fidelity_sees_lesions_in_their_boxes_and_not_in_noise():
  from busgen_jax.evaluate import fidelity
  rng = np.random.default_rng(0)
  images, boxes, noise = [], [], []
  for _ in range(40):
    x1, y1 = rng.uniform(0.1, 0.6, 2)
    box = np.array([[x1, y1, x1 + 0.25, y1 + 0.2]], np.float32)
    im = rng.normal(150, 20, (64, 64))
    im[int(y1 * 64):int((y1 + 0.2) * 64), int(x1 * 64):int((x1 + 0.25) * 64)] -= 90   # a dark lesion in its box
    images.append(np.clip(im, 0, 255).astype(np.uint8))
    noise.append(np.clip(rng.normal(150, 20, (64, 64)), 0, 255).astype(np.uint8))
    boxes.append(box)
  hit = fidelity.box_fidelity(images, boxes, n_bootstrap=100)
  assert hit["auc"] > 0.95 and hit["mean_contrast_own_box"] > 0.3
  miss = fidelity.box_fidelity(noise, boxes, n_bootstrap=100)
  assert miss["auc_ci95"][0] < 0.5 < miss["auc_ci95"][1]
  assert fidelity.box_fidelity(images[:2], boxes[:2])["n"] == 2   # too few: said so, not a number
  acc = fidelity.conditional_accuracy(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.5, 0.5]]), ["b", "m"],
                                      ["b", "m", "m", "normal"])
  assert acc["n"] == 3 and acc["accuracy"] == pytest.approx(2 / 3) and acc["per_class"]["m"]["accuracy"] == 0.5
