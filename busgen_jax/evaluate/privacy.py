"""Memorisation and privacy audit of a generated repository: `busgen-jax audit --config configs/audit_phantom.py`.

For every generated image, its nearest training *cases* (patients: several views of one case count once):

  pixel space  images compared after alignment. Candidates come from low-resolution descriptors of many views of
               each training image (flips x crops at several scales and positions); each candidate is then
               aligned to the generated image by normalised cross-correlation over flips, scales and every
               translation (FFT), at `pixel.resolution`. Distance sqrt(2 - 2 NCC): 0 = identical up to gain
               and offset, ~1.4 = unrelated.
  feature space  cosine distance of a domain encoder's features (a `classify` checkpoint; optional).

A generated image is a near-copy when its nearest training case is closer than real unseen patients get:
distance < `distance_factor` x the `holdout_quantile` of held-out (test-split) images' nearest distances, or its
distance ratio (nearest / second-nearest case) < min(`ratio`, that quantile of the held-out ratios): a copy sits
far closer to one case than to any other, a new image does not. The distance-to-closest-record test compares all
generated nearest distances with the held-out ones (AUC of "generated is closer"; 0.5 = no pull toward training).

Membership inference (denoising-loss attack, Carlini et al. 2023, Matsumoto et al. 2023): the diffusion model's
loss at fixed timesteps and noise is lower on images it was trained on; the attack's AUC (members = training split,
non-members = held-out split) with a case-level bootstrap CI. 0.5 means the loss does not tell them apart.

The verdict: safe to share when no image is flagged (or at most `max_flagged`), the distance test and the attack
stay below their AUC thresholds. `filter_dataset` writes a copy of the generated dataset without flagged images,
every removal accounted for in its conversion report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Mapping, Sequence

import ml_collections
import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from busgen_jax import paths
from busgen_jax.data import reader, writer
from busgen_jax.evaluate import membership, neighbours
from busgen_jax.evaluate.report import tstr_config


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.generated = ""              # the generated dataset directory (`busgen-jax sample` output)
  c.generated_split = "train"
  c.train = ""                  # the real dataset the diffusion model was trained on
  c.train_split = "train"
  c.holdout_split = "test"      # same dataset, cases the model never saw: calibration and attack non-members
  c.max_generated = 0           # audit at most this many generated images (0: all)
  c.max_holdout = 0             # at most this many held-out images for calibration (0: all)
  c.seed = 0
  c.encoder = ""                # `busgen-jax classify` <workdir>/best: feature-space neighbours ("" = pixels only)
  c.pixel = ml_collections.ConfigDict({
      "resolution": 48,         # alignment working size: the short side of training images, generated images
      "coarse_resolution": 16,  # candidate search descriptors
      "blur": 1.0,              # Gaussian blur (pixels at `resolution`) against speckle
      "scales": (0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 1.0),   # generated = crop of this share of a side
      "max_aspect": 1.5,        # training images are centre-cropped to this aspect ratio
      "candidates": 8,          # training cases aligned per generated image
      "batch": 32})             # generated images aligned at once
  c.thresholds = ml_collections.ConfigDict({
      "holdout_quantile": 0.01,
      "distance_factor": 0.5,
      "ratio": 0.8,
      "max_flagged": 0,         # more flagged images than this: not safe (filter them out, then re-audit)
      "dcr_auc": 0.6,           # distance-to-closest-record AUC above this (and CI above 0.5): not safe
      "mia_auc": 0.6})          # membership-inference AUC above this (and CI above 0.5): not safe
  c.mia = ml_collections.ConfigDict({
      "checkpoint": "",         # the diffusion model (`train` <workdir>/checkpoints or an adapted `merged`); "" = skip
      "which": "ema",
      "step": -1,
      "timesteps": (10, 25, 50, 100, 200),   # fixed timesteps (of T); low noise separates members best
      "repeats": 1,             # noise draws per timestep
      "max_per_group": 512,     # members and non-members each
      "batch_size": 32,
      "bootstrap": 1000})
  c.sheet_max = 24              # near-copies shown side by side
  c.tstr = tstr_config()        # the headline TSTR / TRTR ratio, from two `classify` runs
  c.filter_output = ""          # write the generated dataset without flagged images here ("" = no filtering)
  return c


# ------------------------------------------------------------------------------------------------ sheets

def near_copy_sheet(path: Path, rows: Sequence[dict], size: int = 96) -> Path:
  """Rows of (generated | aligned training match | |difference|), each captioned; rows: {"generated",
  "train" (uint8 images), "caption"}."""
  pad, cap = 4, 14
  sheet = Image.new("L", (3 * size + 4 * pad, max(1, len(rows)) * (size + cap + pad) + pad), 255)
  draw = ImageDraw.Draw(sheet)
  for r, row in enumerate(rows):
    g = np.asarray(Image.fromarray(reader.centre_square(row["generated"])).resize((size, size),
                                                                            Image.Resampling.BILINEAR))
    t = np.asarray(Image.fromarray(row["train"]).resize((size, size), Image.Resampling.BILINEAR))
    diff = np.abs(g.astype(np.int16) - t.astype(np.int16)).astype(np.uint8)
    y = pad + r * (size + cap + pad)
    draw.text((pad, y), row["caption"], fill=0)
    for k, im in enumerate((g, t, diff)):
      sheet.paste(Image.fromarray(im), (pad + k * (size + pad), y + cap))
  path = paths.path(path)   # local or gs://
  path.parent.mkdir(parents=True, exist_ok=True)
  with path.open("wb") as f:
    sheet.save(f, format="PNG")
  return path


# ------------------------------------------------------------------------------------------------ the filter

FLAGGED = "privacy_flagged"


def filter_dataset(src: str | Path, split: str, remove: Mapping[int, str], output: str | Path) -> Path:
  """A copy of dataset `src` without the records `remove` ({record index of `split`: reason}); other splits are
  copied whole. Records are copied byte for byte; the conversion report accounts for every record (removed ones
  as rejections with code "privacy_flagged" and the reason). Returns the new dataset directory."""
  ds = reader.open_dataset(src)
  if split not in ds.splits:
    raise KeyError(f"{ds.dir}: no split {split!r} (splits: {sorted(ds.splits)})")
  bad = [i for i in remove if not 0 <= int(i) < ds.splits[split]]
  if bad:
    raise ValueError(f"{ds.dir} split {split!r}: record indices {bad[:5]} out of range ({ds.splits[split]} records)")
  picks = {s: [(s, i) for i in range(n) if not (s == split and i in remove)] for s, n in ds.splits.items()}
  records = ds.records(split)
  rejections = []
  for i in sorted(remove):
    ex = ds.decode(records[int(i)], skip=("image", "mask"))
    rejections.append({"code": FLAGGED, "key": ex["id"], "index": int(i), "file": ex["source_file"],
                       "reason": remove[i]})
  out = writer.copy_records(ds, picks, output, fmt="filtered", rejections=rejections,
                             note={"filter": {"split": split, "removed": len(remove)}}, examples_per_shard=4096)
  logging.info("%s: %d records kept, %d removed (%s)", out, sum(map(len, picks.values())), len(remove), FLAGGED)
  return out


# ------------------------------------------------------------------------------------------------ the audit

def _space_report(nb_gen: neighbours.Neighbours, nb_hold: neighbours.Neighbours, c) -> dict:
  th = neighbours.calibrate(nb_hold, c)
  flagged = neighbours.flags(nb_gen, th)
  return {"thresholds": th, "flagged": flagged, "n_flagged": int(flagged.sum()),
          "dcr": neighbours.dcr_test(nb_gen.d1, nb_hold.d1, seed=0),
          "generated_d1_median": float(np.median(nb_gen.d1)), "generated_ratio_min": float(nb_gen.ratio.min())}


def verdict(report: dict, c: ml_collections.ConfigDict) -> dict:
  """Safe to share by the configured thresholds? Every reason it is not, in words."""
  reasons, checks = [], []
  n = report["n_flagged"]
  checks.append(f"near-copies: {n} of {report['n_generated']} audited images flagged (allowed {c.max_flagged})")
  if n > c.max_flagged:
    reasons.append(f"{n} generated images are near-copies of training cases (allowed: {c.max_flagged}); remove "
                   "them with --config.filter_output=DIR and audit the filtered copy")
  for space, s in report["spaces"].items():
    d = s["dcr"]
    checks.append(f"{space} distance to closest record: AUC {d['auc']:.3f} [{d['auc_ci95'][0]:.3f}, "
                  f"{d['auc_ci95'][1]:.3f}] (threshold {c.dcr_auc})")
    if d["auc"] > c.dcr_auc and d["auc_ci95"][0] > 0.5:
      reasons.append(f"{space} space: generated images sit closer to training cases than new patients do "
                     f"(AUC {d['auc']:.3f} > {c.dcr_auc})")
  mia = report.get("membership_inference")
  if mia:
    checks.append(f"membership inference: AUC {mia['auc']:.3f} [{mia['auc_ci95'][0]:.3f}, {mia['auc_ci95'][1]:.3f}] "
                  f"(threshold {c.mia_auc})")
    if mia["auc"] > c.mia_auc and mia["auc_ci95"][0] > 0.5:
      reasons.append(f"the model's denoising loss reveals training membership (AUC {mia['auc']:.3f} > {c.mia_auc})")
  else:
    checks.append("membership inference: not run (no --config.mia.checkpoint)")
  if report["n_generated"] < report["n_generated_total"]:
    reasons.append(f"only {report['n_generated']} of {report['n_generated_total']} generated images were audited "
                   "(--config.max_generated): audit them all before sharing")
  return {"safe_to_share": not reasons, "reasons": reasons, "checks": checks}


def run(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  """The audit: writes DIR/audit.json, audit.md, audit.html, audit_images.csv and near_copies.png (+ the
  filtered dataset with --config.filter_output). Returns the report."""
  from busgen_jax.evaluate import report as report_lib
  t0 = time.time()
  work = paths.path(workdir)   # local or gs://; the filtered copy is a dataset, so local (checked before any work)
  if cfg.filter_output:
    paths.local(cfg.filter_output, "filtered dataset (--config.filter_output)")
  work.mkdir(parents=True, exist_ok=True)
  for name in ("generated", "train"):
    if not cfg[name]:
      raise ValueError(f"--config.{name} is required (a dataset directory)")
  n_total = reader.open_dataset(cfg.generated).splits.get(cfg.generated_split)
  if n_total is None:
    raise KeyError(f"{cfg.generated}: no split {cfg.generated_split!r}")
  gen = reader.read_images(cfg.generated, cfg.generated_split, reader.subsample(n_total, cfg.max_generated, cfg.seed))
  train = reader.read_images(cfg.train, cfg.train_split)
  n_hold = reader.open_dataset(cfg.train).splits.get(cfg.holdout_split)
  if not n_hold:
    raise ValueError(f"{cfg.train}: the held-out split {cfg.holdout_split!r} is missing or empty; the audit "
                     "calibrates its thresholds on cases the model never saw")
  hold = reader.read_images(cfg.train, cfg.holdout_split, reader.subsample(n_hold, cfg.max_holdout, cfg.seed + 1))
  logging.info("audit: %d generated, %d training, %d held-out images", len(gen["images"]), len(train["images"]),
               len(hold["images"]))

  times = {"read": time.time() - t0}
  t = time.time()
  pixel = neighbours.PixelIndex(train["images"], train["cases"], cfg.pixel)
  found = {"pixel": (pixel.query(gen["images"], "audit: pixel search, generated"),
                     pixel.query(hold["images"], "audit: pixel search, held-out"))}
  times["pixel"] = time.time() - t
  t = time.time()
  encoder_name = None
  if cfg.encoder:
    from busgen_jax.evaluate import encoder as encoder_lib
    enc = encoder_lib.ClassifierEncoder(cfg.encoder)
    encoder_name = enc.name
    feats = {}
    for key, d in (("generated", gen), ("train", train), ("holdout", hold)):
      f = enc(d["dataset"], d["split"], indices=d["index"])
      if not np.array_equal(f["index"], d["index"]):
        raise AssertionError("encoder features are not in record order")
      feats[key] = f["features"]
    fi = neighbours.FeatureIndex(feats["train"], train["cases"])
    found["feature"] = (fi.query(feats["generated"]), fi.query(feats["holdout"]))
    times["feature"] = time.time() - t
  spaces = {name: _space_report(g, h, cfg.thresholds) for name, (g, h) in found.items()}
  flagged = np.zeros(len(gen["images"]), bool)
  for s in spaces.values():
    flagged |= s["flagged"]

  mia = None
  t = time.time()
  if cfg.mia.checkpoint:
    from busgen_jax.models import card
    model = card.load(cfg.mia.checkpoint, which=cfg.mia.which, step=None if cfg.mia.step < 0 else cfg.mia.step)
    members = reader.subsample(len(train["images"]), cfg.mia.max_per_group, cfg.seed + 2)
    nonmembers = reader.subsample(n_hold, cfg.mia.max_per_group, cfg.seed + 3)
    kw = dict(timesteps=tuple(cfg.mia.timesteps), repeats=cfg.mia.repeats, batch_size=cfg.mia.batch_size,
              seed=cfg.seed)
    lm = membership.denoising_losses(model, cfg.train, cfg.train_split, members, **kw)
    ln = membership.denoising_losses(model, cfg.train, cfg.holdout_split, nonmembers, **kw)
    hold_cases = reader.open_dataset(cfg.train).case_ids(cfg.holdout_split, nonmembers)
    mia = {**membership.membership_auc(lm, ln, member_cases=train["cases"][members], nonmember_cases=hold_cases,
                            n_bootstrap=cfg.mia.bootstrap, seed=cfg.seed),
           "model": f"{model.name}@{model.step}", "timesteps": list(cfg.mia.timesteps), "repeats": cfg.mia.repeats}
    times["membership_inference"] = time.time() - t

  # Per image: the evidence, and the reason for each flag.
  reasons = {}
  rows = [["record", "flagged"] + [f"{s}_{k}" for s in found for k in ("d1", "ratio", "train_record")]]
  for j, rec in enumerate(gen["index"]):
    why = []
    row = [str(int(rec)), str(bool(flagged[j]))]
    for s, (nb, _) in found.items():
      th = spaces[s]["thresholds"]
      t_rec = int(train["index"][nb.train[j, 0]])
      row += [f"{nb.d1[j]:.4f}", f"{nb.ratio[j]:.4f}", str(t_rec)]
      if spaces[s]["flagged"][j]:
        why.append(f"{s}: distance {nb.d1[j]:.3f} (threshold {th['distance']:.3f}), ratio {nb.ratio[j]:.3f} "
                   f"(threshold {th['ratio']:.3f}) to training record {t_rec} (case {train['cases'][nb.train[j, 0]]})")
    rows.append(row)
    if why:
      reasons[int(rec)] = "; ".join(why)
  (work / "audit_images.csv").write_text("\n".join(",".join(r) for r in rows) + "\n")

  sheet = None
  order = np.argsort(found["pixel"][0].d1)
  shown = [j for j in order if flagged[j]][:cfg.sheet_max]
  if shown:
    nb = found["pixel"][0]
    sheet = near_copy_sheet(work / "near_copies.png", [
        {"generated": gen["images"][j], "train": pixel.aligned_crop(int(nb.train[j, 0]), nb.align[j], 96),
         "caption": f"gen {gen['index'][j]} ~ train {train['index'][nb.train[j, 0]]} d={nb.d1[j]:.2f} "
                    f"r={nb.ratio[j]:.2f}"} for j in shown])

  report = {
      "generated": {"dataset": gen["dataset"], "split": cfg.generated_split,
                    "name": reader.open_dataset(cfg.generated).name},
      "train": {"dataset": train["dataset"], "split": cfg.train_split, "images": len(train["images"]),
                "cases": int(pixel.case_of.max() + 1)},
      "holdout": {"split": cfg.holdout_split, "images": len(hold["images"])},
      "n_generated": len(gen["images"]), "n_generated_total": int(n_total), "n_flagged": int(flagged.sum()),
      "flagged": [{"record": r, "reason": why} for r, why in reasons.items()],
      "spaces": {s: {k: v for k, v in r.items() if k != "flagged"} for s, r in spaces.items()},
      "encoder": encoder_name, "membership_inference": mia, "config": cfg.to_dict(),
      "near_copy_sheet": str(sheet) if sheet else None,
  }
  report["verdict"] = verdict(report, cfg.thresholds)
  if cfg.filter_output:
    report["filtered_dataset"] = str(filter_dataset(cfg.generated, cfg.generated_split, reasons, cfg.filter_output))
  report["tstr"] = report_lib.tstr_headline(cfg.tstr)
  report["seconds"] = time.time() - t0
  report["seconds_by_part"] = times
  logging.info("audit: %.0fs (%s)", report["seconds"], ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
  write_report(work, report)
  return report


def write_report(work: Path, rep: dict) -> dict[str, Path]:
  from busgen_jax.evaluate import report as report_lib
  v = rep["verdict"]
  head = ("SAFE TO SHARE by the configured thresholds" if v["safe_to_share"] else
          "NOT SAFE TO SHARE: " + "; ".join(v["reasons"]))
  rows = [["space", "flagged", "distance threshold", "ratio threshold", "median NN distance (gen / held-out)",
           "DCR AUC [95% CI]"]]
  for s, r in rep["spaces"].items():
    d, th = r["dcr"], r["thresholds"]
    rows.append([s, str(r["n_flagged"]), f"{th['distance']:.3f}", f"{th['ratio']:.3f}",
                 f"{d['median_generated']:.3f} / {d['median_holdout']:.3f}",
                 f"{d['auc']:.3f} [{d['auc_ci95'][0]:.3f}, {d['auc_ci95'][1]:.3f}]"])
  mia = rep["membership_inference"]
  lines = [f"# Privacy audit: {rep['generated']['name']}", "", f"**{head}**", "",
           report_lib.tstr_line(rep.get("tstr")), "",
           f"{rep['n_generated']} generated images (of {rep['n_generated_total']}) against {rep['train']['images']} "
           f"training images ({rep['train']['cases']} cases) of `{rep['train']['dataset']}`; thresholds calibrated on "
           f"{rep['holdout']['images']} held-out images (split {rep['holdout']['split']}). Feature encoder: "
           f"{rep['encoder'] or 'none (pixel space only)'}.", "", report_lib.markdown_table(rows), ""]
  if mia:
    lines += [f"Membership inference ({mia['model']}, denoising loss at t in {mia['timesteps']}): AUC "
              f"{mia['auc']:.3f} [{mia['auc_ci95'][0]:.3f}, {mia['auc_ci95'][1]:.3f}] over {mia['n_members']} members "
              f"and {mia['n_nonmembers']} non-members (0.5 = no leakage).", ""]
  lines += ["Checks:", ""] + [f"- {c}" for c in v["checks"]] + [""]
  if rep["flagged"]:
    lines += ["Flagged images (record: reason):", ""] + [f"- {f['record']}: {f['reason']}" for f in rep["flagged"][:50]]
    if len(rep["flagged"]) > 50:
      lines.append(f"- ... {len(rep['flagged']) - 50} more in audit.json")
    lines.append("")
  if rep.get("near_copy_sheet"):
    lines += ["Near-copies (generated | aligned training match | difference):", "", "![near copies](near_copies.png)", ""]
  if rep.get("filtered_dataset"):
    lines += [f"Filtered copy without the flagged images: `{rep['filtered_dataset']}`.", ""]
  paths = {"json": work / "audit.json", "md": work / "audit.md", "html": work / "audit.html"}
  paths["json"].write_text(json.dumps(rep, indent=1, default=float))
  paths["md"].write_text("\n".join(lines))
  body = report_lib.markdown_to_html("\n".join(lines), work)
  paths["html"].write_text(report_lib.html_page("busgen-jax privacy audit", body))
  return paths
