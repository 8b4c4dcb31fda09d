"""The procedural phantom: deterministic, balanced as configured, consistent labels, learnable but not trivial."""

import numpy as np
import pytest
from PIL import Image

from busgen_jax.data.sources import phantom


def test_deterministic_from_seed_and_index():
  a = phantom.PhantomSource(num_examples=10, seed=3, size=64)
  b = phantom.PhantomSource(num_examples=10, seed=3, size=64)
  for i in (0, 7):
    ea, eb = a.example(i), b.example(i)
    np.testing.assert_array_equal(ea.image, eb.image)
    np.testing.assert_array_equal(ea.mask, eb.mask)
    assert (ea.pathology, ea.device, ea.birads) == (eb.pathology, eb.device, eb.birads)
  assert not np.array_equal(a.example(0).image, phantom.PhantomSource(seed=4, size=64).example(0).image)
  # The order examples are rendered in does not matter (shards/workers render any subset).
  np.testing.assert_array_equal(phantom.PhantomSource(seed=3, size=64).example(7).image, a.example(7).image)


def test_views_share_case_labels_and_lesion_but_not_speckle():
  s = phantom.PhantomSource(num_examples=4, views_per_case=2, size=64)
  v0, v1 = s.example(0), s.example(1)
  assert v0.case_id == v1.case_id and v0.pathology == v1.pathology and v0.device == v1.device
  assert not np.array_equal(v0.image, v1.image)
  iou = (v0.mask & v1.mask).sum() / (v0.mask | v1.mask).sum()
  assert iou > 0.5  # the same lesion, moved a little


def test_label_balance_devices_and_plan():
  s = phantom.PhantomSource(num_examples=4000, views_per_case=1, malignant_fraction=0.4, normal_fraction=0.1,
                            num_devices=4)
  plan = s.plan()
  labels = np.array([it.pathology for it in plan.items])
  assert abs(np.mean(labels == "malignant") - 0.4) < 0.03
  assert abs(np.mean(labels == "normal") - 0.1) < 0.02
  devices = np.bincount([it.payload["device"] for it in plan.items], minlength=4)
  assert devices.min() > 800
  assert plan.vocab.device == ("unknown",) + tuple(sorted(d.name for d in phantom.DEVICES[:4]))


def test_masks_boxes_and_lexicon_labels_agree():
  s = phantom.PhantomSource(num_examples=60, size=64, normal_fraction=0.2)
  darker = []
  for i in range(60):
    ex = s.example(i)
    assert ex.image.dtype == np.uint8 and ex.image.shape == (64, 64)
    if ex.pathology == "normal":
      assert not ex.mask.any() and len(ex.boxes) == 0 and ex.birads == "1"
      continue
    ys, xs = np.nonzero(ex.mask)
    np.testing.assert_allclose(ex.boxes[0], [xs.min() / 64, ys.min() / 64, (xs.max() + 1) / 64, (ys.max() + 1) / 64])
    if ex.histology == "cyst":
      assert ex.pathology == "benign" and ex.birads == "2"
    if ex.pathology == "malignant":
      assert ex.histology.startswith("invasive")
    darker.append(ex.image[ex.mask].mean() < ex.image[~ex.mask].mean())
  # Lesions are hypo- or anechoic, darker than the tissue around them (a few small ones are nearly isoechoic).
  assert np.mean(darker) >= 0.9


def test_learnable_but_not_trivial():
  """A linear model on lesion crops separates benign from malignant well, not perfectly."""
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  s = phantom.PhantomSource(num_examples=900, size=64, views_per_case=1)
  feats, labels = [], []
  for i in range(900):
    ex = s.example(i)
    x1, y1, x2, y2 = (ex.boxes[0] * 64).round().astype(int)
    crop = ex.image[max(0, y1 - 4):min(64, y2 + 12), max(0, x1 - 4):min(64, x2 + 4)]
    f = np.asarray(Image.fromarray(crop).resize((12, 12)), np.float32).ravel() / 255
    feats.append(np.r_[f, (y2 - y1) / max(x2 - x1, 1)])
    labels.append(ex.pathology == "malignant")
  x, y = np.array(feats), np.array(labels)
  clf = LogisticRegression(max_iter=3000).fit(x[:650], y[:650])
  auc = roc_auc_score(y[650:], clf.predict_proba(x[650:])[:, 1])
  assert 0.7 < auc < 0.98, auc


def test_bad_phantom_config_is_a_clear_error():
  with pytest.raises(ValueError, match="num_devices"):
    phantom.PhantomSource(num_devices=99)
  with pytest.raises(ValueError, match="first_device=5"):
    phantom.PhantomSource(first_device=5, num_devices=2)


def test_another_sites_scanners_come_from_first_device():
  src = phantom.PhantomSource(num_examples=6, size=32, seed=1, first_device=3, num_devices=1)
  assert src.plan().vocab.device == ("unknown", "Phantom-L7") and {src.example(i).device for i in range(6)} == {"Phantom-L7"}
