"""`busgen-jax demo --workdir DIR`: the end-to-end job on the built-in phantom data.

  convert the phantom corpus (several devices) -> fit lesion-box priors -> pretrain a tiny BUSGen on pathology
  labels -> sample a labelled synthetic repository -> train classifiers on real only, generated only, and real +
  generated -> evaluate each on the held-out real test split;
  then few-shot: adapt the pretrained model with LoRA to a task it never saw (histology: cyst vs fibroadenoma,
  k images per class) -> generate that task's repository -> classifiers on the k real shots only, adapted-generated
  only, and both -> the same held-out evaluation -> DIR/report.html and DIR/report.md

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
from busgen_jax.evaluate import fidelity, metrics, privacy, report
from busgen_jax import checkpoint, console, generate, paths as paths_lib
from busgen_jax.stages import classify
from busgen_jax.train import adapt, classifier, diffusion

VARIANTS = ("real", "generated", "mixed")
ADAPT_VARIANTS = ("few-shot real", "adapted generated", "few-shot mixed")


def default_config(scale: str = "cpu") -> ml_collections.ConfigDict:
  """scale: "cpu" (about 10 minutes on 2 cores), "ci" (a reduced run for the test suite), "full" (accelerators)."""
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
      "steps": 10, "method": "multistep", "order": 2, "guidance_scale": 2.8, "per_device_batch": 50,
      "local_devices": 0})             # 0: every device of the host

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

  a = adapt.default_config()         # few-shot adaptation to a task the pretrained model never saw
  a.task.update(field="histology", classes=("cyst", "fibroadenoma"),
                pathology=(("cyst", "benign"), ("fibroadenoma", "benign")))
  a.data.update(shots=16, val_per_class=16, batch_size=16)
  a.num_steps, a.eval_every, a.log_every, a.checkpoint_every = 120, 30, 30, 60
  a.lora.update(rank=8, dropout=0.05)
  a.optim.lr = 2e-3
  c.adapt = a
  c.adapt_positive = "cyst"
  c.adapt_generate_per_class = 150
  # 6. quality (FD/KID/precision/recall per condition, conditioning) and the privacy audit of the repository
  c.quality = ml_collections.ConfigDict({"conditions": ("pathology", "device"), "min_count": 10, "bootstrap": 100})
  c.audit_mia_per_group = 256
  c.docs = ""                        # a Markdown file whose demo section (between the markers) to rewrite

  if scale == "ci":
    c.data.phantom.num_examples = 240
    c.diffusion.num_steps, c.diffusion.checkpoint_every, c.diffusion.log_every = 6, 6, 3
    c.diffusion.data.image_size = 16
    c.diffusion.model.update(ch=16, num_groups=4)
    c.generate.num_per_class, c.generate.steps, c.generate.per_device_batch = 16, 3, 8
    c.generate.local_devices = 1       # the tests simulate 8 CPU devices; 32 images fill one
    c.classifier.num_steps, c.classifier.eval_every, c.classifier.checkpoint_every = 10, 5, 5
    c.classifier.data.image_size, c.classifier.data.batch_size = 16, 16
    c.classifier.n_bootstrap = 100
    c.adapt.data.update(shots=4, val_per_class=4, batch_size=8)
    c.adapt.num_steps, c.adapt.eval_every, c.adapt.log_every, c.adapt.checkpoint_every = 4, 2, 2, 4
    c.adapt_generate_per_class = 8
    c.quality.update(conditions=("pathology",), min_count=4, bootstrap=10)
    c.audit_mia_per_group = 32
  elif scale == "full":
    c.data.phantom.num_examples = 20000
    c.data.phantom.size = c.data.image.size = 128
    c.diffusion.num_steps, c.diffusion.checkpoint_every = 20000, 2000
    c.diffusion.data.image_size, c.diffusion.data.batch_size = 128, 128
    c.diffusion.model.update(ch=64, ch_mult=(1, 2, 2, 2), num_res_blocks=2, num_groups=32, attn_levels=(2, 3),
                             dropout=0.1, dtype="bfloat16")
    c.diffusion.optim.update(lr=2e-4, warmup_steps=500, ema_decay=0.9999)
    c.generate.update(num_per_class=5000, steps=50, method="singlestep", order=3, per_device_batch=64)
    c.classifier.num_steps, c.classifier.eval_every, c.classifier.checkpoint_every = 5000, 500, 500
    c.classifier.data.image_size, c.classifier.data.batch_size = 128, 128
    c.classifier.model.name = "resnet18"
    c.classifier.data.ultrasound_augment = ("gain", "speckle", "depth_attenuation")
    c.adapt.data.update(shots=64, val_per_class=64, batch_size=64)
    c.adapt.num_steps, c.adapt.eval_every, c.adapt.checkpoint_every = 3000, 250, 500
    c.adapt.lora.rank = 16
    c.adapt.optim.lr = 5e-4
    c.adapt_generate_per_class = 5000
  elif scale != "cpu":
    raise ValueError(f"demo scale must be cpu, ci or full, got {scale!r}")
  return c


# ------------------------------------------------------------------------------------------------ stages

def _classifier_config(cfg, real: Path, generated: Path, variant: str, task: dict | None = None,
                       real_indices=()) -> ml_collections.ConfigDict:
  """variant: real | generated | mixed; `task` replaces the classifier's, `real_indices` restricts the real
  training images (the few shots)."""
  k = ml_collections.ConfigDict(cfg.classifier.to_dict())
  if task:
    k.task.update(task)
  src = dict(k.data.sources.real.to_dict())
  sources = {}
  if variant in ("real", "mixed"):
    sources["real"] = {**src, "path": str(real), "split": "train", "indices": tuple(int(i) for i in real_indices),
                       "weight": 1.0 - (cfg.mixed_weight_generated if variant == "mixed" else 0.0)}
  if variant in ("generated", "mixed"):
    sources["generated"] = {**src, "path": str(generated), "split": "train",
                            "weight": cfg.mixed_weight_generated if variant == "mixed" else 1.0}
  k.data.sources = sources
  k.data.device_vocab = ()
  k.val.path = str(real)               # selection and testing on real data only
  k.test = {"real_test": {"path": str(real), "split": "test"}}
  return k


def _grid(ds_dir: Path, split: str, per_class: int, size: int, field: str = "pathology",
          classes=("benign", "malignant")) -> list[tuple[str, np.ndarray]]:
  """The first images of each class of a split, resized to `size`."""
  from busgen_jax.data import transforms
  ds = reader.open_dataset(ds_dir)
  names = ds.vocab(field)
  src = ds.source(split)
  rows = []
  for wanted in classes:
    ims = []
    for i in range(len(src)):
      ex = src[i]
      if names[ex[field]] == wanted:
        ims.append(transforms.resize(np.ascontiguousarray(ex["image"][..., 0]), size))
        if len(ims) == per_class:
          break
    rows.append((wanted, np.concatenate(ims, 1) if ims else np.zeros((size, size), np.uint8)))
  return rows


def _comparison_sheet(path: Path, real: Path, generated: Path, size: int = 48, n: int = 8, **classes) -> Path:
  from PIL import Image
  rows = [(f"real {k}", im) for k, im in _grid(real, "train", n, size, **classes)] + \
         [(f"generated {k}", im) for k, im in _grid(generated, "train", n, size, **classes)]
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

  # 7. few-shot adaptation to a new task, 8. its synthetic repository, 9. its classifiers
  with step("adapt"):
    acfg = ml_collections.ConfigDict(cfg.adapt.to_dict())
    acfg.base, acfg.data.path = str(work / "diffusion" / "checkpoints"), str(ds_dir)
    adapted = adapt.adapt(acfg, work / "adapt")
  with step("generate_adapted"):
    adapted_dir = generate.generate(sample_config(cfg, ds, adapted=adapted), work / "adapted_generated")
  task = {"field": acfg.task.field, "classes": tuple(acfg.task.classes), "positive": cfg.adapt_positive}
  _, ameta = checkpoint.load_meta(adapted["adapters"])
  shots = np.concatenate([np.asarray(v, np.int64) for v in ameta["data"]["shots"].values()])
  aresults, apreds = {}, {}
  for name, variant in zip(ADAPT_VARIANTS, VARIANTS):
    with step(f"classify_adapted_{variant}"):
      out = work / "classify_adapted" / variant
      aresults[name] = classify.run(_classifier_config(cfg, ds_dir, adapted_dir, variant, task, shots),
                                    out)["real_test"]
      with np.load(out / "eval" / "real_test.predictions.npz") as z:
        apreds[name] = {k: z[k] for k in z.files}
  adaptation = {"summary": adapted, "dataset": adapted_dir, "task": task, "results": aresults, "preds": apreds}

  t = time.time()
  paths = write_report(work, cfg, summary, sheet, ds_dir, gen_dir, last, results, preds, times, adaptation,
                       assessment)
  logging.info("demo report: %s", paths["html"])
  total = sum(times.values()) + time.time() - t
  if cfg.docs:
    report.write_section(Path(cfg.docs), docs_summary(json.loads(paths["json"].read_text()), total, workdir),
                         DOCS_BEGIN, DOCS_END, "Demo figures")
  print(f"demo done in {total:.0f}s: {paths['html']} and {paths['md']}")
  return work


@contextlib.contextmanager
def _step(times: dict, key: str):
  """One console line per demo step, and its time into `times` (the report's table)."""
  t = time.time()
  with console.stage(f"demo: {key}"):
    yield
  times[key] = time.time() - t


DOCS_BEGIN, DOCS_END = "<!-- demo:begin -->", "<!-- demo:end -->"


def sample_config(cfg, ds: reader.Dataset, checkpoint_dir: str = "", box_prior_path: str = "", *,
                  adapted: dict | None = None) -> ml_collections.ConfigDict:
  """The demo's generation config: the pretrained model's repository (pathology x device), or with `adapted`
  (adapt.adapt's summary) the adapted model's task repository."""
  devices = [d for d in ds.vocab("device") if d != "unknown"]
  per_class = cfg.adapt_generate_per_class if adapted else cfg.generate.num_per_class
  g = generate.default_config()
  g.update(checkpoint=adapted["merged"] if adapted else checkpoint_dir, device=("all",),
           box_prior=adapted["box_prior"] if adapted else box_prior_path,
           pathology=() if adapted else g.pathology, name="phantom_adapted" if adapted else "phantom_generated",
           num_per_condition=max(1, per_class // max(1, len(devices))), examples_per_shard=256,
           per_device_batch=cfg.generate.per_device_batch, local_devices=cfg.generate.local_devices)
  g.sampler.update(steps=cfg.generate.steps, method=cfg.generate.method, order=cfg.generate.order,
                   guidance_scale=cfg.generate.guidance_scale)
  return g


def docs_summary(rep: dict, total_s: float, workdir: str) -> str:
  """The figures the README quotes, from this run's report.json: what `--config.docs` writes."""
  def auc(r):
    return f"{r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}]"
  c, a = rep["classifiers"], rep["adaptation"]
  slow = sorted(rep["times_s"].items(), key=lambda kv: -kv[1])[:5]
  return (f"Generated by `busgen-jax demo --workdir {workdir} --config.docs=...` on {time.strftime('%Y-%m-%d')}: "
          f"{total_s:.0f} s in all (slowest stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in slow) + ").\n\n"
          f"- Held-out real test split (n = {c['real']['n']}): trained on real {auc(c['real'])}, on generated only "
          f"{auc(c['generated'])} (TSTR/TRTR {rep['tstr_over_trtr']:.2f}), on both {auc(c['mixed'])}.\n"
          f"- Few-shot adaptation ({a['summary']['shots_per_class']} shots per class, n = "
          f"{a['classifiers']['few-shot real']['n']} test images): shots only {auc(a['classifiers']['few-shot real'])}, "
          f"adapted generated only {auc(a['classifiers']['adapted generated'])} (DeLong p against the shots "
          f"{a['delong']['adapted generated']['p_value']:.2g}), both {auc(a['classifiers']['few-shot mixed'])}.\n")


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


def write_report(work: Path, cfg, summary, sheet, ds_dir, gen_dir, last_diffusion, results, preds, times,
                 adaptation: dict | None = None, assessment: dict | None = None) -> dict:
  import html as _html
  conv = reader.open_dataset(ds_dir).report
  gen = reader.open_dataset(gen_dir).report
  comparison = _comparison_sheet(work / "real_vs_generated.png", ds_dir, gen_dir)
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
       [f"`{gen_dir}`: DPM-Solver++ ({cfg.generate.method}, order {cfg.generate.order}, {cfg.generate.steps} "
        f"steps), guidance {cfg.generate.guidance_scale}, lesion boxes from the fitted box prior; "
        f"per-condition sheets in `{Path(gen_dir) / 'sheets'}`.",
        "Rows: real benign, real malignant, generated benign, generated malignant."],
       [(comparison, "real vs generated", 640)]),
      ("4. Classifiers on the held-out real test split", [], [(roc, "ROC", None), (cal, "calibration", None)]),
  ]
  adapt_json = None
  if adaptation:
    a, task = adaptation["summary"], adaptation["task"]
    ares, apreds = adaptation["results"], adaptation["preds"]
    field, classes = task["field"], list(task["classes"])
    asheet = _comparison_sheet(work / "adapted_real_vs_generated.png", ds_dir, adaptation["dataset"], field=field,
                               classes=classes)
    aroc = report.roc_plot(work / "roc_adapted.png", {v: {**ares[v]["roc_curve"], **ares[v]} for v in ADAPT_VARIANTS},
                           f"{' vs '.join(classes)}, held-out real test split")
    adelong = _delong(apreds, classes, task["positive"], ADAPT_VARIANTS)
    tables["5."] = [report.binary_rows({f"trained on {v}": ares[v] for v in ADAPT_VARIANTS}),
                    _delong_rows(adelong, "few-shot real")]
    agen = reader.open_dataset(adaptation["dataset"]).report
    sections.append((
        f"5. Few-shot adaptation to a new task: {field} {' vs '.join(classes)}",
        [f"The pretrained model only knows pathology (benign / malignant). LoRA adapters (rank "
         f"{cfg.adapt.lora.rank}, {a['adapter_params']:,} parameters = "
         f"{100 * a['adapter_params'] / a['frozen_params']:.1f}% of the frozen {a['frozen_params']:,}) and "
         f"{a['new_rows']['pathology']} new label rows were trained on **{a['shots_per_class']} real images per "
         f"class** for {cfg.adapt.num_steps} steps; the validation loss on {a['val_images']} held-out images "
         f"(other cases) went from {a['val_loss_start']:.4f} to {a['val_loss_best']:.4f} (step {a['best_step']}).",
         f"`{adaptation['dataset']}`: {agen['converted']} generated images of the new classes, lesion boxes from a "
         f"prior fitted on the shots. Rows: real {', real '.join(classes)}, generated {', generated '.join(classes)}.",
         f"Classifiers for {task['positive']} (positive) vs the rest, trained on the "
         f"{a['shots_per_class'] * len(classes)} real shots only, on the adapted model's images only, and on both."],
        [(asheet, "adapted: real vs generated", 640), (aroc, "ROC (adapted task)", None)]))
    adapt_json = {"summary": a, "dataset": str(adaptation["dataset"]), "images": agen["converted"],
                  "classifiers": {v: {k: r[k] for k in ("auc", "auc_ci95", "balanced_accuracy", "sensitivity",
                                                        "specificity", "ece", "n")} for v, r in ares.items()},
                  "delong": adelong}
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
        "**Few-shot adaptation** (section 5) is BUSGen's claim for new clinical tasks: the pretrained model stays "
        "frozen, small adapters and new label rows learn the task from a few labelled images, and the adapted "
        "model then generates as many labelled images as wanted. Compare *adapted generated* and *few-shot mixed* "
        "with *few-shot real*: all three saw the same real images (the shots) and nothing else that is labelled.")

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
