"""The experiment's report: per test set and arm AUC, CI, DeLong against real-only training, TSTR/TRTR, the
data-scaling curve, real vs generated sheets per device; report.md, report.html, report.json (and a docs section).

Reads what `busgen-jax experiment` left in its run directory: the classifiers' saved predictions and reports.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from busgen_jax.data import inspect, pipeline, reader
from busgen_jax.evaluate import metrics, report

REAL, GENERATED, MIXED = "real", "generated", "mixed"
INTERNAL = "internal"
def markers(preset: str) -> tuple[str, str]:
  """The docs section a preset's run rewrites (`--config.docs`): one per preset, so runs never overwrite another's."""
  tag = "experiment" if preset == "cpu" else f"experiment-{preset}"
  return f"<!-- {tag}:begin -->", f"<!-- {tag}:end -->"


def scaling_arm(m: float) -> str:
  return f"generated x{m:g}"


def arm_dir(arm: str) -> str:
  return arm.replace(" ", "_")


def to_json(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def load_predictions(work: Path, arm: str, test: str) -> dict:
  with np.load(work / "classify" / arm_dir(arm) / "eval" / f"{test}.predictions.npz") as z:
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
      per_arm[arm]["val_auc"] = (rep.get("best") or {}).get("value")   # what selected the checkpoint
      if arm in dl:       # the test, or why it could not be made
        per_arm[arm]["delong_vs_real"] = {k: v for k, v in dl[arm].items()
                                          if k in ("difference", "se", "p_value", "error")}
    real, g, mixed = (per_arm[a]["auc"] for a in (REAL, GENERATED, MIXED))
    scaling = []
    for m in multiples:   # the largest multiple is the whole repository: the "generated" arm
      whole = m == multiples[-1]
      a = per_arm[GENERATED if whole else scaling_arm(m)]
      scaling.append({"multiple": m, "auc": a["auc"], "auc_ci95": a["auc_ci95"], "n_generated":
                      gen["images"] if whole else results[scaling_arm(m)]["train"]["generated"][1]})
    out[test] = {**where, "arms": per_arm, "tstr_over_trtr": g / real if real else float("nan"),
                 "mixed_minus_real": mixed - real, "scaling": scaling,
                 "real_auc": real}
  return out


def scaling_plot(path: Path, tests: dict, n_real: int) -> Path:
  plt = report._plt()
  fig, ax = plt.subplots(figsize=(5.2, 3.8), dpi=110)
  for i, (name, t) in enumerate(tests.items()):
    colour = f"C{i}"
    dodge = 1 + 0.03 * (i - (len(tests) - 1) / 2)        # error bars of several test sets side by side
    x = [s["n_generated"] * dodge for s in t["scaling"]]
    y = np.array([s["auc"] for s in t["scaling"]])
    lo = np.array([s["auc_ci95"][0] for s in t["scaling"]])
    hi = np.array([s["auc_ci95"][1] for s in t["scaling"]])
    ax.errorbar(x, y, yerr=[y - lo, hi - y], marker="o", ms=4, capsize=3, color=colour,
                label=f"{name}: generated only")
    ax.axhline(t["real_auc"], ls="--", lw=1, color=colour, label=f"{name}: real only ({n_real} images)")
  ticks = sorted({s["n_generated"] for t in tests.values() for s in t["scaling"]})
  ax.set(xlabel="generated training images", ylabel="test AUC", title="Data scaling: classifiers on generated images")
  return report.save_log_x(fig, ax, path, ticks)


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


def write(work: Path, cfg, data, external, last, gen, results, quality, audit, times,
          fewshot: tuple[dict, str] | None = None) -> dict:
  """report.json / .md / .html: the repository protocol's tables (when `gen` ran) and the few-shot arm's
  (`fewshot`: its summary and Markdown section)."""
  summary = {"preset": cfg.preset, "times_s": times, "data": data, "external": external,
             "diffusion": {"final": last, "steps": cfg.diffusion.num_steps, "image_size": cfg.diffusion.data.image_size,
                           "batch_size": cfg.diffusion.data.batch_size}}
  md = header(cfg, summary)
  if gen is not None:
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
    summary.update({"generated": {k: gen[k] for k in ("dataset", "images", "real_images")}, "tests": tests,
                    "quality": quality, "audit": audit and {k: audit[k] for k in ("verdict", "n_flagged",
                                                                                  "n_generated",
                                                                                  "membership_inference")}})
    md += markdown(cfg, summary, scaling, sheets, rocs)
  if fewshot is not None:
    summary["fewshot"] = fewshot[0]
    md += ["## Few-shot adaptation to a new site", "", fewshot[1]]
  times_md = ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items())
  times_md = f"Stage times (minutes): {times_md}; total {sum(times.values()) / 60:.1f}."
  md += [times_md, ""]
  (work / "report.json").write_text(json.dumps(summary, indent=1, default=to_json))
  md = "\n".join(md)
  (work / "report.md").write_text(md)
  (work / "report.html").write_text(report.html_page("busgen-jax experiment", report.markdown_to_html(md, work)))
  if cfg.docs:
    parts = ([tables(cfg, summary)] + assessment(summary) if gen is not None else []) + \
        ([_no_images(fewshot[1])] if fewshot is not None else []) + [times_md, ""]
    report.write_section(Path(cfg.docs), "\n".join(parts), *markers(cfg.preset),
                         f"Generated by `busgen-jax experiment --config configs/experiment.py:{cfg.preset}`")
  return summary


def _no_images(md: str) -> str:
  """A report section for docs, whose folder does not hold the run's figures."""
  return "\n".join(line for line in md.splitlines() if not line.startswith("!["))


def tables(cfg, s: dict) -> str:
  """The per-test-set tables (Markdown): the report's core, also written into docs."""
  lines = []
  for test, t in s["tests"].items():
    lines += [f"**{test}** (`{Path(t['dataset']).parent.name}/{t['split']}`, n = {t['arms'][REAL]['n']}, "
              f"{t['arms'][REAL]['n_positive']} {cfg.classifier.task.positive}): TSTR/TRTR "
              f"**{t['tstr_over_trtr']:.3f}**, real + generated − real **{t['mixed_minus_real']:+.3f}** AUC.", ""]
    rows = [["trained on", "AUC [95% CI]", "Δ vs real (DeLong p)", "balanced acc.", "sens. / spec. @0.5",
             "sens. @ spec. 0.9", "validation AUC"]]
    for arm, r in t["arms"].items():
      d = r.get("delong_vs_real", {})
      delta = f"{d['difference']:+.3f} (p {d['p_value']:.2g})" if "p_value" in d else "–"
      rows.append([arm, _fmt_ci(r), delta, f"{r['balanced_accuracy']:.3f}",
                   f"{r['sensitivity']:.3f} / {r['specificity']:.3f}", f"{r['sens_at_spec_0.9']:.3f}",
                   f"{r['val_auc']:.3f}" if r.get("val_auc") is not None else "–"])
    lines += [report.markdown_table(rows), ""]
  return "\n".join(lines)


def assessment(s: dict) -> list[str]:
  """The quality report's and the privacy audit's headline, as Markdown lines."""
  q, a, md = s["quality"], s["audit"], []
  if q:
    f = q["fidelity"]
    ci = lambda r: f"[{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]"
    md += ["**Quality.** On the real-only classifier's features: "
           f"FD {f['fd']['value']:.3g} {ci(f['fd'])}, "
           f"KID {f['kid']['value']:.3g} {ci(f['kid'])}, precision {f['precision']['value']:.3f}, recall "
           f"{f['recall']['value']:.3f}; conditional accuracy {q['conditional_accuracy']['generated']['accuracy']:.3f} "
           f"(real {q['conditional_accuracy']['real']['accuracy']:.3f}); box fidelity AUC "
           f"{q['box_fidelity']['generated']['auc']:.3f} (real {q['box_fidelity']['real']['auc']:.3f}). "
           "Per condition: `quality/quality.html`.", ""]
  if a:
    v, mia = a["verdict"], a["membership_inference"]
    md += [f"**Privacy audit: {'safe to share' if v['safe_to_share'] else 'NOT safe to share'}** by the "
           f"default thresholds: {a['n_flagged']} of {a['n_generated']} images flagged as near-copies of training "
           "cases" + (f"; membership-inference AUC {mia['auc']:.3f} [{mia['auc_ci95'][0]:.3f}, "
                      f"{mia['auc_ci95'][1]:.3f}]" if mia else "") + ". Details: `audit/audit.html`.", ""]
  return md


def header(cfg, s: dict) -> list[str]:
  d = s["data"]
  return ["# busgen-jax experiment", "",
          f"Preset `{cfg.preset}`. Internal dataset `{d['dataset']}`: splits {d['splits']} (case-level; training on "
          f"`{cfg.data.train_split}`, checkpoint selection on `{cfg.data.val_split}`, testing on "
          f"`{cfg.data.test_split}`)." + (" External test sets: " + ", ".join(
              f"**{n}** (`{e['source']}`, {e['n']} images)" for n, e in s["external"].items()) + "."
              if s["external"] else " No external test set was given (`--config.external.NAME=PATH` adds one)."), ""]


MIXED_RECIPE = {
    "mix": "The mixed arm trains on one stream of real and generated images, {cfg.mixed_weight_generated:.0%} "
           "generated.",
    "finetune": "The mixed arm is the generated-only classifier fine-tuned on the real training images "
                "(overrides {cfg.finetune_overrides}).",
}


def markdown(cfg, s: dict, scaling: Path, sheets, rocs) -> list[str]:
  g = s["generated"]
  dm = cfg.diffusion.model
  md = ["## Diffusion model and repository", "",
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
         "generated-only classifier over the real-only one. " + MIXED_RECIPE[cfg.mixed].format(cfg=cfg), "",
         tables(cfg, s)]
  md += [" ".join(f"![ROC {t}]({p.name})" for t, p in rocs.items()), "", "## Data scaling", "",
         "Classifiers on generated images only, on nested subsets of the repository; dashed: real only.", "",
         f"![scaling]({scaling.name})", ""]
  if s["quality"] or s["audit"]:
    md += ["## Quality and privacy", ""] + assessment(s)
  return md
