"""`busgen-jax quality --config configs/quality_phantom.py`: how faithful, diverse and correctly conditioned a
generated repository is, against real images, in one report (quality.json / .md / .html).

  fidelity, diversity  FD, KID, precision and recall with intervals (quality.py), overall and per condition
                       (pathology x device by default), on a domain encoder (a `classify` checkpoint's
                       penultimate layer), named in the report.
  conditional accuracy the same classifier, trained on real data, labels the generated images: agreement with the
                       label each image was generated for, next to its accuracy on the real images (the ceiling).
  box fidelity         a lesion where the box condition put it: ultrasound lesions are darker than the tissue
                       around them, so the contrast (ring - inside) / (ring + inside) of each image's own box is
                       compared with the contrast of another image's box on the same image (AUC; 0.5 = the
                       lesion ignores the box). The same AUC on real images is the reference.
  TSTR / TRTR          the headline: a classifier trained on the generated data vs one trained on real data, both
                       tested on real data (two `classify` workdirs).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import ml_collections
import numpy as np

from busgen_jax import paths
from busgen_jax.data import reader
from busgen_jax.evaluate import metrics, quality, report as report_lib


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.real = ""                   # real dataset directory
  c.real_split = "train"
  c.generated = ""              # generated dataset directory
  c.generated_split = "train"
  c.generated_limit = 0         # > 0: a seeded random subset of this many generated images (FD depends on the count)
  c.encoder = ""                # `busgen-jax classify` <workdir>/best, trained on real data (required)
  c.classifiers = ()            # more `classify` <workdir>/best checkpoints (e.g. one with task.field=device): each
                                # adds the conditional accuracy of its own label field
  c.conditions = ("pathology", "device")   # per-condition metrics over these label fields (() = overall only)
  c.min_count = 10              # conditions with fewer images on either side are listed as skipped
  c.k = 3                       # precision / recall neighbourhood
  c.bootstrap = 100
  c.kid_subsets = 100
  c.kid_subset_size = 1000
  c.box_ring = 0.5              # the ring around a box: this share of its size on each side
  c.seed = 0
  c.tstr = report_lib.tstr_config()
  return c


# ------------------------------------------------------------------------------------------------ box fidelity

def box_contrast(image: np.ndarray, box: np.ndarray, ring: float = 0.5) -> float:
  """(ring mean - inside mean) / (ring mean + inside mean) of a normalised box [x1, y1, x2, y2] on a uint8 image;
  NaN when the box or its ring is empty."""
  h, w = image.shape[:2]
  x1, y1, x2, y2 = box
  bw, bh = x2 - x1, y2 - y1
  inner = image[int(y1 * h):max(int(y1 * h) + 1, int(np.ceil(y2 * h))),
                int(x1 * w):max(int(x1 * w) + 1, int(np.ceil(x2 * w)))].astype(np.float64)
  oy1, oy2 = max(0, int((y1 - ring * bh) * h)), min(h, int(np.ceil((y2 + ring * bh) * h)))
  ox1, ox2 = max(0, int((x1 - ring * bw) * w)), min(w, int(np.ceil((x2 + ring * bw) * w)))
  outer = image[oy1:oy2, ox1:ox2].astype(np.float64)
  n_ring = outer.size - inner.size
  if inner.size == 0 or n_ring <= 0:
    return float("nan")
  m_in, m_ring = inner.mean(), (outer.sum() - inner.sum()) / n_ring
  return float((m_ring - m_in) / max(m_ring + m_in, 1e-6))


def box_fidelity(images, boxes, *, ring: float = 0.5, seed: int = 0, n_bootstrap: int = 500) -> dict:
  """AUC that an image's own lesion box has more lesion contrast than another image's box placed on it."""
  keep = [i for i, b in enumerate(boxes) if len(b)]
  if len(keep) < 4:
    return {"n": len(keep), "auc": float("nan"), "auc_ci95": [float("nan")] * 2, "note": "fewer than 4 images with boxes"}
  rng = np.random.default_rng(seed)
  perm = rng.permutation(keep)
  own = np.array([box_contrast(images[i], boxes[i][0], ring) for i in keep])
  other = np.array([box_contrast(images[i], boxes[j][0], ring) for i, j in zip(keep, perm)])
  ok = np.isfinite(own) & np.isfinite(other)
  y = np.r_[np.ones(ok.sum()), np.zeros(ok.sum())]
  auc, lo, hi = metrics.bootstrap_ci(y, np.r_[own[ok], other[ok]], n=n_bootstrap, seed=seed)
  return {"n": int(ok.sum()), "auc": auc, "auc_ci95": [lo, hi], "mean_contrast_own_box": float(own[ok].mean()),
          "mean_contrast_other_box": float(other[ok].mean())}


# ------------------------------------------------------------------------------------------------ conditional accuracy

def conditional_accuracy(probs: np.ndarray, classes, requested) -> dict:
  """Agreement of a classifier's prediction with the requested label, over images whose label is one of its
  classes; overall and per class."""
  requested = np.asarray(requested)
  keep = np.isin(requested, classes)
  if not keep.any():
    return {"n": 0, "accuracy": float("nan"), "per_class": {}}
  pred = np.asarray(classes)[np.argmax(probs[keep], -1)]
  req = requested[keep]
  return {"n": int(keep.sum()), "accuracy": float(np.mean(pred == req)),
          "per_class": {c: {"n": int((req == c).sum()), "accuracy": float(np.mean(pred[req == c] == c))}
                        for c in classes if (req == c).any()}}


# ------------------------------------------------------------------------------------------------ the stage

def run(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  from busgen_jax.evaluate import encoder as encoder_lib
  t0 = time.time()
  for name in ("real", "generated", "encoder"):
    if not cfg[name]:
      raise ValueError(f"--config.{name} is required")
  work = paths.path(workdir)   # local or gs://
  work.mkdir(parents=True, exist_ok=True)
  enc = encoder_lib.ClassifierEncoder(cfg.encoder)
  real = enc(cfg.real, cfg.real_split)
  gen_idx = reader.subsample(reader.open_dataset(cfg.generated).splits.get(cfg.generated_split, 0),
                             cfg.get("generated_limit", 0), cfg.seed)
  gen = enc(cfg.generated, cfg.generated_split, indices=gen_idx)
  label = lambda d: ["/".join(d[f][i] for f in cfg.conditions) for i in range(len(d["index"]))] \
      if cfg.conditions else ["all"] * len(d["index"])
  kw = dict(k=cfg.k, bootstrap_samples=cfg.bootstrap, kid_subsets=cfg.kid_subsets,
            kid_subset_size=cfg.kid_subset_size, seed=cfg.seed)
  fid = quality.per_condition(real["features"], label(real), gen["features"], label(gen), encoder=enc.name,
                              min_count=cfg.min_count, **kw)
  def agreement(e, r, g):
    return {"field": e.field, "classes": e.classes, "classifier": e.name,
            "generated": conditional_accuracy(g["probs"], e.classes, g[e.field]),
            "real": conditional_accuracy(r["probs"], e.classes, r[e.field])}

  cond = agreement(enc, real, gen)
  more = []
  for d in cfg.classifiers:
    e = encoder_lib.ClassifierEncoder(d)
    more.append(agreement(e, e(cfg.real, cfg.real_split), e(cfg.generated, cfg.generated_split, indices=gen_idx)))
  boxes = {}
  for key, path, split, idx in (("generated", cfg.generated, cfg.generated_split, gen_idx),
                                ("real", cfg.real, cfg.real_split, None)):
    d = reader.read_images(path, split, idx)
    boxes[key] = box_fidelity(d["images"], d["boxes"], ring=cfg.box_ring, seed=cfg.seed)
  gen_ds = reader.open_dataset(cfg.generated)
  rep = {"real": {"dataset": str(reader.open_dataset(cfg.real).dir), "split": cfg.real_split},
         "generated": {"dataset": str(gen_ds.dir), "split": cfg.generated_split, "name": gen_ds.name},
         "encoder": enc.name, "fidelity": fid, "conditional_accuracy": cond,
         "conditional_accuracy_more": more, "box_fidelity": boxes,
         "tstr": report_lib.tstr_headline(cfg.tstr), "config": cfg.to_dict()}
  rep["seconds"] = time.time() - t0
  write_report(work, rep)
  return rep


def _ci(r: dict) -> str:
  return f"{r['value']:.3g} [{r['ci'][0]:.3g}, {r['ci'][1]:.3g}]"


def write_report(work: Path, rep: dict) -> dict[str, Path]:
  fid = rep["fidelity"]
  rows = [["condition", "n real / gen", "FD [95% CI]", "KID x1e3 [95% CI]", "precision", "recall"]]
  for name, r in [("all", fid["all"]), *fid["conditions"].items()]:
    k = r["kid"]
    rows.append([name, f"{r['num_real']} / {r['num_generated']}", _ci(r["fd"]),
                 f"{1e3 * k['value']:.3g} [{1e3 * k['ci'][0]:.3g}, {1e3 * k['ci'][1]:.3g}]",
                 _ci(r["precision"]), _ci(r["recall"])])
  c = rep["conditional_accuracy"]
  b = rep["box_fidelity"]
  box_row = lambda r: (f"AUC {r['auc']:.3f} [{r['auc_ci95'][0]:.3f}, {r['auc_ci95'][1]:.3f}] over {r['n']} images"
                       if r["n"] >= 4 else r.get("note", "n/a"))
  lines = [f"# Quality of {rep['generated']['name']}", "", report_lib.tstr_line(rep["tstr"]), "",
           f"Real reference: `{rep['real']['dataset']}` ({rep['real']['split']}). Encoder: {rep['encoder']}.", "",
           "## Fidelity and diversity", "", report_lib.markdown_table(rows), ""]
  if fid["skipped"]:
    lines += ["Skipped (too few images): " + ", ".join(f"{k} ({v['num_real']} real / {v['num_generated']} generated)"
                                                      for k, v in fid["skipped"].items()), ""]
  lines += ["## Conditioning", "",
            f"- Conditional accuracy ({c['field']}: {', '.join(c['classes'])}): the real-data classifier agrees with "
            f"the requested label on **{c['generated']['accuracy']:.3f}** of {c['generated']['n']} generated images; "
            f"its accuracy on the real images is {c['real']['accuracy']:.3f} ({c['real']['n']}).",
            *[f"- Conditional accuracy ({m['field']}, {m['classifier']}): {m['generated']['accuracy']:.3f} of "
              f"{m['generated']['n']} generated images; real {m['real']['accuracy']:.3f} ({m['real']['n']})."
              for m in rep.get("conditional_accuracy_more", [])],
            f"- Box fidelity (own box vs another image's box, lesion contrast): generated {box_row(b['generated'])}; "
            f"real {box_row(b['real'])}. 0.5 = the lesion ignores the box.", "",
            "FD and KID: lower is closer to the real images (compare FD only at equal set sizes); precision: share "
            "of generated images inside the real manifold (fidelity); recall: share of real images inside the "
            "generated manifold (diversity).", ""]
  paths = {"json": work / "quality.json", "md": work / "quality.md", "html": work / "quality.html"}
  paths["json"].write_text(json.dumps(rep, indent=1, default=float))
  paths["md"].write_text("\n".join(lines))
  paths["html"].write_text(report_lib.html_page("busgen-jax quality", report_lib.markdown_to_html("\n".join(lines),
                                                                                                   work)))
  return paths
