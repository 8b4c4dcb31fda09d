"""The Grain pipeline: any process count splits the same global batches, mixing and balancing hold, workers do not change
batches, the iterator state restores exactly, labels map to one global vocabulary."""

import contextlib

import numpy as np
import pytest

from busgen_jax.data import convert, pipeline
from helpers import convert_config


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  out = tmp_path_factory.mktemp("pipe")
  a = convert.convert(convert_config("phantom", "", out / "a", **{
      "phantom.num_examples": 80, "phantom.size": 40, "phantom.malignant_fraction": 0.25}))
  b = convert.convert(convert_config("phantom", "", out / "b", **{
      "phantom.num_examples": 40, "phantom.size": 40, "phantom.seed": 7, "phantom.num_devices": 5}))
  return a, b


def _cfg(path, **kw):
  c = pipeline.default_config()
  c.sources.real.path = str(path)
  c.image_size, c.batch_size = 32, 8
  c.update_from_flattened_dict(kw)
  return c


@contextlib.contextmanager
def _iterate(p):
  it = iter(p)
  try:
    yield it
  finally:
    it.close()


def _batches(cfg, n_batches, **build_kw):
  """The first n batches of a freshly built pipeline (its iterator closed)."""
  p = pipeline.build(cfg, **build_kw)
  with _iterate(p) as it:
    return [next(it) for _ in range(n_batches)]


def test_batches_shapes_and_global_vocab(data_dirs):
  a, b = data_dirs
  cfg = _cfg(a)
  with cfg.unlocked():
    cfg.sources.gen = {"path": str(b), "split": "train", "weight": 1.0, "filters": {}}
  p = pipeline.build(cfg, process_index=0, process_count=1)
  assert p.vocab["device"][0] == "unknown" and len(p.vocab["device"]) == 6  # union of 3 and 5 phantom devices
  with _iterate(p) as it:
    batch = next(it)
  assert batch["image"].shape == (8, 32, 32, 3) and batch["image"].dtype == np.float32
  assert -1 <= batch["image"].min() and batch["image"].max() <= 1
  assert batch["box"].shape == (8, 32, 32, 1) and set(np.unique(batch["box"])) <= {0.0, 1.0}
  assert set(batch["pathology"]) <= {1, 2} and (batch["device"] > 0).all()


def test_any_process_count_splits_the_same_global_batches(data_dirs):
  """Global batch k holds the same examples, with the same random crops and flips, for 1, 2 or 4 processes
  (process i has its i-th contiguous part, as JAX assembles a global batch), so a run can resume on a different number of hosts; `iterator(start)`
  begins at local batch `start`."""
  a, _ = data_dirs
  cfg = _cfg(a, batch_size=8)
  one = _batches(cfg, 3, process_index=0, process_count=1)
  for count in (2, 4):
    for i in range(count):
      mine = _batches(cfg, 3, process_index=i, process_count=count)
      for k in range(3):
        for key in ("image", "box", "pathology"):
          np.testing.assert_array_equal(mine[k][key], np.split(one[k][key], count)[i])
  with contextlib.closing(pipeline.build(cfg, process_index=1, process_count=2).iterator(2)) as it:
    np.testing.assert_array_equal(next(it)["image"], one[2]["image"][4:])


def test_mixing_weights_and_subsample_balance(data_dirs):
  a, b = data_dirs
  cfg = _cfg(a, batch_size=50, balance="subsample")
  with cfg.unlocked():
    cfg.sources.real.weight = 0.3
    cfg.sources.gen = {"path": str(b), "split": "train", "weight": 0.7, "filters": {}}
  batches = _batches(cfg, 8, process_index=0, process_count=1)
  source = np.concatenate([x["source"] for x in batches])  # sources sorted by name: gen=0, real=1
  assert abs(np.mean(source == 0) - 0.7) < 0.05
  real_path = np.concatenate([x["pathology"][x["source"] == 1] for x in batches])
  assert abs(np.mean(real_path == 2) - 0.5) < 0.15  # 25% malignant in the data, balanced to half


def test_workers_do_not_change_batches_and_state_restores(data_dirs):
  a, _ = data_dirs
  cfg0 = _cfg(a, worker_count=0)
  cfg2 = _cfg(a, worker_count=2)
  ref = _batches(cfg0, 6, process_index=0, process_count=1)
  got = _batches(cfg2, 6, process_index=0, process_count=1)
  for x, y in zip(ref, got):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  p = pipeline.build(cfg0, process_index=0, process_count=1)
  with _iterate(p) as it:
    for _ in range(3):
      next(it)
    state = it.get_state()
  with _iterate(pipeline.build(cfg0, process_index=0, process_count=1)) as it:
    it.set_state(state)
    restored = next(it)
  for k in ref[3]:
    np.testing.assert_array_equal(restored[k], ref[3][k])


def test_filters_and_errors(data_dirs):
  a, _ = data_dirs
  cfg = _cfg(a, **{"sources.real.filters.pathology": ["malignant"]})
  batch = _batches(cfg, 2, process_index=0, process_count=1)
  assert all((x["pathology"] == 2).all() for x in batch)
  with pytest.raises(ValueError, match="not in .* pathology vocabulary"):
    pipeline.build(_cfg(a, **{"sources.real.filters.pathology": ["cancer"]}), process_index=0, process_count=1)
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.build(_cfg(a, batch_size=9), process_index=0, process_count=2)


def test_epoch_index_balancing_modes():
  classes = np.array([1] * 90 + [2] * 10)
  idx = np.arange(100)
  sub = pipeline.EpochIndex(idx, classes, balance="subsample", shuffle=True, seed=0)
  e0 = sub.epoch(0)
  assert len(e0) == 20 and np.bincount(classes[e0]).tolist() == [0, 10, 10]
  assert not np.array_equal(e0, sub.epoch(1)) and sub[3] == int(e0[3])
  w = pipeline.EpochIndex(idx, classes, balance="weighted", shuffle=True, seed=0)
  draws = np.concatenate([w.epoch(e) for e in range(20)])
  assert abs(np.mean(classes[draws] == 2) - 0.5) < 0.05  # inverse-frequency weights balance the classes
  np.testing.assert_array_equal(w.epoch(3), pipeline.EpochIndex(idx, classes, balance="weighted", shuffle=True,
                                                                  seed=0).epoch(3))
  plain = pipeline.EpochIndex(idx, classes, balance="none", shuffle=True, seed=0)
  assert sorted(plain.epoch(0).tolist()) == list(range(100))
