"""Evaluation statistics: against sklearn, a DeLong case computed by hand, bootstrap coverage, operating points,
calibration, and the report files."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from busgen_jax.evaluate import metrics, report


def _scores(n, rng, sep=1.0):
  y = rng.integers(0, 2, n)
  return y, rng.normal(y * sep, 1.0)


def test_auc_and_rates_match_sklearn():
  rng = np.random.default_rng(0)
  y, s = _scores(300, rng)
  p = 1 / (1 + np.exp(-s))
  r = metrics.binary_report(y, p, n_bootstrap=200)
  assert r["auc"] == pytest.approx(skm.roc_auc_score(y, p))
  pred = (p >= 0.5).astype(int)
  assert r["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
  tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
  assert r["sensitivity"] == pytest.approx(tp / (tp + fn)) and r["specificity"] == pytest.approx(tn / (tn + fp))
  assert r["brier"] == pytest.approx(skm.brier_score_loss(y, p))
  lo, hi = r["auc_ci95"]
  assert lo < r["auc"] < hi


def test_delong_against_a_hand_computed_case():
  # 3 positives, 3 negatives: a ranks 8 of the 9 (positive, negative) pairs right, b 5 of 9.
  y = np.array([1, 1, 1, 0, 0, 0])
  a = np.array([0.9, 0.8, 0.4, 0.7, 0.3, 0.2])
  b = np.array([0.6, 0.5, 0.3, 0.55, 0.4, 0.35])
  r = metrics.delong(y, a, b)
  assert r["auc_a"] == pytest.approx(8 / 9) and r["auc_b"] == pytest.approx(5 / 9)
  # Structural components by hand (DeLong 1988): V10(x_i) = mean_j psi(x_i, y_j), V01(y_j) = mean_i psi(x_i, y_j)
  def comps(s):
    psi = (s[:3, None] > s[None, 3:]) + 0.5 * (s[:3, None] == s[None, 3:])
    return psi.mean(1), psi.mean(0)
  (a10, a01), (b10, b01) = comps(a), comps(b)
  var_a = np.var(a10, ddof=1) / 3 + np.var(a01, ddof=1) / 3
  cov_ab = np.cov(a10, b10)[0, 1] / 3 + np.cov(a01, b01)[0, 1] / 3
  var_b = np.var(b10, ddof=1) / 3 + np.var(b01, ddof=1) / 3
  assert r["var_a"] == pytest.approx(var_a) and r["var_b"] == pytest.approx(var_b)
  assert r["se"] == pytest.approx(np.sqrt(var_a + var_b - 2 * cov_ab))
  assert metrics.delong(y, a, a)["p_value"] == 1.0
  # a clearly better model on many cases is detected
  rng = np.random.default_rng(1)
  y, s = _scores(400, rng, sep=2.0)
  assert metrics.delong(y, s, s + rng.normal(0, 3, len(s)))["p_value"] < 1e-3


def test_bootstrap_ci_covers_the_true_auc():
  """Binormal scores with separation d have AUC Phi(d / sqrt(2)); 95% CIs should cover it ~95% of the time."""
  from scipy import stats
  true = stats.norm.cdf(1.0 / np.sqrt(2))
  rng = np.random.default_rng(2)
  hits = 0
  trials = 60
  for k in range(trials):
    y, s = _scores(200, rng)
    _, lo, hi = metrics.bootstrap_ci(y, s, n=200, seed=k)
    hits += lo <= true <= hi
  assert 0.83 <= hits / trials <= 1.0


def test_case_level_bootstrap_is_wider_for_correlated_views():
  rng = np.random.default_rng(3)
  y, s = _scores(60, rng)
  views = 5   # each case seen 5 times with nearly the same score
  Y, S = np.repeat(y, views), np.repeat(s, views) + rng.normal(0, 0.01, 60 * views)
  cases = np.repeat(np.arange(60), views)
  _, lo_i, hi_i = metrics.bootstrap_ci(Y, S, n=300)
  _, lo_c, hi_c = metrics.bootstrap_ci(Y, S, cases=cases, n=300)
  assert hi_c - lo_c > 1.5 * (hi_i - lo_i)


def test_operating_points_and_calibration():
  y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  p = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
  op = metrics.operating_point(y, p, specificity=0.75)      # threshold 0.4: one false positive (0.6)
  assert op["specificity"] == 0.75 and op["sensitivity"] == 1.0
  op = metrics.operating_point(y, p, specificity=1.0)       # threshold 0.7: misses the positive at 0.4
  assert op["specificity"] == 1.0 and op["sensitivity"] == 0.75
  op = metrics.operating_point(y, p, sensitivity=1.0)
  assert op["sensitivity"] == 1.0 and op["specificity"] == 0.75
  with pytest.raises(ValueError):
    metrics.operating_point(y, p)
  # perfectly calibrated bins -> ECE 0; always predicting 1 for a 50% base rate -> 0.5
  assert metrics.expected_calibration_error(np.array([0, 1, 0, 1]), np.full(4, 0.5)) == pytest.approx(0.0)
  assert metrics.expected_calibration_error(np.array([0, 1, 0, 1]), np.ones(4)) == pytest.approx(0.5)


def test_multiclass_report():
  rng = np.random.default_rng(4)
  y = rng.integers(0, 3, 300)
  logits = rng.normal(0, 1, (300, 3)) + 2 * np.eye(3)[y]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  r = metrics.multiclass_report(y, probs, ["a", "b", "c"], n_bootstrap=50)
  assert r["macro_auc"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
  assert np.array(r["confusion"]).sum() == 300


def test_report_files(tmp_path):
  rng = np.random.default_rng(5)
  y, s = _scores(100, rng)
  rep = metrics.binary_report(y, 1 / (1 + np.exp(-s)), n_bootstrap=50)
  paths = report.write_classifier_report(tmp_path / "real_test", rep, title="real test")
  assert json.loads(paths["json"].read_text())["auc"] == rep["auc"]
  page = paths["html"].read_text()
  assert "AUC [95% CI]" in page and page.count("data:image/png;base64") == 2
  assert "![ROC](real_test.roc.png)" in paths["md"].read_text()
