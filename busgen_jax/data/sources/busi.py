"""BUSI folder layout: `<class>/<class> (N).png` with `<class> (N)_mask[_K].png` beside each image.

Classes are the folder names benign / malignant / normal. Boxes come from the masks: one per connected lesion
component (default) or one per mask file. The public copies hold byte-identical images, sometimes filed under
different classes: same-class copies keep the first and reject the rest as duplicates; conflicting copies are
all rejected by default (`on_conflict="exclude"`), or the first is kept (`"keep_first"`).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from pathlib import Path

import numpy as np

from busgen_jax.data import schema
from busgen_jax.data.sources import base

CLASSES = ("benign", "malignant", "normal")
_MASK_RE = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<k>\d+))?$", re.IGNORECASE)


def find_class_root(root: Path) -> Path:
  """The folder holding the class folders: `root` itself or one level below (archives often nest one)."""
  def has_classes(p):
    return any((p / c).is_dir() for c in CLASSES)
  if has_classes(root):
    return root
  subs = [p for p in sorted(root.iterdir()) if p.is_dir() and has_classes(p)] if root.is_dir() else []
  if len(subs) == 1:
    return subs[0]
  raise FileNotFoundError(f"{root}: no BUSI class folders ({', '.join(CLASSES)}) here or one level below")


@dataclasses.dataclass
class BusiSource:
  root: Path
  box_mode: str = "component"          # "component" | "mask_file"
  min_component_pixels: int = 16
  on_conflict: str = "exclude"         # "exclude" | "keep_first"
  max_pixels: int = 50_000_000
  colour: str = "luma"          # RGB with colour content: luma (with a warning) | reject
  name: str = "busi"

  def __post_init__(self):
    self.root = Path(self.root)
    if self.box_mode not in ("component", "mask_file"):
      raise ValueError(f"busi.box_mode must be 'component' or 'mask_file', got {self.box_mode!r}")
    if self.on_conflict not in ("exclude", "keep_first"):
      raise ValueError(f"busi.on_conflict must be 'exclude' or 'keep_first', got {self.on_conflict!r}")

  def plan(self) -> base.Plan:
    croot = find_class_root(self.root)
    images: list[tuple[str, str, list[str]]] = []  # (relative path, class, relative mask paths)
    ignored = []
    for cls_dir in sorted(p for p in croot.iterdir() if p.is_dir()):
      cls = cls_dir.name.lower()
      files = sorted(p for p in cls_dir.rglob("*") if p.is_file())
      if cls not in CLASSES:
        ignored += [{"file": self._rel(p), "reason": f"not in a class folder ({', '.join(CLASSES)})"} for p in files]
        continue
      masks = collections.defaultdict(list)
      candidates = []
      for p in files:
        m = _MASK_RE.match(p.stem)
        if p.suffix.lower() not in base.IMAGE_SUFFIXES:
          ignored.append({"file": self._rel(p), "reason": "not an image file"})
        elif m:
          masks[(p.parent, m["stem"])].append(p)
        else:
          candidates.append(p)
      for p in candidates:
        images.append((self._rel(p), cls, [self._rel(m) for m in sorted(masks.pop((p.parent, p.stem), []))]))
      for ms in masks.values():
        ignored += [{"file": self._rel(m), "reason": "mask without a matching image"} for m in ms]

    # Byte-identical images (hashing is cheap at BUSI's scale and must precede splitting).
    by_hash = collections.defaultdict(list)
    for rel, cls, ms in images:
      by_hash[base.file_sha256(self.root / rel)].append((rel, cls, ms))
    items, rejected, duplicates = [], [], []
    for digest, group in by_hash.items():
      keep = group[:1]
      if len(group) > 1:
        classes = sorted({g[1] for g in group})
        conflict = len(classes) > 1
        action = "excluded all (conflicting labels)" if conflict and self.on_conflict == "exclude" else \
            f"kept {group[0][0]}"
        duplicates.append({"sha256": digest, "files": [g[0] for g in group], "labels": [g[1] for g in group],
                           "conflict": conflict, "action": action})
        if conflict and self.on_conflict == "exclude":
          keep = []
          rejected += [base.Rejection(g[0], "label_conflict",
                                      f"byte-identical images filed as {', '.join(classes)}: {[x[0] for x in group]}")
                       for g in group]
        else:
          rejected += [base.Rejection(g[0], "duplicate", f"byte-identical to {group[0][0]}") for g in group[1:]]
      for rel, cls, ms in keep:
        key = "busi/" + Path(rel).with_suffix("").as_posix().removeprefix(croot.relative_to(self.root).as_posix() + "/")
        items.append(base.Item(key=key, source_file=rel, case_id=key, pathology=cls,
                               payload={"masks": ms, "sha256": digest}))
    items.sort(key=lambda it: it.key)
    return base.Plan(items=items, vocab=schema.Vocab.from_values(), rejected=rejected, duplicates=duplicates,
                     ignored_files=ignored)

  def _rel(self, p: Path) -> str:
    return p.relative_to(self.root).as_posix()

  def load(self, item: base.Item):
    image, warnings = base.load_grayscale(base.resolve_inside(self.root, item.source_file),
                                          max_pixels=self.max_pixels, colour=self.colour, name=item.source_file)
    masks = [base.load_mask(base.resolve_inside(self.root, m), shape=image.shape, max_pixels=self.max_pixels)
             for m in item.payload["masks"]]
    if item.pathology != "normal" and not masks:
      raise base.Reject("missing_mask", f"no mask file for a {item.pathology} image")
    union = np.any(masks, axis=0) if masks else None
    base.check_lesion_mask(union, item.pathology, item.source_file)
    if item.pathology == "normal":
      boxes = np.zeros((0, 4), np.float32)
    elif self.box_mode == "component":
      boxes = base.boxes_from_mask(union, min_pixels=self.min_component_pixels)
    else:
      for m, rel in zip(masks, item.payload["masks"]):
        if not m.any():
          raise base.Reject("empty_mask", f"mask file {rel} is empty")
      boxes = np.concatenate([base.boxes_from_mask(m, per_component=False) for m in masks])
    ex = schema.Example(id=item.key, image=image, mask=union, boxes=boxes, pathology=item.pathology,
                        case_id=item.case_id, source_dataset=self.name, source_file=item.source_file,
                        sha256=item.payload["sha256"], orig_height=image.shape[0], orig_width=image.shape[1])
    return ex, warnings
