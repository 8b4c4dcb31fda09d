"""The experiment's few-shot arm: a site the diffusion model never saw, adapted from k labelled images per class.

  busgen-jax experiment --config configs/experiment.py:fewshot --workdir DIR \
      [--config.pretrained=DIR0] [--config.fewshot.dataset=PATH] [--config.fewshot.device=NAME|all]

  the site's images (one device of a converted dataset, or all of it; every split) -> DIR/fewshot/site, one split
  -> a validation set of the site's cases, fixed for every k and draw (it selects adapters and classifiers) -> per
  k and draw: k shots per class from the other cases (seeded; every view of a case, so few cases are used up) and
  the test images: the site's images outside the validation set and the shots' cases -> LoRA adaptation of the
  pretrained model on the shots (the site's unseen devices get new rows) -> a repository for the site from the
  adapted model, and one from the un-adapted model (the device's null row), both with the shots' box prior (or
  the pretraining corpus's: fewshot.box_prior) ->
  classifiers on the shots | shots + un-adapted | shots + adapted | adapted alone -> AUC on the site's test
  images and every external test set -> mean and spread over the draws, per k, and a k-curve per test set.

When the site is the experiment's own dataset, pretraining leaves the site's device out (`held_out_devices`).
The experiment records each (k, draw) as a stage; adaptation, generation and the classifiers resume inside it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from busgen_jax import checkpoint, generate
from busgen_jax.stages import classify
from busgen_jax.data import pipeline, reader, writer
from busgen_jax.evaluate import report
from busgen_jax.train import adapt, classifier

SITE = "site"                      # the site's test images, as a test set of every classifier
SHOTS, SHOTS_BASE, SHOTS_ADAPTED, ADAPTED = "shots", "shots + un-adapted", "shots + adapted", "adapted"
UNADAPTED = "un-adapted"           # the un-adapted repository alone: trained only to be fine-tuned (mixed=finetune)
ARMS = (SHOTS, SHOTS_BASE, SHOTS_ADAPTED, ADAPTED)
# Training order per `fewshot.mixed`: a fine-tuned arm after the classifier it starts from.
ORDER = {"mix": ARMS, "finetune": (SHOTS, ADAPTED, UNADAPTED, SHOTS_BASE, SHOTS_ADAPTED)}
FINETUNES = {SHOTS_BASE: UNADAPTED, SHOTS_ADAPTED: ADAPTED}   # arm -> the generated-only classifier it fine-tunes
BOX_PRIORS = ("shots", "pretraining")
PRIOR_WORDS = {"shots": "lesion boxes from the shots' box prior",
               "pretraining": "lesion boxes from the pretraining corpus's box prior (the site's device left out)"}


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = ""               # the new site: a converted dataset ("": the experiment's own dataset)
  c.device = ""                # one device name of it, or "all"; "": no few-shot arm
  c.k = (32,)                  # shots per class
  c.draws = 3                  # seeded shot draws per k
  c.val_fraction = 0.2         # of the site's images per class, whole cases: selection of adapters and classifiers
  c.min_test_per_class = 8     # a k that leaves fewer test images of a class is skipped (and reported)
  c.generated_per_class = 192  # images per class in each site repository (adapted and un-adapted)
  # The shots + generated arms: "mix" (one stream, `shots_weight` of it the shots) or "finetune" (the classifier
  # of the repository alone fine-tuned on the shots, with `finetune_overrides`).
  c.mixed = "mix"
  c.shots_weight = 0.5         # share of the shots in the shots + generated streams ("mix")
  c.finetune_overrides = ()    # "key=value" overrides of the few-shot classifiers for the fine-tuning ("finetune")
  # Lesion boxes of the site's repositories: "shots" (the draw's shots' boxes per class: k shapes per class) or
  # "pretraining" (the pretraining corpus's training boxes per pathology, the site's device left out: lesion
  # geometry is the patient's, not the scanner's).
  c.box_prior = "shots"
  a = adapt.default_config()
  a.task.update(field="pathology", classes=("benign", "malignant"), rows="existing")
  a.update(num_steps=200, eval_every=25, checkpoint_every=100, log_every=25, new_devices=True)
  a.data.update(batch_size=16, val_per_class=0)
  a.lora.rank = 8
  # The adaptation study (docs/EXPERIMENTS.md, docs/experiments/adapt_study.py) on the site's validation loss:
  # 3e-3 over 1e-3 (the adapters still improving at the last step) and 1e-2 (unstable for its first 100 steps).
  a.optim.lr = 3e-3
  c.adapt = a                  # the adaptation recipe (base, data and shots are filled in)
  c.classifier_overrides = ()  # "key=value" for the few-shot classifiers (all four arms), e.g. "num_steps=600"
  return c


def enabled(cfg) -> bool:
  return bool(cfg.fewshot.device)


def _site_source(cfg, internal: str) -> tuple[reader.Dataset, bool]:
  """The site's dataset, and whether it is the experiment's own (pretraining) dataset."""
  try:
    ds = reader.open_dataset(cfg.fewshot.dataset or internal)
  except (FileNotFoundError, ValueError) as e:
    raise ValueError(f"--config.fewshot.dataset: {e} (a converted dataset: `busgen-jax convert` writes one)") from None
  return ds, ds.dir.resolve() == reader.find_dataset_dir(internal).resolve()


def held_out_devices(cfg, internal: str) -> list[str]:
  """Devices pretraining must not see: the site's, when the site is the pretraining dataset."""
  if not enabled(cfg):
    return []
  ds, same = _site_source(cfg, internal)
  if not same:
    return []
  if cfg.fewshot.device == "all":
    raise ValueError("fewshot.device=all on the experiment's own dataset would leave nothing to pretrain on: name "
                     f"one device of {ds.vocab('device')[1:]}, or give another dataset with --config.fewshot.dataset")
  return [cfg.fewshot.device]


def kept_devices(dataset: str, held_out: list[str]) -> list[str]:
  """The devices pretraining read: every device of `dataset` but the held-out ones ([]: all of them)."""
  return [v for v in reader.open_dataset(dataset).vocab("device") if v not in held_out] if held_out else []


# ------------------------------------------------------------------------------------------------ the site

def stage_site(cfg, work: Path, data: dict) -> dict:
  """The site's images as their own dataset; its fixed validation set; the shots and test images per draw."""
  fs, classes = cfg.fewshot, list(cfg.generate.pathology)
  _check_choices(cfg)   # before hours of adaptation, not after
  ds, _ = _site_source(cfg, data["dataset"])
  if fs.device != "all" and fs.device not in ds.vocab("device"):
    raise ValueError(f"fewshot.device={fs.device!r} is not a device of {ds.dir} ({ds.vocab('device')}); or 'all'")
  picks = []
  for split in sorted(ds.splits):
    labels = pipeline.scan_labels(ds, split)
    keep = np.isin(labels["pathology"], [ds.vocab("pathology").index(c) for c in classes if c in ds.vocab("pathology")])
    if fs.device != "all":
      keep &= labels["device"] == ds.vocab("device").index(fs.device)
    picks += [(split, int(i)) for i in np.flatnonzero(keep)]
  if not picks:
    raise ValueError(f"{ds.dir}: no {classes} images of device {fs.device!r}")
  site_dir = writer.copy_records(ds, {SITE: picks}, work / "fewshot" / "site", fmt="fewshot_site",
                                  note={"device": fs.device, "classes": classes})
  site = reader.open_dataset(site_dir)
  names = site.vocab("pathology")
  label = np.asarray([names[i] for i in pipeline.scan_labels(site, SITE)["pathology"]])
  cases = site.case_ids(SITE)
  val = validation_cases(label, cases, classes, fs.val_fraction, cfg.seed)
  val_cases = set(cases[val])
  draws, skipped = {}, {}
  for k in fs.k:
    for d in range(fs.draws):
      try:
        shots = adapt.select(site, SITE, "pathology", classes, int(k), seed=cfg.seed * 1000 + 100 * d + int(k),
                             exclude_cases=val_cases, cases=cases, whole_cases=True)
      except ValueError as e:
        skipped[str(k)] = f"too few images for {k} shots per class outside the validation cases ({e})"
        break
      shot_idx = np.concatenate([shots[c] for c in classes])
      taken = val_cases | set(cases[shot_idx])
      test = np.flatnonzero([c not in taken for c in cases])
      short = {c: int((label[test] == c).sum()) for c in classes}
      if min(short.values()) < fs.min_test_per_class:
        skipped[str(k)] = (f"{k} shots per class leave {short} test images (fewshot.min_test_per_class = "
                           f"{fs.min_test_per_class})")
        break
      draws[f"k{k}_d{d}"] = {"k": int(k), "draw": d, "shots": shot_idx.tolist(), "test": test.tolist(),
                             "shot_devices": pipeline.label_counts(site, SITE, shot_idx)}
  if not draws:
    raise ValueError(f"the site ({len(label)} images) is too small for any k of {tuple(fs.k)}: {skipped}")
  return {"dataset": str(site_dir), "source": str(ds.dir), "device": fs.device, "n": len(label),
          "counts": {c: int((label == c).sum()) for c in classes}, "cases": len(set(cases)),
          "val": val.tolist(), "val_counts": {c: int((label[val] == c).sum()) for c in classes},
          "draws": draws, "skipped": skipped}


def validation_cases(label: np.ndarray, cases: np.ndarray, classes: list[str], fraction: float, seed: int
                     ) -> np.ndarray:
  """Record indices of whole cases holding about `fraction` of each class's images (cases in a seeded order)."""
  if not 0 < fraction < 1:
    raise ValueError(f"fewshot.val_fraction must be in (0, 1), got {fraction}")
  chosen: set = set()
  for j, c in enumerate(classes):
    target = int(round(fraction * (label == c).sum()))
    have = sum((label == c) & np.isin(cases, list(chosen)))
    for case in np.random.default_rng([seed, 7, j]).permutation(np.unique(cases[label == c])):
      if have >= target:
        break
      if case not in chosen:
        chosen.add(case)
        have += int(((label == c) & (cases == case)).sum())
  return np.flatnonzero(np.isin(cases, list(chosen)))


# ------------------------------------------------------------------------------------------------ one draw

def _check_choices(cfg) -> None:
  if cfg.fewshot.box_prior not in BOX_PRIORS:
    raise ValueError(f"fewshot.box_prior must be one of {BOX_PRIORS}, got {cfg.fewshot.box_prior!r}")
  if cfg.fewshot.mixed not in ORDER:
    raise ValueError(f"fewshot.mixed must be one of {tuple(ORDER)}, got {cfg.fewshot.mixed!r}")


def run_draw(cfg, work: Path, site: dict, key: str, model_dir: Path, data: dict, external: dict,
             pretraining_prior: str) -> dict | None:
  """Adaptation, the two site repositories and the four classifiers of one (k, draw); None when a trainer
  stopped early on a preemption notice (the experiment's rerun continues it). pretraining_prior: the experiment's
  box prior, fitted without the site's device (fewshot.box_prior=pretraining: a device it lacks samples the
  pathology's boxes)."""
  _check_choices(cfg)   # also when the site's stage was recorded before a change of them
  fs, draw = cfg.fewshot, site["draws"][key]
  out = draw_dir(work, key)
  classes = list(cfg.generate.pathology)
  t0 = time.time()
  a = adapt_config(cfg, site, key, model_dir, data)
  summary = adapt.adapt(a, out / "adapt")
  step, _ = checkpoint.load_meta(out / "adapt" / "checkpoints")
  if step < a.num_steps:
    return None
  times = {"adapt": time.time() - t0}

  prior = summary["box_prior"] if fs.box_prior == "shots" else pretraining_prior
  total = fs.generated_per_class * len(classes)
  conds = generate.proportional_conditions(draw["shot_devices"], classes, total, "train")
  repos = {}
  for name, ckpt, devices in (("adapted", out / "adapt" / adapt.MERGED, None),
                              ("base", model_dir / "checkpoints", "unknown")):   # the base: the null device row
    t = time.time()
    cond_file = out / f"conditions_{name}.json"
    cond_file.write_text(json.dumps([{**c, "device": devices or c["device"]} for c in conds], indent=1))
    g = generate.default_config()
    g.update(checkpoint=str(ckpt), box_prior=prior, condition_file=str(cond_file),
             per_device_batch=cfg.generate.per_device_batch, local_devices=cfg.generate.local_devices,
             name=f"fewshot_{name}", seed=cfg.seed + 17 * draw["draw"])
    g.sampler.update(cfg.generate.sampler.to_dict())
    repos[name] = str(generate.generate(g, out / f"generated_{name}"))
    times[f"generate_{name}"] = time.time() - t

  results = {}
  for arm in ORDER[fs.mixed]:
    t = time.time()
    init = (str(classifier_dir(work, key, FINETUNES[arm]) / "best")
            if fs.mixed == "finetune" and arm in FINETUNES else "")
    k = classifier_config(cfg, arm, site, draw, repos, external, init)
    res = classify.run(k, classifier_dir(work, key, arm))
    if not res:
      return None
    results[arm] = {name: _brief(r) for name, r in res.items()}
    times[f"classify {arm}"] = time.time() - t
    print(f"experiment:   few-shot {key} {arm}: validation AUC {(res[SITE].get('best') or {}).get('value', np.nan):.3f}",
          flush=True)
  return {"k": draw["k"], "draw": draw["draw"], "adapt": {x: summary[x] for x in ("val_loss_start", "val_loss_best",
                                                                                  "best_step", "new_rows")},
          "repositories": repos, "results": results, "times_s": times}


def adapt_config(cfg, site: dict, key: str, model_dir: Path, data: dict) -> ml_collections.ConfigDict:
  """fewshot.adapt on one draw: the pretrained model, the draw's shots, the site's validation images, and with
  prior preservation the pretraining images (the experiment's training split, the site's device left out)."""
  draw = site["draws"][key]
  a = ml_collections.ConfigDict(cfg.fewshot.adapt.to_dict())
  a.base = str(model_dir / "checkpoints")
  if a.prior.weight and not a.prior.path:
    a.prior.update(path=data["dataset"], split=cfg.data.train_split,
                   devices=tuple(kept_devices(data["dataset"], held_out_devices(cfg, data["dataset"]))))
  a.data.update(path=site["dataset"], split=SITE, val_split=SITE, shot_indices=tuple(draw["shots"]),
                val_indices=tuple(site["val"]))
  a.task.classes = tuple(cfg.generate.pathology)
  a.seed = cfg.seed + draw["draw"]
  return a


def draw_dir(work: Path, key: str) -> Path:
  """One (k, draw)'s directory: adapt/, generated_<adapted|base>/, classify/<arm>/."""
  return work / "fewshot" / key


def classifier_dir(work: Path, key: str, arm: str) -> Path:
  """Where one draw's classifier of an arm lives (its `eval/<test set>.json|predictions.npz` too)."""
  return draw_dir(work, key) / "classify" / arm.replace(" + ", "_").replace("-", "")


def classifier_config(cfg, arm: str, site: dict, draw: dict, repos: dict, external: dict, init: str = ""):
  """The experiment's classifier recipe (and fewshot.classifier_overrides) on one arm's training data; selected
  on the site's validation images; tested on its test images and the external sets. `init`: the saved classifier
  a shots + generated arm fine-tunes on the shots alone (fewshot.mixed=finetune)."""
  k = classifier.with_overrides(cfg.classifier, cfg.fewshot.classifier_overrides, "fewshot.classifier_overrides")
  template = {**k.data.sources[sorted(k.data.sources.keys())[0]].to_dict(), "limit": 0}
  shots = {**template, "path": site["dataset"], "split": SITE, "indices": tuple(draw["shots"])}
  gen = lambda name: {**template, "path": repos[name], "split": "train"}
  w = cfg.fewshot.shots_weight
  k.data.sources = {
      SHOTS: {"shots": {**shots, "weight": 1.0}},
      SHOTS_BASE: {"shots": {**shots, "weight": w}, "generated": {**gen("base"), "weight": 1 - w}},
      SHOTS_ADAPTED: {"shots": {**shots, "weight": w}, "generated": {**gen("adapted"), "weight": 1 - w}},
      ADAPTED: {"generated": {**gen("adapted"), "weight": 1.0}},
      UNADAPTED: {"generated": {**gen("base"), "weight": 1.0}},
  }[arm]
  if init:
    k = classifier.with_overrides(k, cfg.fewshot.finetune_overrides, "fewshot.finetune_overrides")
    k.data.sources = {"shots": {**shots, "weight": 1.0}}
    k.init = init
  k.data.device_vocab = ()
  k.val = {"path": site["dataset"], "split": SITE, "indices": tuple(site["val"])}
  k.test = {SITE: {"path": site["dataset"], "split": SITE, "indices": tuple(draw["test"])},
            **{name: {"path": e["dataset"], "split": e["split"]} for name, e in external.items()}}
  k.seed = cfg.seed + draw["draw"]
  return k


def _brief(r: dict) -> dict:
  keys = ("n", "n_positive", "auc", "auc_ci95", "balanced_accuracy", "sensitivity", "specificity")
  return {**{x: r[x] for x in keys if x in r}, "val_auc": (r.get("best") or {}).get("value")}


# ------------------------------------------------------------------------------------------------ report

def summarise(site: dict, draws: dict[str, dict]) -> dict:
  """Per test set, per k, per arm: AUC mean, standard deviation, per-draw AUCs and CIs; and the paired
  differences the protocol asks about (shots + adapted against the shots alone and against shots + un-adapted)."""
  tests: dict = {}
  for key, r in sorted(draws.items(), key=lambda kv: (kv[1]["k"], kv[1]["draw"])):
    for arm, per_test in r["results"].items():
      for test, m in per_test.items():
        cell = tests.setdefault(test, {}).setdefault(str(r["k"]), {"arms": {}})["arms"].setdefault(arm, {"draws": []})
        cell["draws"].append({"draw": r["draw"], "auc": m["auc"], "auc_ci95": m["auc_ci95"], "n": m["n"],
                              "val_auc": m["val_auc"]})
  for per_k in tests.values():
    for entry in per_k.values():
      per_arm = entry["arms"]
      for cell in per_arm.values():
        a = np.array([d["auc"] for d in cell["draws"]])
        v = [d["val_auc"] for d in cell["draws"] if d["val_auc"] is not None]
        cell.update(auc_mean=float(a.mean()), auc_std=float(a.std(ddof=1)) if len(a) > 1 else 0.0,
                    auc_min=float(a.min()), auc_max=float(a.max()), n_draws=len(a),
                    val_auc_mean=float(np.mean(v)) if v else None)
      entry["differences"] = {
          f"{x} − {y}": _paired(per_arm[x], per_arm[y])
          for x, y in ((SHOTS_ADAPTED, SHOTS), (SHOTS_ADAPTED, SHOTS_BASE), (SHOTS_BASE, SHOTS), (ADAPTED, SHOTS))
          if x in per_arm and y in per_arm}
  return {"site": {k: site[k] for k in ("source", "device", "n", "counts", "cases", "val_counts", "skipped")},
          "tests": tests}


def _paired(x: dict, y: dict) -> dict:
  by = {d["draw"]: d["auc"] for d in y["draws"]}
  diff = np.array([d["auc"] - by[d["draw"]] for d in x["draws"] if d["draw"] in by])
  return {"mean": float(diff.mean()), "std": float(diff.std(ddof=1)) if len(diff) > 1 else 0.0,
          "per_draw": diff.tolist(), "wins": int((diff > 0).sum()), "n_draws": len(diff)}


def kcurve_plot(path: Path, per_k: dict, title: str) -> Path:
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=110)
  ks = sorted(int(k) for k in per_k)
  for i, arm in enumerate(ARMS):   # the un-adapted classifier alone (mixed=finetune) is in the tables only
    cells = [per_k[str(k)]["arms"].get(arm) for k in ks]
    if not any(cells):
      continue
    x = [k * (1 + 0.04 * (i - 1.5)) for k, c in zip(ks, cells) if c]
    y = np.array([c["auc_mean"] for c in cells if c])
    ax.errorbar(x, y, yerr=[c["auc_std"] for c in cells if c], marker="o", ms=4, capsize=3, label=arm)
  ax.set(xlabel="shots per class (k)", ylabel="test AUC (mean ± sd over draws)", title=title)
  return report.save_log_x(fig, ax, path, ks)


MIXED_WORDS = {"mix": "shots weigh {fs.shots_weight} of a shots + generated stream.",
               "finetune": "a shots + generated arm is the classifier of that repository alone (adapted, un-adapted) "
                           "fine-tuned on the shots (overrides {fs.finetune_overrides})."}


def markdown(cfg, s: dict, work: Path) -> str:
  site, a = s["site"], cfg.fewshot.adapt
  md = [f"Site: device **{site['device']}** of `{site['source']}` ({site['n']} images, {site['cases']} cases: "
        f"{site['counts']}); {'left out of pretraining' if s.get('held_out') else 'a dataset pretraining never saw'}"
        f". Validation (selection of adapters and classifiers): {site['val_counts']} images of whole cases, the "
        "same for every draw; test: the site's other images outside the shots' cases. Adaptation: LoRA rank "
        f"{a.lora.rank}, {a.num_steps} steps of batch {a.data.batch_size}, lr {a.optim.lr}; each repository "
        f"{cfg.fewshot.generated_per_class} images per class (un-adapted: the null device row), "
        f"{PRIOR_WORDS[cfg.fewshot.box_prior]}; " + MIXED_WORDS[cfg.fewshot.mixed].format(fs=cfg.fewshot), ""]
  arms = ARMS + tuple(a for a in ORDER[cfg.fewshot.mixed] if a not in ARMS)   # + what fine-tuning starts from
  for k, reason in site["skipped"].items():
    md += [f"k = {k} skipped: {reason}.", ""]
  # What selection saw: the same for every test set (the site's validation images), so read from the site's.
  val = s["tests"].get(SITE, {})
  if val:
    rows = [["k", *arms]] + [[k, *(f"{c[a]['val_auc_mean']:.3f}" if c.get(a, {}).get("val_auc_mean") is not None
                                   else "–" for a in arms)]
                             for k in sorted(val, key=int) for c in [val[k]["arms"]]]
    md += [f"**validation** ({sum(site['val_counts'].values())} site images: each classifier's selected "
           "checkpoint's AUC, mean over draws; the decisions are made here)", "", report.markdown_table(rows), ""]
  for test, per_k in sorted(s["tests"].items(), key=lambda kv: kv[0] != SITE):   # the site first
    rows = [["k", *arms, "shots + adapted − shots", "shots + adapted − shots + un-adapted"]]
    for k in sorted(per_k, key=int):
      c, d = per_k[k]["arms"], per_k[k]["differences"]
      cell = lambda arm: (f"{c[arm]['auc_mean']:.3f} ± {c[arm]['auc_std']:.3f}" if arm in c else "–")
      diff = lambda name: (f"{d[name]['mean']:+.3f} ± {d[name]['std']:.3f} ({d[name]['wins']}/{d[name]['n_draws']})"
                           if name in d else "–")
      rows.append([k, *map(cell, arms), diff(f"{SHOTS_ADAPTED} − {SHOTS}"), diff(f"{SHOTS_ADAPTED} − {SHOTS_BASE}")])
    plot = kcurve_plot(work / f"fewshot_{test}.png", per_k, f"few-shot: {test}")
    md += [f"**{test}** (test AUC, mean ± sd over draws; differences paired by draw, wins in parentheses)", "",
           report.markdown_table(rows), "", f"![k-curve {test}]({plot.name})", ""]
  return "\n".join(md)
