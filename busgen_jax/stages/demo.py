"""`busgen-jax demo --workdir DIR`: the end-to-end job on the built-in phantom data.

  convert the phantom corpus (several devices) -> fit lesion-box priors -> pretrain a tiny BUSGen on pathology
  labels -> sample a labelled synthetic repository -> train classifiers on real only, generated only, and real +
  generated -> evaluate each on the held-out real test split;
  then few-shot: a new site (a phantom scanner the corpus never had, its own patients) -> k shots per class ->
  LoRA adaptation with a new device row -> the site's repositories from the adapted and the un-adapted model ->
  classifiers on the shots, shots + un-adapted, shots + adapted, adapted alone -> the site's test images (the
  experiment's few-shot arm, stages/fewshot.py, one draw) -> DIR/report.html and DIR/report.md

Every stage writes under DIR and resumes: running the command again after an interruption continues where
it stopped (conversion, training and generation skip finished work; classifiers resume from checkpoints).
`--config configs/demo.py:scale=full` runs the same job at accelerator scale.
"""

from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path

import ml_collections
import numpy as np
from absl import logging

from busgen_jax.data import convert, inspect, reader
from busgen_jax.data import box_prior
from busgen_jax.diffusion import samplers
from busgen_jax.evaluate import demo_docs, fidelity, metrics, privacy, report
from busgen_jax import console, generate, paths as paths_lib
from busgen_jax.stages import classify, fewshot
from busgen_jax.train import adapt, classifier, diffusion

VARIANTS = ("real", "generated", "mixed")


def default_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  """scale: "cpu" (about 7 minutes on 2 cores), "ci" (a reduced run for the test suite), "full" (accelerators)."""
  c = ml_collections.ConfigDict()
  c.scale = scale
  c.data = convert.default_config()
  c.data.format = "phantom"
  c.data.phantom.num_examples = 1200
  c.data.phantom.size = 64
  c.data.image.size = 64
  c.data.examples_per_shard = 512
  c.data.split.fractions = {"train": 0.7, "val": 0.1, "test": 0.2}

  d = diffusion.default_config()
  d.num_steps, d.log_every, d.checkpoint_every, d.sample_every = 200, 25, 100, 0
  d.data.image_size, d.data.batch_size = 32, 16
  d.data.balance = "subsample"
  d.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, num_groups=8, attn_levels=(1,), num_pathology=4,
                 num_devices=7, dropout=0.0)
  d.optim.update(lr=2e-3, warmup_steps=20, ema_decay=0.98)
  c.diffusion = d

  c.generate = ml_collections.ConfigDict({
      "num_per_class": 150,            # generated images per pathology (spread over the devices)
      "per_device_batch": 50, "local_devices": 0})   # 0: every device of the host
  # DPM-Solver++ 2M, 8 steps (the last first order), guidance only where 0.3 < sigma/alpha <= 3: 12 evaluations
  # per image (the sampler study's choice on BUS-BRA's validation fold, docs/SAMPLING.md). The cpu experiment
  # preset has since widened the interval to <= 8 for its lesion layout; the demo's phantom was not re-decided.
  c.generate.sampler = generate.default_config().sampler
  c.generate.sampler.update(method="multistep", order=2, steps=8, guidance_scale=2.8, guidance_interval=(0.3, 3.0))

  k = classifier.default_config()
  k.num_steps, k.log_every, k.eval_every, k.checkpoint_every = 120, 20, 40, 40
  k.data.image_size, k.data.batch_size = 32, 32
  k.data.ultrasound_augment = ()
  k.model.name = "resnet_tiny"
  k.optim.update(lr=3e-3, warmup_steps=15)
  k.n_bootstrap = 1000
  k.eval_batch_size = 128
  c.classifier = k
  c.mixed_weight_generated = 0.5     # share of generated images in the mixed training stream

  # 5. few-shot adaptation to a new site: a scanner the corpus never had (its own patients, seed 1), k shots per
  # class; the experiment's few-shot arm (stages/fewshot.py), one draw
  c.site = ml_collections.ConfigDict({"num_examples": 400, "seed": 1, "first_device": 3, "num_devices": 1})
  f = fewshot.default_config()
  f.update(device="all", k=(16,), draws=1, generated_per_class=150)
  f.adapt.update(num_steps=200, eval_every=50, log_every=50, checkpoint_every=100)
  f.adapt.lora.update(rank=8, dropout=0.05)
  f.adapt.optim.lr = 5e-3          # 2e-3 for 120 steps barely moved the validation loss (0.066 -> 0.059)
  # The base model's pathology rows barely change its predictions (scored as a classifier on its own validation
  # images: 55% right), so a repository's class signal is its lesion boxes. The shots give 16 shapes per class;
  # the corpus gives 840 (site validation AUC of the adapted arm 0.518 -> 0.643, README).
  f.box_prior = "pretraining"
  c.fewshot = f
  # 6. quality (FD/KID/precision/recall per condition, conditioning) and the privacy audit of the repository
  c.quality = ml_collections.ConfigDict({"conditions": ("pathology", "device"), "min_count": 10, "bootstrap": 100})
  c.audit_mia_per_group = 256
  c.audit_pixel_scales = ()          # () keeps the audit's own crop scales (privacy.default_config)
  c.docs = ""                        # a Markdown file whose demo section (between the markers) to rewrite

  if scale == "ci":
    c.data.phantom.num_examples = 240
    c.diffusion.num_steps, c.diffusion.checkpoint_every, c.diffusion.log_every = 6, 6, 3
    c.diffusion.data.image_size = 16
    c.diffusion.model.update(ch=16, num_groups=4, ch_mult=(1,), attn_levels=(0,))   # one resolution: 1/3 the compile
    c.generate.num_per_class, c.generate.sampler.steps, c.generate.per_device_batch = 16, 3, 8
    c.generate.local_devices = 1       # the tests simulate 8 CPU devices; 32 images fill one
    c.classifier.num_steps, c.classifier.eval_every, c.classifier.checkpoint_every = 10, 5, 5
    c.classifier.data.image_size, c.classifier.data.batch_size = 16, 16
    c.classifier.n_bootstrap = 100
    c.site.num_examples = 96
    c.fewshot.update(k=(4,), val_fraction=0.25, min_test_per_class=2, generated_per_class=8)
    c.fewshot.adapt.update(num_steps=4, eval_every=2, log_every=2, checkpoint_every=4)
    c.fewshot.adapt.data.batch_size = 8
    c.fewshot.adapt.lora.rank = 2
    c.quality.update(conditions=("pathology",), min_count=4, bootstrap=10)
    c.audit_mia_per_group = 32
    c.audit_pixel_scales = (0.7, 0.85, 1.0)   # a third of the alignment programs (the audit: 26 s -> 17 s)
  elif scale == "full":
    c.data.phantom.num_examples = 20000
    c.data.phantom.size = c.data.image.size = 128
    c.diffusion.num_steps, c.diffusion.checkpoint_every = 20000, 2000
    c.diffusion.data.image_size, c.diffusion.data.batch_size = 128, 128
    c.diffusion.model.update(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, num_groups=32, attn_levels=(2, 3),
                             dropout=0.1, dtype="bfloat16")
    c.diffusion.optim.update(lr=2e-4, warmup_steps=500, ema_decay=0.9999)
    c.generate.update(num_per_class=5000, per_device_batch=64)
    c.generate.sampler.update(steps=50, method="singlestep", order=3, guidance_interval=())   # the official sampler
    c.classifier.num_steps, c.classifier.eval_every, c.classifier.checkpoint_every = 5000, 500, 500
    c.classifier.data.image_size, c.classifier.data.batch_size = 128, 128
    c.classifier.model.name = "resnet18"
    c.classifier.data.ultrasound_augment = ("gain", "speckle", "depth_attenuation")
    c.site.num_examples = 4000
    c.fewshot.update(k=(64,), draws=3, generated_per_class=5000)
    c.fewshot.adapt.update(num_steps=3000, eval_every=250, checkpoint_every=500)
    c.fewshot.adapt.data.batch_size = 64
    c.fewshot.adapt.lora.rank = 16
    c.fewshot.adapt.optim.lr = 5e-4
  elif scale != "cpu":
    raise ValueError(f"demo scale must be cpu, ci or full, got {scale!r}")
  return c


# ------------------------------------------------------------------------------------------------ stages

def _classifier_config(cfg, real: Path, generated: Path, variant: str) -> ml_collections.ConfigDict:
  """variant: real | generated | mixed."""
  k = ml_collections.ConfigDict(cfg.classifier.to_dict())
  src = dict(k.data.sources.real.to_dict())
  sources = {}
  if variant in ("real", "mixed"):
    sources["real"] = {**src, "path": str(real), "split": "train",
                       "weight": 1.0 - (cfg.mixed_weight_generated if variant == "mixed" else 0.0)}
  if variant in ("generated", "mixed"):
    sources["generated"] = {**src, "path": str(generated), "split": "train",
                            "weight": cfg.mixed_weight_generated if variant == "mixed" else 1.0}
  k.data.sources = sources
  k.data.device_vocab = ()
  k.val.path = str(real)               # selection and testing on real data only
  k.test = {"real_test": {"path": str(real), "split": "test"}}
  return k


def _grid(ds_dir: Path, split: str, per_class: int, size: int) -> list[tuple[str, np.ndarray]]:
  """The first images of each pathology of a split, resized to `size`."""
  from busgen_jax.data import transforms
  ds = reader.open_dataset(ds_dir)
  names = ds.vocab("pathology")
  src = ds.source(split)
  rows = []
  for wanted in ("benign", "malignant"):
    ims = []
    for i in range(len(src)):
      ex = src[i]
      if names[ex["pathology"]] == wanted:
        ims.append(transforms.resize(np.ascontiguousarray(ex["image"][..., 0]), size))
        if len(ims) == per_class:
          break
    rows.append((wanted, np.concatenate(ims, 1) if ims else np.zeros((size, size), np.uint8)))
  return rows


def _comparison_sheet(path: Path, datasets: list[tuple[str, Path, str]], size: int = 48, n: int = 8) -> Path:
  """One row per class of each (label, dataset, split): its first `n` images."""
  from PIL import Image
  rows = [(f"{label} {k}", im) for label, ds_dir, split in datasets for k, im in _grid(ds_dir, split, n, size)]
  width = max(im.shape[1] for _, im in rows)
  sheet = np.zeros((len(rows) * (size + 4), width), np.uint8)
  for r, (_, im) in enumerate(rows):
    sheet[r * (size + 4): r * (size + 4) + size, :im.shape[1]] = im
  Image.fromarray(sheet).save(path)
  return path


def run(cfg: ml_collections.ConfigDict, workdir: str) -> Path:
  work = paths_lib.local(workdir, "demo's run directory (it converts and generates datasets into it)")
  work.mkdir(parents=True, exist_ok=True)
  times = {}
  step = functools.partial(_step, times)

  # 1. data
  with step("convert"):
    with cfg.unlocked():
      cfg.data.output = str(work / "data")
    ds_dir = convert.run(cfg.data)
    ds = reader.open_dataset(ds_dir)
    summary = inspect.summarize(ds)
    sheet = inspect.contact_sheet(ds, work / "contact_sheet.png")

  # 2. box prior, 3. the diffusion model
  with step("diffusion"):
    prior_path = box_prior.fit_datasets([str(ds_dir)]).save(work / "box_prior.json")
    dcfg = ml_collections.ConfigDict(cfg.diffusion.to_dict())
    dcfg.data.sources.real.path = str(ds_dir)
    last = diffusion.train(dcfg, work / "diffusion")

  # 4. the synthetic repository
  with step("generate"):
    g = sample_config(cfg, ds, str(work / "diffusion" / "checkpoints"), str(prior_path))
    gen_dir = generate.generate(g, work / "generated")

  # 5. classifiers, 6. evaluation on the held-out real split
  results, preds = {}, {}
  for variant in VARIANTS:
    with step(f"classify_{variant}"):
      res = classify.run(_classifier_config(cfg, ds_dir, gen_dir, variant), work / "classify" / variant)
      results[variant] = res["real_test"]
      with np.load(work / "classify" / variant / "eval" / "real_test.predictions.npz") as z:
        preds[variant] = {k: z[k] for k in z.files}

  # 6b. how faithful and how private the repository is: the quality report and the privacy audit
  assessment = assess(cfg, work, ds_dir, gen_dir, times)

  # 7. few-shot adaptation to a new site: its k shots -> LoRA -> the site's repositories -> four classifiers
  with step("new_site"):
    fcfg = fewshot_config(cfg, convert_site(cfg, work))
    data = {"dataset": str(ds_dir)}
    site = fewshot.stage_site(fcfg, work, data)
  key = next(iter(site["draws"]))
  with console.stage(f"demo: few-shot {key}"):
    draw = fewshot.run_draw(fcfg, work, site, key, work / "diffusion", data, {}, str(prior_path))
  if draw is None:
    raise RuntimeError(f"the few-shot trainers stopped early (a preemption notice): run the demo again on {work} "
                       "to continue")
  times.update({f"fewshot {name}": t for name, t in draw["times_s"].items()})
  adaptation = {"site": site, "key": key, "draw": draw, "config": fcfg}

  t = time.time()
  paths = write_report(work, cfg, summary, sheet, ds_dir, gen_dir, last, results, preds, times, adaptation,
                       assessment)
  logging.info("demo report: %s", paths["html"])
  total = sum(times.values()) + time.time() - t
  if cfg.docs:
    demo_docs.write(cfg.docs, json.loads(paths["json"].read_text()), total, workdir)
  print(f"demo done in {total:.0f}s: {paths['html']} and {paths['md']}")
  return work


def convert_site(cfg, work: Path) -> Path:
  """The new site's images: phantom scanners the corpus never had (`cfg.site`), its own patients."""
  sc = ml_collections.ConfigDict(cfg.data.to_dict())
  sc.phantom.update(cfg.site.to_dict())
  sc.update(name="phantom_site", output=str(work / "site_data"))
  return convert.run(sc)


def fewshot_config(cfg, site_dir: Path) -> ml_collections.ConfigDict:
  """The experiment-shaped config that the few-shot arm (stages/fewshot.py) reads, from the demo's."""
  f = ml_collections.ConfigDict(cfg.fewshot.to_dict())
  f.dataset = str(site_dir)
  g = cfg.generate
  return ml_collections.ConfigDict({
      "seed": 0, "fewshot": f, "classifier": cfg.classifier.to_dict(),
      "generate": {"pathology": tuple(cfg.classifier.task.classes), "per_device_batch": g.per_device_batch,
                   "local_devices": g.local_devices, "sampler": g.sampler.to_dict()}})


@contextlib.contextmanager
def _step(times: dict, key: str):
  """One console line per demo step, and its time into `times` (the report's table)."""
  t = time.time()
  with console.stage(f"demo: {key}"):
    yield
  times[key] = time.time() - t


def sample_config(cfg, ds: reader.Dataset, checkpoint_dir: str, box_prior_path: str) -> ml_collections.ConfigDict:
  """The demo's generation config: the pretrained model's repository, pathology x device."""
  devices = [d for d in ds.vocab("device") if d != "unknown"]
  g = generate.default_config()
  g.update(checkpoint=checkpoint_dir, device=("all",), box_prior=box_prior_path, name="phantom_generated",
           num_per_condition=max(1, cfg.generate.num_per_class // max(1, len(devices))), examples_per_shard=256,
           per_device_batch=cfg.generate.per_device_batch, local_devices=cfg.generate.local_devices)
  g.sampler.update(cfg.generate.sampler.to_dict())
  return g


def quality_config(work: str | Path) -> ml_collections.ConfigDict:
  """`busgen-jax quality` on a demo workdir's repository: the real-data classifier as the encoder, the demo's
  classifiers for TSTR / TRTR."""
  work = Path(work)
  q = fidelity.default_config()
  q.update(real=str(work / "data" / "phantom" / "1.0.0"), encoder=str(work / "classify" / "real" / "best"),
           generated=str(work / "generated" / "data" / "phantom_generated" / "1.0.0"))
  q.tstr.update(synthetic=str(work / "classify" / "generated"), real=str(work / "classify" / "real"))
  return q


def audit_config(work: str | Path) -> ml_collections.ConfigDict:
  """`busgen-jax audit` on a demo workdir's repository, with membership inference on its diffusion model."""
  q = quality_config(work)
  a = privacy.default_config()
  a.update(generated=q.generated, train=q.real, encoder=q.encoder)
  a.tstr = q.tstr
  a.mia.checkpoint = str(Path(work) / "diffusion" / "checkpoints")
  return a


def assess(cfg, work: Path, ds_dir: Path, gen_dir: Path, times: dict) -> dict:
  """`busgen-jax quality` and `busgen-jax audit` on the generated repository."""
  with _step(times, "quality"):
    q = quality_config(work)
    q.update(real=str(ds_dir), generated=str(gen_dir), conditions=tuple(cfg.quality.conditions),
             min_count=cfg.quality.min_count, bootstrap=cfg.quality.bootstrap)
    quality = fidelity.run(q, work / "quality")
  with _step(times, "audit"):
    a = audit_config(work)
    a.update(generated=str(gen_dir), train=str(ds_dir))
    a.mia.max_per_group = cfg.audit_mia_per_group
    if cfg.audit_pixel_scales:
      a.pixel.scales = tuple(cfg.audit_pixel_scales)
    audit = privacy.run(a, work / "audit")
  return {"quality": quality, "audit": audit}


# ------------------------------------------------------------------------------------------------ the report

def _delong(preds, classes, positive, variants=VARIANTS) -> dict:
  """DeLong's test of each variant against the first (real-only training), on the same test images."""
  pos = list(classes).index(positive)
  out = {}
  for v in variants[1:]:
    a, b = preds[v], preds[variants[0]]
    if not np.array_equal(a["labels"], b["labels"]):   # same images in the same order, or no paired test
      continue
    try:
      out[v] = metrics.delong((a["labels"] == pos).astype(int), a["probs"][:, pos], b["probs"][:, pos])
    except ValueError:
      pass
  return out


def _delong_rows(delong: dict, against: str) -> list[list[str]]:
  rows = [["comparison", "AUC difference", "95% CI of the difference", "p (DeLong)"]]
  for v, d in delong.items():
    rows.append([f"{v} − {against}", f"{d['difference']:+.3f}",
                 f"[{d['difference'] - 1.96 * d['se']:+.3f}, {d['difference'] + 1.96 * d['se']:+.3f}]",
                 f"{d['p_value']:.3g}"])
  return rows


def _fewshot_section(work: Path, cfg, adaptation: dict) -> tuple[tuple, list, dict]:
  """Section 5 (the new site): its text and images, its tables, and its part of report.json."""
  site, key, draw, fcfg = (adaptation[k] for k in ("site", "key", "draw", "config"))
  summary = json.loads((fewshot.draw_dir(work, key) / "adapt" / adapt.SUMMARY).read_text())
  reps, preds = {}, {}
  for arm in fewshot.ARMS:
    out = fewshot.classifier_dir(work, key, arm) / "eval"
    reps[arm] = json.loads((out / f"{fewshot.SITE}.json").read_text())
    with np.load(out / f"{fewshot.SITE}.predictions.npz") as z:
      preds[arm] = {k: z[k] for k in z.files}
  classes, positive = list(cfg.classifier.task.classes), cfg.classifier.task.positive
  delong = _delong(preds, classes, positive, fewshot.ARMS)
  repos = draw["repositories"]
  sheet = _comparison_sheet(work / "site_real_vs_generated.png", [
      ("site", site["dataset"], fewshot.SITE), ("adapted", repos["adapted"], "train"),
      ("un-adapted", repos["base"], "train")])
  roc = report.roc_plot(work / "roc_site.png", {arm: {**reps[arm]["roc_curve"], **reps[arm]} for arm in fewshot.ARMS},
                        f"the new site's test images ({site['device']})")
  device = reader.open_dataset(site["dataset"]).vocab("device")[1:]
  d = site["draws"][key]
  n_gen = reader.open_dataset(repos["adapted"]).report["converted"]
  text = [
      f"The new site is a scanner the pretraining corpus never had ({', '.join(device)}), with its own patients: "
      f"{site['n']} images of {site['cases']} cases {site['counts']}, converted to `{site['source']}`. A fixed "
      f"validation set of its cases ({site['val_counts']}) selects the adapters and every classifier; "
      f"**{d['k']} shots per class** (whole cases) are the only labelled images of the site any model sees; the "
      f"test images are the site's other {len(d['test'])}.",
      f"LoRA adapters (rank {fcfg.fewshot.adapt.lora.rank}, {summary['adapter_params']:,} parameters = "
      f"{100 * summary['adapter_params'] / summary['frozen_params']:.1f}% of the frozen "
      f"{summary['frozen_params']:,}) and a new device row for the scanner were trained on the shots for "
      f"{fcfg.fewshot.adapt.num_steps} steps; the validation denoising loss went from {summary['val_loss_start']:.4f} "
      f"to {summary['val_loss_best']:.4f} (step {summary['best_step']}). Each repository holds {n_gen} images with "
      "lesion boxes from a prior fitted on the shots: one from the adapted model (the new scanner's row), one from "
      "the un-adapted model (the null device row). Rows of the sheet: the site's real benign and malignant images, "
      "then the adapted and the un-adapted model's.",
      f"Classifiers ({positive} positive) on the shots alone, shots + un-adapted, shots + adapted (the shots "
      f"{fcfg.fewshot.shots_weight:.0%} of the stream) and the adapted repository alone; tested on the site's test "
      "images."]
  section = (f"5. Few-shot adaptation to a new site: {', '.join(device)}", text,
             [(sheet, "new site: real vs generated", 640), (roc, "ROC (new site)", None)])
  tables = [report.binary_rows({f"trained on {arm}": reps[arm] for arm in fewshot.ARMS}), _delong_rows(delong, "shots")]
  keys = ("auc", "auc_ci95", "balanced_accuracy", "sensitivity", "specificity", "ece", "n")
  out = {"summary": summary, "site": {k: site[k] for k in ("source", "dataset", "n", "cases", "counts", "val_counts")},
         "device": device, "shots_per_class": d["k"], "repositories": repos, "images": n_gen,
         "classifiers": {arm: {k: reps[arm][k] for k in keys} for arm in fewshot.ARMS}, "delong": delong}
  return section, tables, out


def write_report(work: Path, cfg, summary, sheet, ds_dir, gen_dir, last_diffusion, results, preds, times,
                 adaptation: dict | None = None, assessment: dict | None = None) -> dict:
  import html as _html
  conv = reader.open_dataset(ds_dir).report
  gen = reader.open_dataset(gen_dir).report
  comparison = _comparison_sheet(work / "real_vs_generated.png", [("real", ds_dir, "train"),
                                                                   ("generated", gen_dir, "train")])
  curves = {v: {**results[v]["roc_curve"], **results[v]} for v in VARIANTS}
  roc = report.roc_plot(work / "roc.png", curves, "held-out real test split")
  cal = report.reliability_plot(work / "calibration.png", results, "calibration")
  delong = _delong(preds, cfg.classifier.task.classes, cfg.classifier.task.positive)
  tables = {"4.": [report.binary_rows({f"trained on {v}": results[v] for v in VARIANTS}),
                   _delong_rows(delong, "real")]}
  tstr = results["generated"]["auc"] / results["real"]["auc"] if results["real"]["auc"] else float("nan")
  n_test = results["real"]["n"]
  timing = ", ".join(f"{k} {v:.0f}s" for k, v in times.items())
  sections = [  # (title, paragraphs, images); Markdown subset: **bold**, `code`
      (f"1. Data: {conv['inputs']} phantom images",
       [f"`{ds_dir}`: {conv['converted']} converted, {conv['rejected']} rejected; splits "
        f"{conv['counts']['split']} (case-level, no case in two splits: overlaps "
        f"{summary['case_overlap_between_splits']})."], [(sheet, "contact sheet", 640)]),
      ("2. Diffusion model",
       [f"A {cfg.diffusion.model.ch}-channel BUSGen UNet at {cfg.diffusion.data.image_size} px, "
        f"{cfg.diffusion.num_steps} steps of batch {cfg.diffusion.data.batch_size}; final loss "
        f"{last_diffusion.get('loss', float('nan')):.4f}."], []),
      (f"3. Generated repository: {gen['converted']} images",
       [f"`{gen_dir}`: {samplers.describe(cfg.generate.sampler)}, lesion boxes from the fitted box prior; "
        f"per-condition sheets in `{Path(gen_dir) / 'sheets'}`.",
        "Rows: real benign, real malignant, generated benign, generated malignant."],
       [(comparison, "real vs generated", 640)]),
      ("4. Classifiers on the held-out real test split", [], [(roc, "ROC", None), (cal, "calibration", None)]),
  ]
  adapt_json = None
  if adaptation:
    section, tables["5."], adapt_json = _fewshot_section(work, cfg, adaptation)
    sections.append(section)
  if assessment:
    q, a = assessment["quality"], assessment["audit"]
    qa, cond, box = q["fidelity"]["all"], q["conditional_accuracy"], q["box_fidelity"]
    v, mia = a["verdict"], a["membership_inference"]
    ci = lambda r: f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]"
    sections.append((
        "6. Quality and privacy of the generated repository",
        [f"On the real-data classifier's features ({q['encoder']}): FD {qa['fd']['value']:.3g} {ci(qa['fd'])}, KID "
         f"{qa['kid']['value']:.3g} {ci(qa['kid'])}, precision {qa['precision']['value']:.3f} "
         f"{ci(qa['precision'])} and recall {qa['recall']['value']:.3f} {ci(qa['recall'])}; per condition in "
         f"`{work / 'quality' / 'quality.html'}`. The classifier agrees with the requested {cond['field']} on "
         f"{cond['generated']['accuracy']:.3f} of the generated images (its accuracy on real images: "
         f"{cond['real']['accuracy']:.3f}); lesion-box fidelity AUC {box['generated']['auc']:.3f} "
         f"(real images: {box['real']['auc']:.3f}).",
         f"**Privacy audit: {'safe to share' if v['safe_to_share'] else 'NOT safe to share'}** by the default "
         f"thresholds ({a['n_flagged']} of {a['n_generated']} images flagged as near-copies of training cases"
         + (f"; membership-inference AUC {mia['auc']:.3f} [{mia['auc_ci95'][0]:.3f}, {mia['auc_ci95'][1]:.3f}]"
            if mia else "") + f"); `{work / 'audit' / 'audit.html'}`."
         + ("" if v["safe_to_share"] else " " + "; ".join(v["reasons"]) + ".")], []))
  meaning = [
      f"**AUC** is the probability that a random malignant test image scores higher than a random benign one "
      f"(0.5 = chance, 1 = perfect); the bracket is its 95% bootstrap confidence interval over the "
      f"{n_test} held-out real test images, resampled by case, so views of one case count once.",
      "**Balanced accuracy** averages sensitivity and specificity at the 0.5 threshold; "
      "**sens. @ spec. 0.9** is the sensitivity where 90% of benign lesions are called benign; "
      "**ECE** is the mean gap between predicted probability and observed frequency (0 = calibrated).",
      f"**TSTR / TRTR = {tstr:.2f}**: the AUC of the classifier trained only on synthetic images divided by the "
      "one trained on real images; near 1 means the generated repository carries the diagnostic signal.",
      "**DeLong's test** compares two AUCs measured on the same test images; p < 0.05 means the difference is "
      "unlikely to be chance. A CPU-sized diffusion model trained for minutes learns only part of the phantom's "
      "appearance, so generated-only training usually trails real data here; `scale=full` trains a larger "
      "model far longer on an accelerator.",
  ]
  if assessment:
    meaning.append(
        "**The privacy audit** (section 6) looks for every generated image's nearest training patients, in pixel "
        "space after alignment (flips, crops, shifts) and in the classifier's feature space, and flags images closer "
        "to one training case than new patients ever get; the membership-inference attack asks whether the "
        "diffusion model's loss tells its training images from unseen ones (AUC 0.5 = it cannot). "
        "`busgen-jax audit --config.filter_output=DIR` writes the repository without flagged images.")
  if adaptation:
    meaning.append(
        "**Few-shot adaptation** (section 5) is BUSGen's claim for a new site: the pretrained model stays frozen, "
        "small adapters and a new scanner row learn the site from a few labelled images, and the adapted model "
        "then generates as many labelled images of that site as wanted. Compare each arm with *shots*: every arm "
        "saw the same real images of the site (the shots, or none) and nothing else of it that is labelled; "
        "*shots + un-adapted* tells what the pretrained model gives without adaptation.")

  inline = report.inline
  md = ["# busgen-jax demo report", "", f"Stage times: {timing}.", ""]
  body = [f"<h1>busgen-jax demo report</h1><p>Stage times: {_html.escape(timing)}.</p>"]
  for title, paragraphs, images in sections:
    md += [f"## {title}", ""] + [x for p in paragraphs for x in (p, "")]
    body += [f"<h2>{_html.escape(title)}</h2>"] + [f"<p>{inline(p)}</p>" for p in paragraphs]
    for table in tables.get(title[:2], []):
      if len(table) > 1:
        md += [report.markdown_table(table), ""]
        body += [report.html_table(table)]
    md += [" ".join(f"![{alt}]({path.name})" for path, alt, _ in images), ""]
    body += ["".join(report.img_tag(path, alt, w) for path, alt, w in images)]
  md += ["## What the numbers mean", ""] + [f"- {m}" for m in meaning] + [""]
  body += ["<h2>What the numbers mean</h2><ul>" + "".join(f"<li>{inline(m)}</li>" for m in meaning) + "</ul>"]
  paths = {"md": work / "report.md", "html": work / "report.html", "json": work / "report.json"}
  paths["md"].write_text("\n".join(md))
  paths["html"].write_text(report.html_page("busgen-jax demo report", "".join(body)))
  paths["json"].write_text(json.dumps({
      "times_s": times, "data": {"dataset": str(ds_dir), "splits": conv["counts"]["split"]},
      "diffusion": last_diffusion, "generated": {"dataset": str(gen_dir), "images": gen["converted"]},
      "classifiers": {v: {k: r[k] for k in ("auc", "auc_ci95", "balanced_accuracy", "sensitivity", "specificity",
                                             "ece", "n")} for v, r in results.items()},
      "tstr_over_trtr": tstr, "delong": delong, "adaptation": adapt_json,
      "quality": assessment and {"fidelity": assessment["quality"]["fidelity"]["all"],
                                 "conditional_accuracy": assessment["quality"]["conditional_accuracy"],
                                 "box_fidelity": assessment["quality"]["box_fidelity"]},
      "audit": assessment and {k: assessment["audit"][k] for k in ("verdict", "n_flagged", "n_generated",
                                                                   "membership_inference", "spaces")}},
      indent=1, default=float))
  (work / "summary.json").write_text(json.dumps(summary, indent=1))
  return paths


def main(cfg: ml_collections.ConfigDict, workdir: str, argv) -> None:
  run(cfg, workdir)
