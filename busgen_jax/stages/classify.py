"""The `classify` and `evaluate` stages: train a downstream classifier, then evaluate it on every test set.

  busgen-jax classify --config configs/classify.py:real=DIR,test=DIR --workdir OUT
  busgen-jax evaluate --config.checkpoint=OUT/best --config.dataset=DS --workdir EVAL   # any saved classifier

`classify` = the trainer (train/classifier.py: the best checkpoint on validation, `OUT/best`) -> the best
checkpoint's predictions on each `config.test` entry -> metrics with case-level bootstrap CIs
(evaluate/metrics.py) -> `OUT/eval/<name>.json|md|html` and `<name>.predictions.npz`. `evaluate` is the second
half alone, on a classifier rebuilt from the config saved with it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
import numpy as np

from busgen_jax import paths
from busgen_jax.data import reader
from busgen_jax.evaluate import metrics, report as report_lib
from busgen_jax.train import classifier


def run(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """Trains (resuming), then evaluates the best checkpoint on the test sets. Returns the test reports by name
  ({} when the run was preempted: the resumed run evaluates)."""
  trained = classifier.train(cfg, workdir)
  if not trained["complete"]:
    return {}
  return evaluate_checkpoint(trained["best_dir"], paths.path(workdir) / "eval", tests=cfg.test,
                             setup=trained["setup"])


def report(setup: classifier.Setup, params, stats, path: str, split: str, *, indices=(),
           n_bootstrap: int | None = None) -> dict:
  """A classifier's report on a split (or its records `indices`): the predictions and every metric, with
  case-level bootstrap CIs (the cases read from the records)."""
  cfg = setup.cfg
  pred = setup.predictions(params, stats, path, split, indices=indices)
  probs, labels = pred["probs"], pred["labels"]
  nb = cfg.n_bootstrap if n_bootstrap is None else n_bootstrap
  cases = reader.open_dataset(path).case_ids(split, pred["index"])
  if len(setup.classes) == 2 and setup.positive is not None:
    rep = metrics.binary_report((labels == setup.positive).astype(int), probs[:, setup.positive], cases=cases,
                                n_bootstrap=nb, seed=cfg.seed, reference_sensitivity=cfg.reference_sensitivity or None)
    rep["macro_auc"] = rep["auc"]
  else:
    rep = metrics.multiclass_report(labels, probs, setup.classes, cases=cases, n_bootstrap=nb, seed=cfg.seed)
  rep.update(dataset=str(reader.find_dataset_dir(path)), split=split, classes=setup.classes,
             positive=cfg.task.positive if setup.positive is not None else None)
  return {"report": rep, "probs": probs, "labels": labels, "cases": cases}


def evaluate_checkpoint(directory, out_dir: str | Path, *, tests, setup: classifier.Setup | None = None) -> dict:
  """Evaluates a saved classifier on each `tests` entry ({name: {path, split, optional record indices}}) and writes
  the reports. Without `setup`, the classifier is rebuilt from the config saved with it."""
  weights, meta = classifier.load_classifier(directory)
  if setup is None:
    setup = classifier.Setup(ml_collections.ConfigDict(json.loads(meta["config"])), meta["vocab"])
  out_dir = paths.path(out_dir)   # local or gs://
  out_dir.mkdir(parents=True, exist_ok=True)
  params = jax.device_put(weights["params"], setup.repl)
  stats = jax.device_put(weights["batch_stats"], setup.repl)
  results = {}
  for name in tests.keys():
    t = tests[name]
    path = t.path or classifier.default_real(setup.cfg)
    res = report(setup, params, stats, path, t.split, indices=t.get("indices", ()))
    rep = {**res["report"], "checkpoint": str(directory), "best": meta.get("best")}
    report_lib.write_classifier_report(out_dir / name, rep, title=f"{name}: {Path(path).name}/{t.split}")
    with (out_dir / f"{name}.predictions.npz").open("wb") as f:
      np.savez(f, probs=res["probs"], labels=res["labels"], cases=res["cases"].astype(str))
    results[name] = rep
  return results


def default_evaluate_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.checkpoint = ""            # a classifier's saved directory (`classify` workdir/best)
  c.dataset = ""               # any dataset in the record schema: reports <workdir>/eval.*
  c.split = "test"
  c.external = ml_collections.ConfigDict()   # --config.external.NAME=DATASET, any number: <workdir>/NAME.*
  c.external_split = "test"    # the split evaluated of each external dataset
  return c


def evaluate_main(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  if not cfg.checkpoint or not (cfg.dataset or cfg.external):
    raise ValueError("--config.checkpoint and a dataset (--config.dataset and/or --config.external.NAME=DIR) are "
                     "required")
  if "eval" in cfg.external:
    raise ValueError("--config.external.eval: the name `eval` is --config.dataset's report; choose another")
  # every dataset and split is checked before the first is evaluated: a typo in the last fails at once
  named = [("eval", "dataset", cfg.dataset, cfg.split)] if cfg.dataset else []
  named += [(name, f"external.{name}", path, cfg.external_split) for name, path in sorted(cfg.external.items())]
  tests = {name: {"path": classifier.check_dataset(key, path, split), "split": split}
           for name, key, path, split in named}
  return evaluate_checkpoint(cfg.checkpoint, workdir, tests=ml_collections.ConfigDict(tests))


default_config = classifier.default_config


def main(cfg: ml_collections.ConfigDict, workdir: str, argv) -> None:
  for name, r in run(cfg, workdir).items():
    auc = r.get("auc", r.get("macro_auc"))
    print(f"{name}: n={r['n']} AUC={auc:.3f} -> {workdir}/eval/{name}.html")
