"""A generic manifest, so any hospital export can be converted: a JSON list of objects, a JSON object mapping
split names to such lists, or a CSV with a header.

Per entry: `file` (required, relative to the manifest's folder or `root`), `pathology`, `device`, `boxes`
(list of [x1, y1, x2, y2]), `mask` (a mask image), `case_id` (defaults to the file; say it when you have it,
or views of one patient may straddle splits), `birads`, `histology`, `split`, `fold`. In a CSV, `boxes` is a
JSON list in one cell. The official BUSGen dataset JSON loads as is: `device_type` stands for `device`,
`lesion_box` ({"1": [x1, y1, x2, y2], ...}) for `boxes`, and `is_valid` false means the entry has no valid box.
Box units are `normalized` ([0, 1]), `pixels`, or `auto` (normalized when every coordinate of the manifest is
<= 1). Paths may not be absolute or escape the root.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from busgen_jax.data import schema
from busgen_jax.data.sources import base

_ALIASES = {"device_type": "device", "lesion_box": "boxes", "image": "file", "path": "file", "case": "case_id",
            "patient_id": "case_id", "label": "pathology", "bbox": "boxes", "mask_file": "mask"}


def _parse_boxes(value) -> list[list[float]]:
  if value is None or value == "":
    return []
  if isinstance(value, str):
    value = json.loads(value)
  if isinstance(value, dict):  # official: {"1": [x1, y1, x2, y2], "2": [...]}
    value = [value[k] for k in sorted(value, key=lambda k: (len(str(k)), str(k)))]
  if value and isinstance(value[0], (int, float)):
    value = [value]
  boxes = [[float(v) for v in b] for b in value]
  for b in boxes:
    if len(b) != 4:
      raise ValueError(f"a box needs 4 numbers [x1, y1, x2, y2], got {b}")
  return boxes


def _truthy(value) -> bool:
  if isinstance(value, str):
    return value.strip().lower() not in ("0", "false", "no", "")
  return bool(value)


@dataclasses.dataclass
class ManifestSource:
  path: Path
  root: Path | None = None              # default: the manifest's folder
  box_units: str = "auto"               # "auto" | "normalized" | "pixels"
  max_pixels: int = 50_000_000
  colour: str = "luma"          # RGB with colour content: luma (with a warning) | reject
  name: str = "manifest"

  def __post_init__(self):
    self.path = Path(self.path)
    self.root = Path(self.root) if self.root else self.path.parent
    if self.box_units not in ("auto", "normalized", "pixels"):
      raise ValueError(f"manifest.box_units must be auto, normalized or pixels, got {self.box_units!r}")

  def _entries(self) -> list[tuple[str, dict]]:
    """(where, entry) pairs, `where` naming the manifest position for error messages."""
    if not self.path.is_file():
      raise FileNotFoundError(f"{self.path}: manifest not found")
    name = self.path.name
    if self.path.suffix.lower() == ".csv":
      with open(self.path, newline="", encoding="utf-8-sig") as f:
        return [(f"{name}:{i}", dict(r)) for i, r in enumerate(csv.DictReader(f), start=2)]
    try:
      data = json.loads(self.path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{self.path}: not valid JSON: {e}") from None
    if isinstance(data, dict):  # {"train": [...], "test": [...]}
      out = []
      for split, entries in data.items():
        if not isinstance(entries, list):
          raise ValueError(f"{self.path}: expected a list of entries under {split!r}")
        out += [(f"{name}[{split!r}][{i}]", {"split": split, **e} if isinstance(e, dict) else e)
                for i, e in enumerate(entries)]
      return out
    if not isinstance(data, list):
      raise ValueError(f"{self.path}: expected a JSON list of entries or an object of split -> list")
    return [(f"{name}[{i}]", e) for i, e in enumerate(data)]

  def plan(self) -> base.Plan:
    items, rejected, seen, all_coords = [], [], set(), []
    for where, entry in self._entries():
      file = str(entry.get("file", "")) if isinstance(entry, dict) else ""
      try:
        if not isinstance(entry, dict):
          raise ValueError(f"entry is {type(entry).__name__}, expected an object")
        e = {_ALIASES.get(k, k): v for k, v in entry.items()}
        if not file:
          raise ValueError("entry has no 'file'")
        base.resolve_inside(self.root, file)
        if file in seen:
          raise base.Reject("duplicate", f"{where}: {file} is listed twice")
        seen.add(file)
        pathology = schema.normalize_pathology(e.get("pathology"))
        boxes = _parse_boxes(e.get("boxes"))
        if "is_valid" in e and not _truthy(e["is_valid"]):
          boxes = []
        if e.get("mask"):
          base.resolve_inside(self.root, str(e["mask"]))
        fold = e.get("fold", -1)
        payload = {
            "boxes": boxes, "mask": str(e.get("mask") or ""),
            "device": str(e.get("device") or schema.UNKNOWN).strip(),
            "birads": schema.normalize_birads(e.get("birads")),
            "histology": str(e.get("histology") or schema.UNKNOWN).strip().lower(),
            "where": where}
        fold = int(fold) if str(fold).strip() not in ("", "nan", "None") else -1
      except base.Reject as err:
        rejected.append(base.Rejection(file or where, err.code, err.message))
        continue
      except (ValueError, TypeError, json.JSONDecodeError) as err:
        code = "unknown_label" if "unknown" in str(err) else "bad_row"
        rejected.append(base.Rejection(file or where, code, f"{where}: {err}"))
        continue
      all_coords += [c for b in boxes for c in b]
      case_id = str(e.get("case_id") or "") or file
      items.append(base.Item(key=file, source_file=file, case_id=case_id, pathology=pathology, fold=fold,
                             split=str(e.get("split") or ""), payload=payload))
    units = self.box_units
    if units == "auto":
      units = "normalized" if all(0 <= c <= 1 for c in all_coords) else "pixels"
    items = [dataclasses.replace(it, payload={**it.payload, "units": units}) for it in items]
    warnings = []
    if items and all(it.case_id == it.source_file for it in items):
      warnings.append({"file": self.path.name, "code": "no_case_ids",
                       "message": "no case_id given: each image is its own case, so views of one patient may "
                                  "straddle splits"})
    vocab = schema.Vocab.from_values(devices=[it.payload["device"] for it in items],
                                     histologies=[it.payload["histology"] for it in items])
    return base.Plan(items=items, vocab=vocab, rejected=rejected, warnings=warnings)

  def load(self, item: base.Item):
    p = item.payload
    path = base.resolve_inside(self.root, item.source_file)
    image, warnings = base.load_grayscale(path, max_pixels=self.max_pixels, colour=self.colour,
                                          name=item.source_file)
    h, w = image.shape
    mask = None
    if p["mask"]:
      mask = base.load_mask(base.resolve_inside(self.root, p["mask"]), shape=image.shape, max_pixels=self.max_pixels)
      base.check_lesion_mask(mask, item.pathology, item.source_file)
    boxes = np.asarray(p["boxes"], np.float64).reshape(-1, 4)
    if p["units"] == "pixels":
      boxes = boxes / np.array([w, h, w, h])
    boxes = base.check_boxes(boxes)
    if not len(boxes) and mask is not None and mask.any():
      boxes = base.boxes_from_mask(mask)
    ex = schema.Example(
        id=item.key, image=image, mask=mask, boxes=boxes, pathology=item.pathology, device=p["device"],
        birads=p["birads"], histology=p["histology"], case_id=item.case_id, source_dataset=self.name,
        source_file=item.source_file, sha256=base.file_sha256(path), fold=item.fold, orig_height=h, orig_width=w)
    return ex, warnings
