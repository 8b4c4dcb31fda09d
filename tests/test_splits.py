"""Case-level, stratified, seeded splits: no case in two splits, proportions kept, folds and given splits."""

import collections

import numpy as np
import pytest

from busgen_jax.data import splits
from busgen_jax.data.sources.base import Item


def _items(n_cases=300, views=(1, 2, 3), seed=0):
  rng = np.random.default_rng(seed)
  items = []
  for c in range(n_cases):
    label = "malignant" if rng.uniform() < 0.3 else "benign"
    for v in range(int(rng.choice(views))):
      items.append(Item(key=f"c{c}-v{v}", source_file="", case_id=f"c{c}", pathology=label, fold=c % 5))
  return items


def test_random_split_is_case_level_stratified_and_seeded():
  items = _items()
  fr = {"train": 0.7, "val": 0.15, "test": 0.15}
  out = splits.assign(items, "random", fractions=fr, seed=1)
  by_case = collections.defaultdict(set)
  for it in items:
    by_case[it.case_id].add(out[it.key])
  assert all(len(s) == 1 for s in by_case.values())  # no leakage
  for label in ("benign", "malignant"):
    cases = {it.case_id for it in items if it.pathology == label}
    got = collections.Counter(next(iter(by_case[c])) for c in cases)
    for name, f in fr.items():
      assert abs(got[name] - f * len(cases)) <= 1  # largest-remainder rounding per stratum
  assert out == splits.assign(items, "random", fractions=fr, seed=1)
  assert out != splits.assign(items, "random", fractions=fr, seed=2)


def test_fold_and_given_schemes():
  items = _items(50)
  out = splits.assign(items, "folds", test_fold=2, val_fold=3)
  assert all(out[it.key] == {2: "test", 3: "val"}.get(it.fold, "train") for it in items)
  with pytest.raises(ValueError, match="matches no input"):
    splits.assign(items, "folds", test_fold=9)
  given = [Item("a", "", "c1", "benign", split="test"), Item("b", "", "c1", "benign", split="test"),
           Item("c", "", "c2", "benign")]
  out = splits.assign(given, "given", fractions={"train": 1.0}, seed=0)
  assert out == {"a": "test", "b": "test", "c": "train"}


def test_inconsistent_given_splits_within_a_case_are_an_error():
  bad = [Item("a", "", "c1", "benign", split="train"), Item("b", "", "c1", "benign", split="test")]
  with pytest.raises(ValueError, match="straddle"):
    splits.assign(bad, "given", fractions={"train": 1.0}, seed=0)
  with pytest.raises(ValueError, match="sum to 1"):
    splits.assign(_items(5), "random", fractions={"train": 0.5}, seed=0)
  with pytest.raises(ValueError, match="unknown split scheme"):
    splits.assign(_items(5), "nope")
