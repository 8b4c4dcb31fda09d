"""`busgen-jax experiment --config configs/experiment.py:cpu --workdir DIR`: the paper's protocol on real data.

  convert (or take a converted dataset) -> pretrain the diffusion model on its training split -> lesion-box
  prior -> a labelled repository (pathology x device, in the training split's proportions) -> classifiers on
  real only, generated only, real + generated, and generated subsets (the data-scaling curve) -> every
  classifier on the internal test split and on every external test set (`--config.external.NAME=PATH`) ->
  quality and privacy audit -> DIR/report.md, report.html and report.json.

Each stage records its result in DIR/stages/<stage>.json and is skipped on a rerun; the stages it calls
(training, generation, classifiers) resume from their own checkpoints, so an interrupted experiment continues
where it stopped. Selection (checkpoints, early stopping) uses the real validation split only; the test split
and the external sets are only evaluated.

An external test set is any dataset by path: a converted dataset (its `external_split`, default "test"), or raw
data converted into DIR/external/NAME with every image in "test": a BUSI-style folder, a folder in BUS-BRA's
layout, or a manifest (.json: the official BUSGen dataset JSON or ours; .csv: our manifest columns).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from busgen_jax import generate, paths
from busgen_jax.data import convert, inspect, pipeline, reader
from busgen_jax.data.sources import busi as busi_source
from busgen_jax.diffusion import box_prior
from busgen_jax.evaluate import fidelity, metrics, privacy, report
from busgen_jax.train import checkpoint, classifier, diffusion

STAGES = ("data", "external", "pretrain", "box_prior", "generate", "classify", "quality", "audit")
REAL, GENERATED, MIXED = "real", "generated", "mixed"
INTERNAL = "internal"
BEGIN, END = "<!-- experiment:begin -->", "<!-- experiment:end -->"


def default_config(preset: str = "cpu") -> ml_collections.ConfigDict:
  """The protocol's settings; presets live in configs/experiment.py."""
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.seed = 0
  # The internal dataset: a converted dataset (`dataset`) or raw data converted with `convert` (`input`).
  c.data = ml_collections.ConfigDict({"dataset": "", "input": "", "train_split": "train", "val_split": "val",
                                      "test_split": "test"})
  c.data.convert = convert.default_config()
  c.data.convert.update(format="busbra", examples_per_shard=512)
  c.data.convert.image.size = 128
  c.data.convert.split.update(scheme="folds", test_fold=1, val_fold=2)   # BUS-BRA: train 3-5, select 2, test 1
  # External test sets: name -> path (a converted dataset, a raw folder or a manifest); any number.
  c.external = ml_collections.ConfigDict()
  c.external_split = "test"               # the split evaluated of a converted external dataset
  c.diffusion = diffusion.default_config()
  c.diffusion.data.balance = "subsample"
  c.diffusion.data.sources.real.filters.pathology = ["benign", "malignant"]
  c.box_prior = ml_collections.ConfigDict({"by_device": True, "min_group_size": 5})
  c.generate = ml_collections.ConfigDict({
      # Generated images as multiples of the real training images; the largest is generated, the others are
      # nested subsets of it (the data-scaling curve); the "generated" and "mixed" arms use all of it.
      "multiples": (0.5, 1.0, 2.0),
      # "train": pathology x device counts in the real training split's proportions (the classifier then sees
      # the same class prior as the real arm); "grid": the same count for every pathology x device.
      "proportions": "train",
      "pathology": ("benign", "malignant"),
      "per_device_batch": 64, "local_devices": 0, "examples_per_shard": 512})
  c.generate.sampler = generate.default_config().sampler
  c.generate.sampler.update(method="multistep", order=2, steps=10, guidance_scale=2.8)
  c.classifier = classifier.default_config()
  c.classifier.test = ml_collections.ConfigDict()   # filled in: the internal test split and the external sets
  c.mixed_weight_generated = 0.5          # share of generated images in the real + generated stream
  c.quality = ml_collections.ConfigDict({"conditions": ("pathology", "device"), "min_count": 10, "bootstrap": 100})
  c.audit = ml_collections.ConfigDict({"mia_per_group": 256})
  # Another experiment's run directory: its data, diffusion model and box prior are reused (and its data,
  # diffusion and box_prior settings replace these), so generation and classifier recipes can be varied alone.
  c.pretrained = ""
  c.skip = ()                             # stages to leave out: "quality", "audit"
  c.docs = ""                             # a Markdown file whose generated section gets this run's tables
  return c


# ------------------------------------------------------------------------------------------------ bookkeeping

class Interrupted(Exception):
  """A stage stopped early (a preemption notice: it saved and returned); the rerun continues it."""

class Record:
  """DIR/stages/<stage>.json: a finished stage's result and time; a stage found there is not run again."""

  def __init__(self, work: Path):
    self.dir = work / "stages"
    self.dir.mkdir(parents=True, exist_ok=True)
    self.times: dict[str, float] = {}

  def run(self, name: str, fn, *args) -> dict:
    f = self.dir / f"{name}.json"
    if f.exists():
      done = json.loads(f.read_text())
      self.times[name] = done["seconds"]
      logging.info("experiment: stage %s already done (%.0f s)", name, done["seconds"])
      return done["result"]
    print(f"experiment: {name} ...", flush=True)
    t = time.time()
    result = fn(*args)
    self.times[name] = time.time() - t
    f.write_text(json.dumps({"seconds": self.times[name], "result": result}, indent=1, default=_json))
    print(f"experiment: {name} done in {self.times[name]:.0f} s", flush=True)
    return result


def _json(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# ------------------------------------------------------------------------------------------------ data

def detect_format(path: Path) -> str:
  """"dataset" for a converted dataset, else the converter that reads it (busi, busbra, manifest)."""
  try:
    reader.find_dataset_dir(path)
    return "dataset"
  except (FileNotFoundError, ValueError):
    pass
  if path.is_file() and path.suffix.lower() in (".json", ".csv"):
    return "manifest"
  if path.is_dir() and (path / "bus_data.csv").is_file():
    return "busbra"
  if path.is_dir():
    try:
      busi_source.find_class_root(path)
      return "busi"
    except FileNotFoundError:
      pass
  raise ValueError(f"{path}: neither a converted dataset nor raw data this project reads (a BUSI-style folder, a "
                   "BUS-BRA folder with bus_data.csv, or a .json/.csv manifest)")


def _existing(p: str, what: str) -> Path:
  if not p:
    raise ValueError(f"{what} is required")
  path = Path(p).expanduser()
  if not path.exists():
    raise FileNotFoundError(f"{what}: {path} does not exist")
  return path


def stage_data(cfg, work: Path) -> dict:
  if cfg.data.dataset:
    ds_dir = reader.find_dataset_dir(_existing(cfg.data.dataset, "--config.data.dataset"))
  else:
    c = ml_collections.ConfigDict(cfg.data.convert.to_dict())
    if c.format != "phantom":            # the built-in phantom needs no files
      c.input = str(_existing(cfg.data.input, "--config.data.input (raw data) or --config.data.dataset (converted)"))
    c.output = str(work / "data")
    ds_dir = convert.run(c)
  ds = reader.open_dataset(ds_dir)
  for split in (cfg.data.train_split, cfg.data.val_split, cfg.data.test_split):
    if split not in ds.splits:
      raise ValueError(f"{ds_dir}: no split {split!r} (splits {ds.splits}); the protocol trains, selects and tests "
                       "on three case-level splits")
  return {"dataset": str(ds_dir), "splits": ds.splits, "counts": _counts(ds, cfg.data.train_split)}


def _counts(ds: reader.Dataset, split: str) -> dict:
  """{pathology: {device: n}} of a split."""
  labels = pipeline.scan_labels(ds, split)
  p_names, d_names = ds.vocab("pathology"), ds.vocab("device")
  out: dict = {}
  for p, d in zip(labels["pathology"], labels["device"]):
    out.setdefault(p_names[p], {}).setdefault(d_names[d], 0)
    out[p_names[p]][d_names[d]] += 1
  return out


def stage_external(cfg, work: Path) -> dict:
  """name -> {"dataset", "split", "format"}; raw data is converted with every image in the test split."""
  out = {}
  for name in sorted(cfg.external.keys()):
    path = _existing(str(cfg.external[name]), f"--config.external.{name}")
    fmt = detect_format(path)
    if fmt == "dataset":
      ds_dir, split = reader.find_dataset_dir(path), cfg.external_split
    else:
      c = convert.default_config()
      c.update(format=fmt, input=str(path), output=str(work / "external" / name), name=name,
               examples_per_shard=cfg.data.convert.examples_per_shard)
      c.image.update(cfg.data.convert.image.to_dict())
      c.split.scheme, c.split.fractions = "random", {"test": 1.0}
      ds_dir, split = convert.run(c), "test"
    ds = reader.open_dataset(ds_dir)
    if split not in ds.splits:
      raise ValueError(f"--config.external.{name}: {ds_dir} has no split {split!r} (splits {ds.splits}); set "
                       "--config.external_split")
    out[name] = {"dataset": str(ds_dir), "split": split, "format": fmt, "n": ds.splits[split],
                 "source": str(path)}
  return out


# ------------------------------------------------------------------------------------------------ generative side

def _model_dir(cfg, work: Path) -> Path:
  """The diffusion model's run directory: this experiment's, or the `pretrained` experiment's."""
  return (Path(cfg.pretrained).expanduser() if cfg.pretrained else work) / "diffusion"


PRETRAINED_STAGES = ("data", "pretrain", "box_prior")


def adopt_pretrained(cfg, work: Path) -> ml_collections.ConfigDict:
  """With `pretrained`: its settings for the reused stages, and their recorded results copied into this run."""
  src = _existing(cfg.pretrained, "--config.pretrained")
  missing = [s for s in PRETRAINED_STAGES if not (src / "stages" / f"{s}.json").is_file()]
  if missing or not (src / "config.json").is_file():
    raise ValueError(f"--config.pretrained={src}: not a finished experiment (stages {missing or '-'} not done); "
                     "run the experiment there first")
  old = json.loads((src / "config.json").read_text())
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  for key in ("data", "diffusion", "box_prior"):
    cfg[key] = ml_collections.ConfigDict(old[key])
  (work / "stages").mkdir(parents=True, exist_ok=True)
  for s in PRETRAINED_STAGES:
    (work / "stages" / f"{s}.json").write_text((src / "stages" / f"{s}.json").read_text())
  return cfg


def stage_pretrain(cfg, work: Path, data: dict) -> dict:
  d = ml_collections.ConfigDict(cfg.diffusion.to_dict())
  d.data.sources.real.update(path=data["dataset"], split=cfg.data.train_split)
  d.seed = cfg.seed
  last = diffusion.train(d, work / "diffusion")
  step, _ = checkpoint.load_meta(work / "diffusion" / "checkpoints")
  if step < d.num_steps:
    raise Interrupted(f"pretraining stopped at step {step} of {d.num_steps}")
  return last


def stage_box_prior(cfg, work: Path, data: dict) -> dict:
  prior = box_prior.fit_datasets([data["dataset"]], cfg.data.train_split, **cfg.box_prior.to_dict())
  return {"path": str(prior.save(work / "box_prior.json"))}


def generation_conditions(counts: dict, pathologies, total: int, proportions: str) -> list[dict]:
  """{pathology, device, num} summing to `total`: in the training counts' proportions (largest-remainder
  rounding) or evenly over every pathology x device seen in training."""
  cells = [(p, d, n) for p in pathologies for d, n in sorted(counts.get(p, {}).items()) if d != "unknown" and n]
  if not cells:
    raise ValueError(f"no training images of pathologies {list(pathologies)} with a device")
  if proportions == "train":
    weights = np.array([n for _, _, n in cells], np.float64)
  elif proportions == "grid":
    weights = np.ones(len(cells))
  else:
    raise ValueError(f"generate.proportions must be train or grid, got {proportions!r}")
  exact = total * weights / weights.sum()
  num = np.floor(exact).astype(int)
  num[np.argsort(num - exact)[:total - num.sum()]] += 1
  return [{"pathology": p, "device": d, "num": int(k)} for (p, d, _), k in zip(cells, num) if k]


def stage_generate(cfg, work: Path, data: dict, prior: dict) -> dict:
  n_real = sum(n for p in cfg.generate.pathology for n in data["counts"].get(p, {}).values())
  total = int(round(max(cfg.generate.multiples) * n_real))
  conds = generation_conditions(data["counts"], cfg.generate.pathology, total, cfg.generate.proportions)
  cond_file = work / "generation_conditions.json"
  cond_file.write_text(json.dumps(conds, indent=1))
  g = generate.default_config()
  g.update(checkpoint=str(_model_dir(cfg, work) / "checkpoints"), box_prior=prior["path"],
           condition_file=str(cond_file), per_device_batch=cfg.generate.per_device_batch,
           local_devices=cfg.generate.local_devices, examples_per_shard=cfg.generate.examples_per_shard,
           name="generated", seed=cfg.seed)
  g.sampler.update(cfg.generate.sampler.to_dict())
  ds_dir = generate.generate(g, work / "generated")
  ds = reader.open_dataset(ds_dir)
  return {"dataset": str(ds_dir), "images": ds.splits.get("train", 0), "real_images": n_real,
          "conditions": conds}


# ------------------------------------------------------------------------------------------------ classifiers

def arms(cfg, n_real: int, n_generated: int) -> dict[str, dict]:
  """arm -> {"real": weight or None, "generated": (weight, limit) or None}; limit 0 = all generated images."""
  out = {REAL: {"real": 1.0, "generated": None}, GENERATED: {"real": None, "generated": (1.0, 0)},
         MIXED: {"real": 1.0 - cfg.mixed_weight_generated, "generated": (cfg.mixed_weight_generated, 0)}}
  for m in sorted(cfg.generate.multiples)[:-1]:
    out[scaling_arm(m)] = {"real": None, "generated": (1.0, min(n_generated, int(round(m * n_real))))}
  return out


def scaling_arm(m: float) -> str:
  return f"generated x{m:g}"


def _arm_dir(arm: str) -> str:
  return arm.replace(" ", "_")


def classifier_config(cfg, arm: dict, data: dict, generated: dict, external: dict) -> ml_collections.ConfigDict:
  k = ml_collections.ConfigDict(cfg.classifier.to_dict())
  template = dict(k.data.sources[sorted(k.data.sources.keys())[0]].to_dict())
  sources = {}
  if arm["real"] is not None:
    sources["real"] = {**template, "path": data["dataset"], "split": cfg.data.train_split, "weight": arm["real"]}
  if arm["generated"] is not None:
    weight, limit = arm["generated"]
    sources["generated"] = {**template, "path": generated["dataset"], "split": "train", "weight": weight,
                            "limit": limit}
  k.data.sources = sources
  k.data.device_vocab = ()
  k.val = {"path": data["dataset"], "split": cfg.data.val_split}   # selection on real validation data only
  k.test = {INTERNAL: {"path": data["dataset"], "split": cfg.data.test_split},
            **{name: {"path": e["dataset"], "split": e["split"]} for name, e in external.items()}}
  k.seed = cfg.seed
  return k


def stage_classify(cfg, work: Path, data: dict, generated: dict, external: dict) -> dict:
  """arm -> test set -> report (without curves); predictions stay in classify/<arm>/eval/."""
  out = {}
  n_real = generated["real_images"]
  for name, arm in arms(cfg, n_real, generated["images"]).items():
    t = time.time()
    res = classifier.train(classifier_config(cfg, arm, data, generated, external), work / "classify" / _arm_dir(name))
    if not res:
      raise Interrupted(f"the {name!r} classifier stopped early")
    out[name] = {"seconds": time.time() - t, "train": arm, "tests": res}
    print(f"experiment:   {name}: " + ", ".join(f"{s} AUC {r['auc']:.3f}" for s, r in res.items()), flush=True)
  return out


def load_predictions(work: Path, arm: str, test: str) -> dict:
  with np.load(work / "classify" / _arm_dir(arm) / "eval" / f"{test}.predictions.npz") as z:
    return {k: z[k] for k in z.files}


def compare(work: Path, cfg, results: dict, test: str) -> dict:
  """DeLong's test of every arm against real-only training on one test set (same images, same order)."""
  classes = list(cfg.classifier.task.classes)
  pos = classes.index(cfg.classifier.task.positive)
  ref = load_predictions(work, REAL, test)
  out = {}
  for arm in results:
    if arm == REAL:
      continue
    p = load_predictions(work, arm, test)
    if not np.array_equal(p["labels"], ref["labels"]):
      raise AssertionError(f"{test}: arm {arm!r} was evaluated on other images than {REAL!r}")
    try:
      out[arm] = metrics.delong((p["labels"] == pos).astype(int), p["probs"][:, pos], ref["probs"][:, pos])
    except ValueError as e:       # a test set with fewer than two images of a class
      out[arm] = {"error": str(e)}
  return out


# ------------------------------------------------------------------------------------------------ assessment

def stage_quality(cfg, work: Path, data: dict, generated: dict) -> dict:
  q = fidelity.default_config()
  q.update(real=data["dataset"], real_split=cfg.data.train_split, generated=generated["dataset"],
           encoder=str(work / "classify" / REAL / "best"), conditions=tuple(cfg.quality.conditions),
           min_count=cfg.quality.min_count, bootstrap=cfg.quality.bootstrap, seed=cfg.seed)
  q.tstr.update(synthetic=str(work / "classify" / GENERATED), real=str(work / "classify" / REAL), test=INTERNAL)
  rep = fidelity.run(q, work / "quality")
  return {"fidelity": rep["fidelity"]["all"], "conditional_accuracy": rep["conditional_accuracy"],
          "box_fidelity": rep["box_fidelity"], "encoder": rep["encoder"]}


def stage_audit(cfg, work: Path, data: dict, generated: dict) -> dict:
  a = privacy.default_config()
  # Non-members for calibration and the attack: the validation split (cases the diffusion model never saw).
  a.update(generated=generated["dataset"], train=data["dataset"], train_split=cfg.data.train_split,
           holdout_split=cfg.data.val_split, encoder=str(work / "classify" / REAL / "best"), seed=cfg.seed)
  a.mia.update(checkpoint=str(_model_dir(cfg, work) / "checkpoints"), max_per_group=cfg.audit.mia_per_group)
  rep = privacy.run(a, work / "audit")
  return {k: rep[k] for k in ("verdict", "n_flagged", "n_generated", "membership_inference", "spaces")}


# ------------------------------------------------------------------------------------------------ the run

def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
  if paths.is_remote(workdir):
    paths.local(workdir, "experiment workdir (it holds the converted and generated datasets)")
  work = Path(workdir).expanduser()
  work.mkdir(parents=True, exist_ok=True)
  if cfg.pretrained:
    cfg = adopt_pretrained(cfg, work)
  _check_same_config(cfg, work / "config.json")
  (work / "config.json").write_text(cfg.to_json(indent=1))
  rec = Record(work)
  unknown = set(cfg.skip) - {"quality", "audit"}
  if unknown:
    raise ValueError(f"skip takes quality and/or audit, got {sorted(unknown)}")
  try:
    return _run(cfg, work, rec)
  except Interrupted as e:
    print(f"experiment: {e} (a preemption notice); run the same command again to continue", flush=True)
    return {}


RERUN_KEYS = ("external", "external_split", "skip", "docs")   # may change between runs of one workdir


def _check_same_config(cfg, path: Path) -> None:
  """A workdir continues the run it holds: finished stages are reused, so any other change is an error."""
  if not path.exists():
    return

  def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": json.dumps(v)})
    return out

  a, b = flatten(json.loads(path.read_text())), flatten(json.loads(cfg.to_json()))
  changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k) and k.split(".")[0] not in RERUN_KEYS)
  if changed:
    raise ValueError(f"{path.parent} holds an experiment run with another config ({', '.join(changed[:8])}"
                     f"{' ...' if len(changed) > 8 else ''} differ); use a new --workdir, or the same settings "
                     "to continue it")


def _run(cfg, work: Path, rec: Record) -> dict:
  data = rec.run("data", stage_data, cfg, work)
  external = rec.run("external", stage_external, cfg, work)
  if set(external) != set(cfg.external.keys()):   # external sets added after the stage ran: redo the stage
    (rec.dir / "external.json").unlink()
    (rec.dir / "classify.json").unlink(missing_ok=True)
    external = rec.run("external", stage_external, cfg, work)
  last = rec.run("pretrain", stage_pretrain, cfg, work, data)
  prior = rec.run("box_prior", stage_box_prior, cfg, work, data)
  gen = rec.run("generate", stage_generate, cfg, work, data, prior)
  results = rec.run("classify", stage_classify, cfg, work, data, gen, external)
  quality = None if "quality" in cfg.skip else rec.run("quality", stage_quality, cfg, work, data, gen)
  audit = None if "audit" in cfg.skip else rec.run("audit", stage_audit, cfg, work, data, gen)
  t = time.time()
  summary = write_report(work, cfg, data, external, last, gen, results, quality, audit, rec.times)
  rec.times["report"] = time.time() - t
  print(f"experiment done ({sum(rec.times.values()) / 60:.1f} min of stages): {work / 'report.html'}")
  return summary


# ------------------------------------------------------------------------------------------------ the report

def _fmt_ci(r: dict) -> str:
  return f"{r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}]"


def summarise(cfg, work: Path, data, external, gen, results) -> dict:
  """Per test set, per arm: AUC, CI, DeLong against real; TSTR/TRTR, mixed - real; the scaling curve."""
  tests = {INTERNAL: {"dataset": data["dataset"], "split": cfg.data.test_split},
           **{n: {"dataset": e["dataset"], "split": e["split"]} for n, e in external.items()}}
  multiples = sorted(cfg.generate.multiples)
  out = {}
  for test, where in tests.items():
    dl = compare(work, cfg, results, test)
    per_arm = {}
    for arm, r in results.items():
      rep = r["tests"][test]
      per_arm[arm] = {k: rep[k] for k in ("auc", "auc_ci95", "balanced_accuracy", "sensitivity", "specificity",
                                          "ece", "n", "n_positive")}
      per_arm[arm]["sens_at_spec_0.9"] = rep["at_specificity_0.9"]["sensitivity"]
      if arm in dl:
        per_arm[arm]["delong_vs_real"] = {k: dl[arm][k] for k in ("difference", "se", "p_value")
                                          if k in dl[arm]} or dl[arm]
    real, g, mixed = (per_arm[a]["auc"] for a in (REAL, GENERATED, MIXED))
    scaling = [{"multiple": m, "n_generated": (results[scaling_arm(m)]["train"]["generated"][1]
                                              if m != multiples[-1] else gen["images"]),
                "auc": per_arm[scaling_arm(m) if m != multiples[-1] else GENERATED]["auc"],
                "auc_ci95": per_arm[scaling_arm(m) if m != multiples[-1] else GENERATED]["auc_ci95"]}
               for m in multiples]
    out[test] = {**where, "arms": per_arm, "tstr_over_trtr": g / real if real else float("nan"),
                 "mixed_minus_real": mixed - real, "scaling": scaling,
                 "real_auc": real}
  return out


def scaling_plot(path: Path, tests: dict, n_real: int) -> Path:
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=110)
  for i, (name, t) in enumerate(tests.items()):
    colour = f"C{i}"
    x = [s["n_generated"] for s in t["scaling"]]
    y = np.array([s["auc"] for s in t["scaling"]])
    lo = np.array([s["auc_ci95"][0] for s in t["scaling"]])
    hi = np.array([s["auc_ci95"][1] for s in t["scaling"]])
    ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", ms=4, capsize=3, color=colour,
                label=f"{name}: generated only")
    ax.axhline(t["real_auc"], ls="--", lw=1, color=colour, label=f"{name}: real only ({n_real} images)")
  ax.set(xscale="log", xlabel="generated training images", ylabel="test AUC",
         title="Data scaling: classifiers on generated images")
  ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
  return path


def device_sheets(work: Path, data: dict, gen: dict, cfg, n: int = 8) -> list[tuple[str, Path, Path]]:
  """(device, real sheet, generated sheet): n images per pathology of each device, real training vs generated."""
  real, fake = reader.open_dataset(data["dataset"]), reader.open_dataset(gen["dataset"])
  rl, gl = pipeline.scan_labels(real, cfg.data.train_split), pipeline.scan_labels(fake, "train")
  out = []
  for d in fake.vocab("device"):
    if d == "unknown" or d not in real.vocab("device"):
      continue
    picks = []
    for ds, labels in ((real, rl), (fake, gl)):
      idx = []
      for p in cfg.generate.pathology:
        if p not in ds.vocab("pathology"):
          continue
        sel = np.flatnonzero((labels["device"] == ds.vocab("device").index(d))
                             & (labels["pathology"] == ds.vocab("pathology").index(p)))
        idx += sel[:n].tolist()
      picks.append(idx)
    if not picks[0] or not picks[1]:
      continue
    slug = "".join(ch if ch.isalnum() else "_" for ch in d).strip("_")
    sheets = [inspect.contact_sheet(ds, work / "sheets" / f"{slug}_{kind}.png", split=split, indices=idx, tile=96)
              for ds, split, idx, kind in ((real, cfg.data.train_split, picks[0], "real"),
                                           (fake, "train", picks[1], "generated"))]
    out.append((d, *sheets))
  return out


def write_report(work: Path, cfg, data, external, last, gen, results, quality, audit, times) -> dict:
  tests = summarise(cfg, work, data, external, gen, results)
  (work / "sheets").mkdir(exist_ok=True)
  scaling = scaling_plot(work / "scaling.png", tests, gen["real_images"])
  sheets = device_sheets(work, data, gen, cfg)
  rocs = {}
  for test in tests:
    curves = {}
    for arm in (REAL, GENERATED, MIXED):
      curves[arm] = {**results[arm]["tests"][test]["roc_curve"], **tests[test]["arms"][arm]}
    rocs[test] = report.roc_plot(work / f"roc_{test}.png", curves, f"{test} test set")
  summary = {"preset": cfg.preset, "times_s": times, "data": data, "external": external,
             "diffusion": {"final": last, "steps": cfg.diffusion.num_steps, "image_size": cfg.diffusion.data.image_size,
                           "batch_size": cfg.diffusion.data.batch_size},
             "generated": {k: gen[k] for k in ("dataset", "images", "real_images")}, "tests": tests,
             "quality": quality, "audit": audit and {k: audit[k] for k in ("verdict", "n_flagged", "n_generated",
                                                                          "membership_inference")}}
  (work / "report.json").write_text(json.dumps(summary, indent=1, default=_json))
  md = markdown(cfg, summary, scaling, sheets, rocs)
  (work / "report.md").write_text(md)
  (work / "report.html").write_text(report.html_page("busgen-jax experiment", report.markdown_to_html(md, work)))
  if cfg.docs:
    report.write_section(Path(cfg.docs), tables(cfg, summary), BEGIN, END,
                         f"Generated by `busgen-jax experiment --config configs/experiment.py:{cfg.preset}`")
  return summary


def tables(cfg, s: dict) -> str:
  """The per-test-set tables (Markdown): the report's core, also written into docs."""
  lines = []
  for test, t in s["tests"].items():
    lines += [f"**{test}** (`{Path(t['dataset']).parent.name}/{t['split']}`, n = {t['arms'][REAL]['n']}, "
              f"{t['arms'][REAL]['n_positive']} {cfg.classifier.task.positive}): TSTR/TRTR "
              f"**{t['tstr_over_trtr']:.3f}**, real + generated − real **{t['mixed_minus_real']:+.3f}** AUC.", ""]
    rows = [["trained on", "AUC [95% CI]", "Δ vs real (DeLong p)", "balanced acc.", "sens. / spec. @0.5",
             "sens. @ spec. 0.9"]]
    for arm, r in t["arms"].items():
      d = r.get("delong_vs_real", {})
      delta = f"{d['difference']:+.3f} (p {d['p_value']:.2g})" if "p_value" in d else "–"
      rows.append([arm, _fmt_ci(r), delta, f"{r['balanced_accuracy']:.3f}",
                   f"{r['sensitivity']:.3f} / {r['specificity']:.3f}", f"{r['sens_at_spec_0.9']:.3f}"])
    lines += [report.markdown_table(rows), ""]
  times = ", ".join(f"{k} {v / 60:.1f}" for k, v in s["times_s"].items())
  lines += [f"Stage times (minutes): {times}; total {sum(s['times_s'].values()) / 60:.1f}.", ""]
  return "\n".join(lines)


def markdown(cfg, s: dict, scaling: Path, sheets, rocs) -> str:
  d, g, q, a = s["data"], s["generated"], s["quality"], s["audit"]
  dm = cfg.diffusion.model
  md = ["# busgen-jax experiment", "",
        f"Preset `{cfg.preset}`. Internal dataset `{d['dataset']}`: splits {d['splits']} (case-level; training on "
        f"`{cfg.data.train_split}`, checkpoint selection on `{cfg.data.val_split}`, testing on "
        f"`{cfg.data.test_split}`)." + (" External test sets: " + ", ".join(
            f"**{n}** (`{e['source']}`, {e['n']} images)" for n, e in s["external"].items()) + "."
            if s["external"] else " No external test set was given (`--config.external.NAME=PATH` adds one)."), "",
        "## Diffusion model and repository", "",
        (f"Data, diffusion model and box prior reused from the experiment in `{cfg.pretrained}`. "
         if cfg.pretrained else "") +
        f"BUSGen UNet (ch {dm.ch}, ch_mult {tuple(dm.ch_mult)}, {dm.num_res_blocks} res block(s), attention at "
        f"levels {tuple(dm.attn_levels)}) at {cfg.diffusion.data.image_size} px, {cfg.diffusion.num_steps} steps "
        f"of batch {cfg.diffusion.data.batch_size}, objective {cfg.diffusion.objective.prediction}; final loss "
        f"{s['diffusion']['final'].get('loss', float('nan')):.4f}. {g['images']} images generated "
        f"({g['images'] / g['real_images']:.2g}× the {g['real_images']} real training images) with DPM-Solver++ "
        f"({cfg.generate.sampler.method}, order {cfg.generate.sampler.order}, {cfg.generate.sampler.steps} steps), "
        f"guidance {cfg.generate.sampler.guidance_scale}, pathology × device in the training split's "
        f"proportions ({cfg.generate.proportions}), lesion boxes from the training split's box prior.", ""]
  if sheets:
    md += ["Real training images (left) and generated images (right) per device; each sheet holds "
           f"{' then '.join(cfg.generate.pathology)}.", ""]
    for dev, real, fake in sheets:
      md += [f"**{dev}**", "", f"![{dev} real]({real.relative_to(real.parents[1])}) "
                              f"![{dev} generated]({fake.relative_to(fake.parents[1])})", ""]
  md += ["## Classifiers per test set", "",
         f"{cfg.classifier.model.name} at {cfg.classifier.data.image_size} px, {cfg.classifier.num_steps} steps; "
         f"the checkpoint with the best validation AUC is tested. AUC 95% CIs are case-level bootstraps; DeLong's "
         "test compares each arm with real-only training on the same images. TSTR/TRTR is the AUC of the "
         "generated-only classifier over the real-only one.", "", tables(cfg, s)]
  md += [" ".join(f"![ROC {t}]({p.name})" for t, p in rocs.items()), "", "## Data scaling", "",
         "Classifiers on generated images only, on nested subsets of the repository; dashed: real only.", "",
         f"![scaling]({scaling.name})", ""]
  if q:
    f = q["fidelity"]
    ci = lambda r: f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]"
    md += ["## Quality", "", f"On the real-only classifier's features: FD {f['fd']['value']:.3g} {ci(f['fd'])}, "
           f"KID {f['kid']['value']:.3g} {ci(f['kid'])}, precision {f['precision']['value']:.3f}, recall "
           f"{f['recall']['value']:.3f}; conditional accuracy {q['conditional_accuracy']['generated']['accuracy']:.3f} "
           f"(real {q['conditional_accuracy']['real']['accuracy']:.3f}); box fidelity AUC "
           f"{q['box_fidelity']['generated']['auc']:.3f} (real {q['box_fidelity']['real']['auc']:.3f}). "
           "Per condition: `quality/quality.html`.", ""]
  if a:
    v, mia = a["verdict"], a["membership_inference"]
    md += ["## Privacy audit", "", f"**{'Safe to share' if v['safe_to_share'] else 'NOT safe to share'}** by the "
           f"default thresholds: {a['n_flagged']} of {a['n_generated']} images flagged as near-copies of training "
           "cases" + (f"; membership-inference AUC {mia['auc']:.3f} [{mia['auc_ci95'][0]:.3f}, "
                      f"{mia['auc_ci95'][1]:.3f}]" if mia else "") + ". Details: `audit/audit.html`.", ""]
  return "\n".join(md)
