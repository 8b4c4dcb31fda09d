"""Lesion-box priors: where, how elongated and how large lesions are, per pathology (optionally per device).

As in BUSGen: a Gaussian KDE (bandwidth 0.001) over (centre x, centre y, aspect ratio h/w, area w*h) of the
training boxes. Sampling a KDE = pick a training box uniformly, add N(0, bandwidth^2) to its features. The
box is rebuilt from the features, shifted to lie inside the image and clamped to [0, 1].

  busgen-jax fit-box-prior --config.dataset=/tmp/phantom/phantom/1.0.0 --workdir /tmp/prior

writes /tmp/prior/box_prior.json (plain JSON; `.npz` output is also supported; never pickle).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Sequence

import ml_collections
import numpy as np
from absl import logging

from busgen_jax import paths

FEATURES = ("cx", "cy", "aspect", "area")
FORMAT = "busgen-box-prior"


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.dataset = ""               # a dataset directory (comma-separated for several)
  c.split = "train"
  c.bandwidth = 0.001          # official
  c.by_device = False          # also fit pathology x device groups (used when they have min_group_size boxes)
  c.min_group_size = 5
  c.output = ""                # default: <workdir>/box_prior.json
  return c


def box_features(boxes: np.ndarray) -> np.ndarray:
  """(n, 4) normalised x1, y1, x2, y2 -> (n, 4) cx, cy, h/w, w*h (degenerate boxes dropped)."""
  b = np.asarray(boxes, np.float64).reshape(-1, 4)
  w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
  ok = (w > 0) & (h > 0)
  b, w, h = b[ok], w[ok], h[ok]
  return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2, h / w, w * h], 1)


def features_to_boxes(f: np.ndarray) -> np.ndarray:
  """Inverse of box_features, keeping every box inside the unit square (shifted in, then clamped)."""
  f = np.asarray(f, np.float64).reshape(-1, 4)
  aspect, area = np.maximum(f[:, 2], 1e-3), np.clip(f[:, 3], 1e-6, 1.0)
  w = np.sqrt(area / aspect)
  h = aspect * w
  w, h = np.minimum(w, 1.0), np.minimum(h, 1.0)
  cx = np.clip(f[:, 0], w / 2, 1 - w / 2)
  cy = np.clip(f[:, 1], h / 2, 1 - h / 2)
  return np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1), 0.0, 1.0).astype(np.float32)


@dataclasses.dataclass
class BoxPrior:
  bandwidth: float
  groups: dict[str, np.ndarray]          # "benign" or "benign|GE-LOGIQ-E9" -> (n, 4) features
  source: dict = dataclasses.field(default_factory=dict)

  @staticmethod
  def key(pathology: str, device: str | None = None) -> str:
    return pathology if device is None else f"{pathology}|{device}"

  def has(self, pathology: str, device: str | None = None) -> bool:
    return self.key(pathology, device) in self.groups

  def sample(self, pathology: str, n: int, rng: np.random.Generator, device: str | None = None) -> np.ndarray:
    """n boxes (n, 4) for a pathology (and device when that group was fitted; else the pathology's)."""
    key = self.key(pathology, device) if device is not None and self.has(pathology, device) else pathology
    if key not in self.groups:
      raise KeyError(f"the box prior has no boxes for {pathology!r} (groups: {sorted(self.groups)})")
    data = self.groups[key]
    pick = data[rng.integers(0, len(data), size=n)]
    return features_to_boxes(pick + rng.normal(0.0, self.bandwidth, size=pick.shape))

  # ---------------------------------------------------------------------------------------------- storage

  def save(self, path: str | Path) -> Path:
    path = paths.path(path)   # local or gs://
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".npz":
      with path.open("wb") as f:
        np.savez(f, __meta__=np.asarray(json.dumps(self._meta())),
                 **{f"group/{k}": v for k, v in self.groups.items()})
    else:
      path.write_text(json.dumps({**self._meta(), "groups": {k: v.tolist() for k, v in self.groups.items()}}))
    return path

  def _meta(self) -> dict:
    return {"format": FORMAT, "version": 1, "features": list(FEATURES), "bandwidth": self.bandwidth,
            "counts": {k: len(v) for k, v in self.groups.items()}, "source": self.source}

  @classmethod
  def load(cls, path: str | Path) -> "BoxPrior":
    path = paths.path(path)   # local or gs://
    try:
      if path.suffix == ".npz":
        with path.open("rb") as f, np.load(f, allow_pickle=False) as z:
          meta = json.loads(str(z["__meta__"]))
          groups = {k.removeprefix("group/"): np.asarray(z[k], np.float64) for k in z.files if k != "__meta__"}
      else:
        meta = json.loads(path.read_text())
        groups = {k: np.asarray(v, np.float64).reshape(-1, 4) for k, v in meta.pop("groups").items()}
    except (OSError, ValueError, KeyError) as e:
      raise ValueError(f"{path}: not a box prior ({type(e).__name__}: {e})") from e
    if meta.get("format") != FORMAT or tuple(meta.get("features", ())) != FEATURES:
      raise ValueError(f"{path}: not a {FORMAT} file with features {FEATURES}")
    return cls(float(meta["bandwidth"]), groups, meta.get("source", {}))


def fit(boxes: Sequence[np.ndarray], pathologies: Sequence[str], devices: Sequence[str] | None = None, *,
        bandwidth: float = 0.001, by_device: bool = False, min_group_size: int = 5, source: dict | None = None
        ) -> BoxPrior:
  """A prior from per-image boxes (each (n, 4)) and their labels; every box of an image counts."""
  groups: dict[str, list] = {}
  for i, (b, p) in enumerate(zip(boxes, pathologies)):
    f = box_features(b)
    if not len(f):
      continue
    groups.setdefault(p, []).append(f)
    if by_device and devices is not None:
      groups.setdefault(BoxPrior.key(p, devices[i]), []).append(f)
  out = {k: np.concatenate(v) for k, v in groups.items()}
  small = [k for k, v in out.items() if "|" in k and len(v) < min_group_size]
  for k in small:   # sampled from the pathology's group instead
    del out[k]
  if small:
    logging.info("box prior: %d pathology|device groups with < %d boxes fall back to their pathology: %s",
                 len(small), min_group_size, small)
  if not out:
    raise ValueError("no lesion boxes to fit a box prior on")
  return BoxPrior(bandwidth, out, source or {})


def fit_datasets(paths: Sequence[str], split: str = "train", exclude_devices: Sequence[str] = (), **kw) -> BoxPrior:
  """Fits on the boxes of datasets in the record format (images are not decoded), leaving out the images of
  `exclude_devices` (e.g. a few-shot site's scanner)."""
  from busgen_jax.data import reader
  boxes, paths_, devices, counts = [], [], [], {}
  for p in paths:
    ds = reader.open_dataset(p)
    pathology, device = ds.vocab("pathology"), ds.vocab("device")
    records = ds.records(split)
    for i in range(len(records)):
      ex = ds.decode(records[i], skip=("image", "mask"))
      if device[ex["device"]] in exclude_devices:
        continue
      boxes.append(ex["boxes"])
      paths_.append(pathology[ex["pathology"]])
      devices.append(device[ex["device"]])
    counts[str(ds.dir)] = len(records)
  source = {"datasets": counts, "split": split}
  if exclude_devices:
    source["excluded_devices"] = list(exclude_devices)
  return fit(boxes, paths_, devices, source=source, **kw)


def run(cfg: ml_collections.ConfigDict, workdir: str | None) -> Path:
  if not cfg.dataset:
    raise ValueError("--config.dataset (a dataset directory) is required")
  if not (cfg.output or workdir):
    raise ValueError("--workdir or --config.output is required")
  out = paths.path(cfg.output or f"{workdir}/box_prior.json")   # local or gs://
  prior = fit_datasets([p for p in cfg.dataset.split(",") if p], cfg.split, bandwidth=cfg.bandwidth,
                       by_device=cfg.by_device, min_group_size=cfg.min_group_size)
  prior.save(out)
  logging.info("box prior %s: %s", out, {k: len(v) for k, v in prior.groups.items()})
  return out
