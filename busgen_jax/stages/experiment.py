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

On several hosts every process runs the same command (the trainers and generation shard their work over all
of them); give `--config.data.dataset` (converted beforehand, e.g. by `busgen-jax convert` across hosts) on a
file system every host sees.

An external test set is any dataset by path: a converted dataset (its `external_split`, default "test"), or raw
data converted into DIR/external/NAME with every image in "test": a BUSI-style folder, a folder in BUS-BRA's
layout, or a manifest (.json: the official BUSGen dataset JSON or ours; .csv: our manifest columns).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import jax
import ml_collections
from absl import logging

from busgen_jax import checkpoint, generate, paths
from busgen_jax.stages import classify, fewshot
from busgen_jax.data import convert, pipeline, reader
from busgen_jax.data.sources import busi as busi_source
from busgen_jax.data import box_prior
from busgen_jax.evaluate import experiment_report, fidelity, privacy
from busgen_jax.evaluate.experiment_report import GENERATED, INTERNAL, MIXED, REAL, arm_dir, scaling_arm
from busgen_jax.train import classifier, diffusion


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
  # The real + generated arm: "mix" (one stream, `mixed_weight_generated` of it generated) or "finetune" (the
  # generated arm's classifier fine-tuned on the real training images, with `finetune_overrides`).
  c.mixed = "mix"
  c.mixed_weight_generated = 0.5          # share of generated images in the real + generated stream ("mix")
  c.finetune_overrides = ()               # "key=value" overrides of `classifier` for the "finetune" arm
  # "key=value" overrides of `classifier` for the arms that train on generated images (e.g. "num_steps=3000",
  # "data.ultrasound_augment=()"): the classifier recipe on generated data, the real arm untouched.
  c.generated_overrides = ()
  c.classifier_seed = -1                  # the classifiers' seed (init, data order, augmentations); -1: `seed`
  c.quality = ml_collections.ConfigDict({"conditions": ("pathology", "device"), "min_count": 10, "bootstrap": 100})
  c.audit = ml_collections.ConfigDict({"mia_per_group": 256})
  # Another experiment's run directory: its data, diffusion model and box prior are reused (and its data,
  # diffusion and box_prior settings replace these), so generation and classifier recipes can be varied alone.
  c.pretrained = ""
  # The few-shot arm (busgen_jax/stages/fewshot.py): adaptation to a site pretraining never saw; off while device is "".
  c.fewshot = fewshot.default_config()
  # Stages to leave out: "quality", "audit", or "generate" (the repository protocol: generate, classify, quality
  # and audit; e.g. for a few-shot run alone).
  c.skip = ()
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

  def run(self, name: str, fn, *args, valid=None, stale=()) -> dict:
    """fn(*args), or the recorded result. valid(result) False: the record predates a setting that may change
    between runs (RERUN_KEYS), so it and the records of `stale` (stages built on it) are dropped and fn reruns."""
    f = self.dir / f"{name}.json"
    if f.exists():
      done = json.loads(f.read_text())
      if valid is None or valid(done["result"]):
        self.times[name] = done["seconds"]
        logging.info("experiment: stage %s already done (%.0f s)", name, done["seconds"])
        return done["result"]
      logging.info("experiment: stage %s's record is stale: rerunning it", name)
      for x in (name, *stale):
        (self.dir / f"{x}.json").unlink(missing_ok=True)
    print(f"experiment: {name} ...", flush=True)
    t = time.time()
    result = fn(*args)
    self.times[name] = time.time() - t
    if jax.process_index() == 0:         # every host runs every stage (sharded inside); one writes the record
      f.write_text(json.dumps({"seconds": self.times[name], "result": result}, indent=1,
                              default=experiment_report.to_json))
    print(f"experiment: {name} done in {self.times[name]:.0f} s", flush=True)
    return result


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
  return {"dataset": str(ds_dir), "splits": ds.splits, "counts": pipeline.label_counts(ds, cfg.data.train_split)}


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
  """The diffusion model's run directory: this experiment's, or the `pretrained` experiment's; a pretrained run
  that itself reused a model lends that one (the chain of `pretrained` followed to the run that trained it)."""
  src, seen = (Path(cfg.pretrained).expanduser() if cfg.pretrained else work), set()
  while not (src / "diffusion").is_dir() and (src / "config.json").is_file() and src not in seen:
    seen.add(src)
    lent = json.loads((src / "config.json").read_text()).get("pretrained", "")
    if not lent:
      break
    src = Path(lent).expanduser()
  return src / "diffusion"


PRETRAINED_STAGES = ("data", "pretrain", "box_prior")


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
  """A config dict as {dotted key: its JSON}, so two configs compare key by key."""
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": json.dumps(v)})
  return out


def _differences(mine: dict, theirs: dict, prefix: str = "") -> list[str]:
  """The flattened keys where two config dicts (as JSON would store them) disagree."""
  a, b = _flat(mine, prefix), _flat(theirs, prefix)
  return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))


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
    if differ := _differences(cfg[key].to_dict(), old[key], f"{key}."):
      logging.warning("--config.pretrained=%s: its %s settings are used (the reused stages were made with them); "
                      "this config's differ at %s", src, key, ", ".join(differ[:8]) + (" ..." if differ[8:] else ""))
    cfg[key] = ml_collections.ConfigDict(old[key])
  (work / "stages").mkdir(parents=True, exist_ok=True)
  reuse = list(PRETRAINED_STAGES)
  # The repository too, when it would be generated the same way (the multiples may differ below its size).
  same = lambda a, b: json.loads(json.dumps(a)) == json.loads(json.dumps(b))
  g_new, g_old = cfg.generate.to_dict(), dict(old["generate"])
  if (src / "stages" / "generate.json").is_file() and cfg.seed == old["seed"] and \
      max(g_new.pop("multiples")) == max(g_old.pop("multiples")) and same(g_new, g_old):
    reuse.append("generate")
  for s in reuse:
    if not (work / "stages" / f"{s}.json").exists():
      (work / "stages" / f"{s}.json").write_text((src / "stages" / f"{s}.json").read_text())
  # The real-only classifier, when trained the same way: it restores at its last step and is only evaluated.
  real = work / "classify" / REAL
  if same(cfg.classifier.to_dict(), old["classifier"]) and classifier_seed(cfg) == classifier_seed(old) \
      and not real.exists() \
      and (src / "classify" / REAL / "best").is_dir():
    shutil.copytree(src / "classify" / REAL, real, ignore=shutil.ignore_patterns("eval", "events.*"))
  return cfg


def stage_pretrain(cfg, work: Path, data: dict, held_out: list[str]) -> dict:
  """Trains the diffusion model on the training split, without the devices `held_out` (a few-shot site's)."""
  d = ml_collections.ConfigDict(cfg.diffusion.to_dict())
  d.data.sources.real.update(path=data["dataset"], split=cfg.data.train_split)
  if held_out:   # the few-shot site's device: every other device of the dataset
    d.data.sources.real.filters.device = fewshot.kept_devices(data["dataset"], held_out)
  d.seed = cfg.seed
  last = diffusion.train(d, work / "diffusion")
  step, _ = checkpoint.load_meta(work / "diffusion" / "checkpoints")
  if step < d.num_steps:
    raise Interrupted(f"pretraining stopped at step {step} of {d.num_steps}")
  return {**last, "held_out_devices": held_out}


def stage_box_prior(cfg, work: Path, data: dict, held_out: list[str]) -> dict:
  """Lesion boxes of the training split, without the devices pretraining left out: the few-shot site's boxes are
  not the corpus's (its repositories sample this prior's per-pathology groups with fewshot.box_prior=pretraining)."""
  prior = box_prior.fit_datasets([data["dataset"]], cfg.data.train_split, exclude_devices=held_out,
                                 **cfg.box_prior.to_dict())
  return {"path": str(prior.save(work / "box_prior.json")), "held_out_devices": held_out}


def stage_generate(cfg, work: Path, data: dict, prior: dict, held_out: list[str]) -> dict:
  # the training split's counts without the devices the model never saw
  counts = {p: {d: n for d, n in per.items() if d not in held_out} for p, per in data["counts"].items()}
  n_real = sum(n for p in cfg.generate.pathology for n in counts.get(p, {}).values())
  total = int(round(max(cfg.generate.multiples) * n_real))
  conds = generate.proportional_conditions(counts, cfg.generate.pathology, total, cfg.generate.proportions)
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

MIXED_RECIPES = ("mix", "finetune")


def arms(cfg, n_real: int, n_generated: int) -> dict[str, dict]:
  """arm -> {"real": weight or None, "generated": (weight, limit) or None, optional "init": the arm whose
  classifier it fine-tunes (trained before it)}; limit 0 = all generated images."""
  if cfg.mixed not in MIXED_RECIPES:
    raise ValueError(f"mixed must be one of {MIXED_RECIPES}, got {cfg.mixed!r}")
  mixed = ({"real": 1.0 - cfg.mixed_weight_generated, "generated": (cfg.mixed_weight_generated, 0)}
           if cfg.mixed == "mix" else {"real": 1.0, "generated": None, "init": GENERATED})
  out = {REAL: {"real": 1.0, "generated": None}, GENERATED: {"real": None, "generated": (1.0, 0)}, MIXED: mixed}
  for m in sorted(cfg.generate.multiples)[:-1]:
    out[scaling_arm(m)] = {"real": None, "generated": (1.0, min(n_generated, int(round(m * n_real))))}
  return out


def classifier_config(cfg, arm: dict, data: dict, generated: dict, external: dict, init: str = ""
                      ) -> ml_collections.ConfigDict:
  """The classifier of one arm; `init`: the saved classifier it fine-tunes (the arm's "init", trained)."""
  k = ml_collections.ConfigDict(cfg.classifier.to_dict())
  if arm["generated"] is not None:
    k = classifier.with_overrides(k, cfg.generated_overrides, "generated_overrides")
  if init:
    k = classifier.with_overrides(k, cfg.finetune_overrides, "finetune_overrides")
    k.init = init
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
  k.seed = classifier_seed(cfg)
  return k


def classifier_seed(cfg) -> int:
  """The classifiers' seed of a config (or a saved config.json's dict, which may predate `classifier_seed`)."""
  own = cfg.get("classifier_seed", -1)
  return cfg["seed"] if own < 0 else own


def stage_classify(cfg, work: Path, data: dict, generated: dict, external: dict) -> dict:
  """arm -> test set -> report (without curves); predictions stay in classify/<arm>/eval/."""
  out = {}
  n_real = generated["real_images"]
  for name, arm in arms(cfg, n_real, generated["images"]).items():
    t = time.time()
    init = str(work / "classify" / arm_dir(arm["init"]) / "best") if arm.get("init") else ""
    res = classify.run(classifier_config(cfg, arm, data, generated, external, init),
                       work / "classify" / arm_dir(name))
    if not res:
      raise Interrupted(f"the {name!r} classifier stopped early")
    out[name] = {"seconds": time.time() - t, "train": arm, "tests": res}
    # The validation AUC (what selected the checkpoint); test figures wait for the report, read once.
    print(f"experiment:   {name}: validation AUC {(res[INTERNAL].get('best') or {}).get('value', float('nan')):.3f}",
          flush=True)
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
  work = paths.local(workdir, "experiment workdir (it holds the converted and generated datasets)")
  work.mkdir(parents=True, exist_ok=True)
  if cfg.pretrained:
    cfg = adopt_pretrained(cfg, work)
  _check_same_config(cfg, work / "config.json")
  (work / "config.json").write_text(cfg.to_json(indent=1))
  rec = Record(work)
  unknown = set(cfg.skip) - {"quality", "audit", "generate"}
  if unknown:
    raise ValueError(f"skip takes quality, audit and/or generate, got {sorted(unknown)}")
  try:
    return _run(cfg, work, rec)
  except Interrupted as e:
    print(f"experiment: {e} (a preemption notice); run the same command again to continue", flush=True)
    return {}


# May change between runs of one workdir (a key or a whole group): finished stages stay valid.
RERUN_KEYS = ("external", "external_split", "skip", "docs", "fewshot.k", "fewshot.draws")


def _check_same_config(cfg, path: Path) -> None:
  """A workdir continues the run it holds: finished stages are reused, so any other change is an error."""
  if not path.exists():
    return

  a, b = _flat(json.loads(path.read_text())), _flat(json.loads(cfg.to_json()))
  # Keys the saved config lacks are settings added since (an older busgen-jax wrote it): not a change.
  free = lambda k: any(k == r or k.startswith(r + ".") for r in RERUN_KEYS)
  changed = sorted(k for k in a if a[k] != b.get(k) and not free(k))
  if changed:
    raise ValueError(f"{path.parent} holds an experiment run with another config ({', '.join(changed[:8])}"
                     f"{' ...' if len(changed) > 8 else ''} differ); use a new --workdir, or the same settings "
                     "to continue it")


def run_fewshot(cfg, work: Path, rec: Record, data: dict, external: dict, held_out: list[str], prior: str
                ) -> tuple[dict, str]:
  """The few-shot arm: the site stage, then one stage per (k, draw); its summary and report section. prior: the
  pretraining corpus's box prior (the site's device left out)."""
  wanted = {f"k{k}_d{d}" for k in cfg.fewshot.k for d in range(cfg.fewshot.draws)}
  # k or draws added since: the site is drawn again (the same seeds give the same draws).
  covers = lambda s: wanted <= set(s["draws"]) | {f"k{k}_d{d}" for k in s["skipped"] for d in range(cfg.fewshot.draws)}
  site = rec.run("fewshot_site", fewshot.stage_site, cfg, work, data, valid=covers)

  def one(key):
    out = fewshot.run_draw(cfg, work, site, key, _model_dir(cfg, work), data, external, prior)
    if out is None:
      raise Interrupted(f"few-shot {key} stopped early")
    return out

  # In the site stage's order (fewshot.k's, then draw): k8 before k16, as the report and its stage times read.
  draws = {key: rec.run(f"fewshot_{key}", one, key) for key in site["draws"] if key in wanted}
  summary = {**fewshot.summarise(site, draws), "held_out": bool(held_out)}
  return summary, fewshot.markdown(cfg, summary, work)


def _run(cfg, work: Path, rec: Record) -> dict:
  data = rec.run("data", stage_data, cfg, work)
  # External sets added since: convert them, and test the classifiers on them.
  external = rec.run("external", stage_external, cfg, work, valid=lambda r: set(r) == set(cfg.external.keys()),
                     stale=("classify",))
  held_out = fewshot.held_out_devices(cfg, data["dataset"])
  last = rec.run("pretrain", stage_pretrain, cfg, work, data, held_out)
  missing = set(held_out) - set(last.get("held_out_devices", ()))
  if missing:
    raise ValueError(f"the diffusion model (in {_model_dir(cfg, work)}) was pretrained on the few-shot site's device "
                     f"{sorted(missing)}: pretrain with fewshot.device set, or give another --config.pretrained")
  # A prior fitted before the site's device was left out is refitted (seconds).
  prior = rec.run("box_prior", stage_box_prior, cfg, work, data, held_out,
                  valid=lambda r: set(held_out) <= set(r.get("held_out_devices", ())))
  gen = results = quality = audit = None
  if "generate" not in cfg.skip:
    gen = rec.run("generate", stage_generate, cfg, work, data, prior, held_out)
    results = rec.run("classify", stage_classify, cfg, work, data, gen, external)
    quality = None if "quality" in cfg.skip else rec.run("quality", stage_quality, cfg, work, data, gen)
    audit = None if "audit" in cfg.skip else rec.run("audit", stage_audit, cfg, work, data, gen)
  few = run_fewshot(cfg, work, rec, data, external, held_out, prior["path"]) if fewshot.enabled(cfg) else None
  t = time.time()
  summary = experiment_report.write(work, cfg, data, external, last, gen, results, quality, audit, rec.times, few)
  rec.times["report"] = time.time() - t
  print(f"experiment done ({sum(rec.times.values()) / 60:.1f} min of stages): {work / 'report.html'}")
  return summary


OPEN_KEYS = ("external",)   # --config.external.NAME=PATH: any number of external test sets


def main(cfg: ml_collections.ConfigDict, workdir: str, argv) -> None:
  s = run(cfg, workdir)
  for test, t in s.get("tests", {}).items():
    print(f"{test}: " + ", ".join(f"{arm} {r['auc']:.3f}" for arm, r in t["arms"].items())
          + f"; TSTR/TRTR {t['tstr_over_trtr']:.3f}, mixed - real {t['mixed_minus_real']:+.3f}")
