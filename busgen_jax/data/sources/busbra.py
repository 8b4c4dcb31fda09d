"""BUS-BRA: `bus_data.csv` + `Images/bus_XXXX-s.png` + `Masks/mask_XXXX-s.png` (+ k-fold CSVs).

Labels (pathology, histology, BI-RADS, device, case) come from the CSV; the CSV box (`[x, y, w, h]` pixels) is
kept and checked against the mask's box (a warning below `box_iou_warn`). When the CSV's Width/Height differ
from the file, the file wins and the mismatch is reported. The fold column of `folds_file` is stored in `fold`
and can drive the split (`split.scheme="folds"`).
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from busgen_jax.data import schema
from busgen_jax.data.sources import base

REQUIRED_COLUMNS = ("ID", "Case", "Histology", "Pathology", "BIRADS", "Device", "Width", "Height", "BBOX")


@dataclasses.dataclass
class BusbraSource:
  root: Path
  csv_file: str = "bus_data.csv"
  folds_file: str = "5-fold-cv.csv"     # "" for none
  box_iou_warn: float = 0.5
  max_pixels: int = 50_000_000
  colour: str = "luma"          # RGB with colour content: luma (with a warning) | reject
  name: str = "busbra"

  def __post_init__(self):
    self.root = Path(self.root)

  def _read_csv(self, name: str) -> list[dict]:
    path = self.root / name
    if not path.is_file():
      raise FileNotFoundError(f"{path}: BUS-BRA table not found")
    with open(path, newline="", encoding="utf-8-sig") as f:
      return list(csv.DictReader(f))

  def plan(self) -> base.Plan:
    rows = self._read_csv(self.csv_file)
    missing = [c for c in REQUIRED_COLUMNS if rows and c not in rows[0]]
    if missing:
      raise ValueError(f"{self.root / self.csv_file}: missing columns {missing}")
    folds = {}
    if self.folds_file:
      folds = {r["ID"]: r.get("kFold", "") for r in self._read_csv(self.folds_file)}
    items, rejected, seen = [], [], set()
    for line, r in enumerate(rows, start=2):
      rel = f"Images/{r['ID']}.png"
      where = f"{self.csv_file}:{line} ({r['ID']})"
      try:
        if r["ID"] in seen:
          raise base.Reject("duplicate", f"{where}: ID listed twice")
        seen.add(r["ID"])
        pathology = schema.normalize_pathology(r["Pathology"])
        birads = schema.normalize_birads(r["BIRADS"])
        box = json.loads(r["BBOX"])
        if len(box) != 4:
          raise ValueError(f"BBOX must be [x, y, w, h], got {r['BBOX']!r}")
        fold = int(folds[r["ID"]]) if r["ID"] in folds and folds[r["ID"]] not in ("", "NaN") else -1
      except base.Reject as e:
        rejected.append(base.Rejection(rel, e.code, e.message))
        continue
      except (ValueError, KeyError, json.JSONDecodeError) as e:
        rejected.append(base.Rejection(rel, "bad_row", f"{where}: {e}"))
        continue
      items.append(base.Item(
          key=r["ID"], source_file=rel, case_id=f"busbra/{r['Case']}", pathology=pathology, fold=fold,
          payload={"histology": r["Histology"].strip().lower() or schema.UNKNOWN, "birads": birads,
                   "device": r["Device"].strip() or schema.UNKNOWN, "box_xywh": [float(v) for v in box],
                   "csv_size": (int(r["Width"]), int(r["Height"])), "line": line}))
    listed = {it.source_file for it in items} | {r.file for r in rejected}
    listed_masks = {self._mask_rel(it.key) for it in items}
    ignored = []
    for sub, used, what in (("Images", listed, "image"), ("Masks", listed_masks, "mask")):
      for p in sorted((self.root / sub).glob("*")):
        rel = p.relative_to(self.root).as_posix()
        if rel not in used:
          ignored.append({"file": rel, "reason": f"{what} not listed in {self.csv_file}"})
    vocab = schema.Vocab.from_values(devices=[it.payload["device"] for it in items],
                                     histologies=[it.payload["histology"] for it in items])
    return base.Plan(items=items, vocab=vocab, rejected=rejected, ignored_files=ignored)

  @staticmethod
  def _mask_rel(key: str) -> str:
    return f"Masks/mask_{key.removeprefix('bus_')}.png"

  def load(self, item: base.Item):
    p = item.payload
    path = base.resolve_inside(self.root, item.source_file)
    image, warnings = base.load_grayscale(path, max_pixels=self.max_pixels, colour=self.colour,
                                          name=item.source_file)
    h, w = image.shape
    if tuple(p["csv_size"]) != (w, h):
      warnings.append({"file": item.source_file, "code": "size_mismatch",
                       "message": f"{self.csv_file}:{p['line']} gives {p['csv_size'][0]}x{p['csv_size'][1]}, "
                                  f"the file is {w}x{h}; using the file's size"})
    mask = base.load_mask(base.resolve_inside(self.root, self._mask_rel(item.key)), shape=image.shape,
                          max_pixels=self.max_pixels)
    base.check_lesion_mask(mask, item.pathology, item.source_file)
    x, y, bw, bh = p["box_xywh"]
    box = base.check_boxes(np.array([[x / w, y / h, (x + bw) / w, (y + bh) / h]]))
    mask_box = base.boxes_from_mask(mask, per_component=False)
    if len(mask_box):
      iou = base.box_iou(box[0], mask_box[0])
      if iou < self.box_iou_warn:
        warnings.append({"file": item.source_file, "code": "box_mask_disagree",
                         "message": f"CSV box and mask box overlap with IoU {iou:.2f} < {self.box_iou_warn}"})
    ex = schema.Example(
        id=item.key, image=image, mask=mask, boxes=box, pathology=item.pathology, device=p["device"],
        birads=p["birads"], histology=p["histology"], case_id=item.case_id, source_dataset=self.name,
        source_file=item.source_file, sha256=base.file_sha256(path), fold=item.fold, orig_height=h, orig_width=w)
    return ex, warnings
