"""`busgen-jax inspect DIR`: counts, label distributions, box and size statistics, and a contact sheet PNG."""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from busgen_jax.data.reader import Dataset
from busgen_jax.data.schema import LABEL_FIELDS
_COLORS = {"benign": (60, 200, 60), "malignant": (230, 50, 50), "normal": (80, 140, 255), "unknown": (230, 200, 40)}


def summarize(ds: Dataset) -> dict[str, Any]:
  """Reads every example once (cheap at contact-sheet scale; the conversion report has the counts for free)."""
  out: dict[str, Any] = {"dataset": ds.name, "directory": str(ds.dir), "splits": ds.splits, "labels": {}}
  cases, sizes, nboxes, areas = collections.defaultdict(set), [], collections.Counter(), []
  for split in ds.splits:
    src = ds.source(split)
    counts = {f: collections.Counter() for f in LABEL_FIELDS}
    for i in range(len(src)):
      ex = src[i]
      for f in LABEL_FIELDS:
        counts[f][ds.vocab(f)[ex[f]]] += 1
      cases[split].add(ex["case_id"])
      sizes.append(ex["image"].shape[:2])
      nboxes[len(ex["boxes"])] += 1
      b = ex["boxes"]
      areas += list((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    out["labels"][split] = {f: dict(c.most_common()) for f, c in counts.items()}
  overlap = {f"{a}&{b}": len(cases[a] & cases[b]) for a in cases for b in cases if a < b}
  out["cases"] = {s: len(c) for s, c in cases.items()}
  out["case_overlap_between_splits"] = overlap
  if sizes:
    hw = np.array(sizes)
    out["image_size"] = {"height": [int(hw[:, 0].min()), int(hw[:, 0].max())],
                         "width": [int(hw[:, 1].min()), int(hw[:, 1].max())]}
  out["boxes_per_image"] = dict(sorted(nboxes.items()))
  if areas:
    out["box_area_fraction"] = {q: round(float(np.quantile(areas, v)), 4)
                                for q, v in (("p05", 0.05), ("median", 0.5), ("p95", 0.95))}
  return out


def contact_sheet(ds: Dataset, path: Path, *, split: str | None = None, n: int = 48, cols: int = 8,
                  tile: int = 160, seed: int = 0, indices: Sequence[int] | None = None) -> Path:
  """A grid of examples with their boxes (coloured by pathology), mask outlines and labels: `n` random ones,
  or the records at `indices`."""
  split = split or ("train" if "train" in ds.splits else next(iter(ds.splits)))
  src = ds.source(split)
  idx = np.asarray(indices) if indices is not None else \
      np.sort(np.random.default_rng(seed).choice(len(src), size=min(n, len(src)), replace=False))
  rows = max(1, -(-len(idx) // cols))
  sheet = Image.new("RGB", (cols * tile, rows * (tile + 14)), (20, 20, 20))
  draw = ImageDraw.Draw(sheet)
  for k, i in enumerate(idx):
    ex = src[int(i)]
    img = Image.fromarray(ex["image"][..., 0]).convert("RGB")
    scale = tile / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR)
    if ex["has_mask"] and ex["mask"].any():
      m = np.asarray(Image.fromarray(ex["mask"][..., 0]).resize(img.size, Image.Resampling.NEAREST)) > 127
      edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
      a = np.asarray(img).copy()
      a[edge] = (0, 220, 255)
      img = Image.fromarray(a)
    x0, y0 = (k % cols) * tile, (k // cols) * (tile + 14)
    sheet.paste(img, (x0, y0))
    pathology = ds.vocab("pathology")[ex["pathology"]]
    color = _COLORS.get(pathology, (255, 255, 255))
    for b in ex["boxes"]:
      xa, ya = x0 + b[0] * img.width, y0 + b[1] * img.height
      draw.rectangle([xa, ya, max(xa, x0 + b[2] * img.width - 1), max(ya, y0 + b[3] * img.height - 1)],
                     outline=color)
    device = ds.vocab("device")[ex["device"]]
    label = pathology if pathology != "unknown" else next(   # e.g. an adapted model's histology classes
        (ds.vocab(f)[ex[f]] for f in ("histology", "birads") if ex[f]), pathology)
    draw.text((x0 + 2, y0 + tile + 1), f"{label[:3]} {device[:18]}", fill=color)
  path.parent.mkdir(parents=True, exist_ok=True)
  sheet.save(path)
  return path


def format_summary(s: dict[str, Any]) -> str:
  lines = [f"dataset {s['dataset']} at {s['directory']}",
           "splits: " + ", ".join(f"{k} {v} examples / {s['cases'].get(k, 0)} cases" for k, v in s["splits"].items())]
  for split, fields in s["labels"].items():
    for f, c in fields.items():
      lines.append(f"  {split:6s} {f:10s} " + ", ".join(f"{k}: {v}" for k, v in c.items()))
  for key in ("case_overlap_between_splits", "image_size", "boxes_per_image", "box_area_fraction"):
    if key in s:
      lines.append(f"{key}: {s[key]}")
  return "\n".join(lines)
