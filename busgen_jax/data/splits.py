"""Split assignment at case level: no case ever lands in two splits.

Schemes (registry below): "random" (case-level, stratified by pathology, seeded), "folds" (the dataset's own
cross-validation folds: `test_fold` -> test, `val_fold` -> val, the rest train), "given" (the split each input
names, e.g. a manifest's `split` column; inputs without one fall back to "random").
"""

from __future__ import annotations

import collections
from typing import Callable, Mapping, Sequence

import numpy as np

from busgen_jax.data.sources.base import Item

CANONICAL_ORDER = ("train", "val", "test")


def _ordered(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
  names = [n for n in CANONICAL_ORDER if n in fractions] + sorted(n for n in fractions if n not in CANONICAL_ORDER)
  out = [(n, float(fractions[n])) for n in names if float(fractions[n]) > 0]
  total = sum(f for _, f in out)
  if not out or abs(total - 1) > 1e-6:
    raise ValueError(f"split fractions must be positive and sum to 1, got {dict(fractions)}")
  return out


def _case_label(items: Sequence[Item]) -> str:
  counts = collections.Counter(it.pathology for it in items)
  return max(sorted(counts), key=counts.__getitem__)


def random_splits(items: Sequence[Item], *, fractions: Mapping[str, float], seed: int, **_) -> dict[str, str]:
  """Cases shuffled within each pathology stratum, then cut by largest-remainder rounding of the fractions."""
  parts = _ordered(fractions)
  cases: dict[str, list[Item]] = collections.defaultdict(list)
  for it in items:
    cases[it.case_id].append(it)
  strata = collections.defaultdict(list)
  for case_id in sorted(cases):
    strata[_case_label(cases[case_id])].append(case_id)
  rng = np.random.default_rng(seed)
  split_of_case = {}
  for label in sorted(strata):
    ids = strata[label]
    ids = [ids[i] for i in rng.permutation(len(ids))]
    exact = np.array([f for _, f in parts]) * len(ids)
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[:len(ids) - counts.sum()]:
      counts[i] += 1
    start = 0
    for (name, _), n in zip(parts, counts):
      split_of_case.update({c: name for c in ids[start:start + n]})
      start += n
  return {it.key: split_of_case[it.case_id] for it in items}


def fold_splits(items: Sequence[Item], *, test_fold: int, val_fold: int = -1, **_) -> dict[str, str]:
  missing = [it.key for it in items if it.fold < 0]
  if missing:
    raise ValueError(f"split.scheme='folds' but {len(missing)} inputs have no fold (e.g. {missing[:3]})")
  out = {it.key: "test" if it.fold == test_fold else "val" if it.fold == val_fold else "train" for it in items}
  if test_fold not in {it.fold for it in items}:
    raise ValueError(f"split.test_fold={test_fold} matches no input (folds: {sorted({it.fold for it in items})})")
  return out


def given_splits(items: Sequence[Item], **kw) -> dict[str, str]:
  out = random_splits([it for it in items if not it.split], **kw) if any(not it.split for it in items) else {}
  out.update({it.key: it.split for it in items if it.split})
  return out


SCHEMES: dict[str, Callable[..., dict[str, str]]] = {
    "random": random_splits, "folds": fold_splits, "given": given_splits}


def assign(items: Sequence[Item], scheme: str, **kw) -> dict[str, str]:
  if scheme not in SCHEMES:
    raise ValueError(f"unknown split scheme {scheme!r}; choose one of {sorted(SCHEMES)}")
  out = SCHEMES[scheme](items, **kw)
  by_case = collections.defaultdict(set)
  for it in items:
    by_case[it.case_id].add(out[it.key])
  leaks = {c: sorted(s) for c, s in by_case.items() if len(s) > 1}
  if leaks:
    example = next(iter(leaks.items()))
    raise ValueError(f"{len(leaks)} cases straddle splits (e.g. case {example[0]!r} in {example[1]}); "
                     "the inputs' own split/fold labels disagree within a case")
  return out
