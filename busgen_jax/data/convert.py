"""Parallel, shardable conversion of a source into ArrayRecord shards + TFDS metadata + conversion_report.json.

The layout is decided by the plan alone (examples per shard, split order), never by the number of hosts or
workers, so any `--num_shards` / `num_workers` gives the same files. Host `shard_index` of `num_shards` writes
the dataset shards whose global index is congruent to it, with `num_workers` processes; a shard whose report
exists is done (conversion resumes after interruption). Whoever finishes last (or `merge_only`) merges the
per-shard reports into the TFDS metadata and `conversion_report.json`, after checking that every host planned
the same dataset.

Output: `<output>/<name>/<version>/{<name>-<split>.array_record-XXXXX-of-YYYYY, dataset_info.json,
features.json, *.labels.txt, conversion_report.json, shard_reports/}`.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from busgen_jax.data import schema, splits
from busgen_jax.data.sources import base
from busgen_jax.data.sources.busbra import BusbraSource
from busgen_jax.data.sources.busi import BusiSource
from busgen_jax.data.sources.manifest import ManifestSource
from busgen_jax.data.sources.phantom import PhantomSource

FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
REPORT = "conversion_report.json"


# ----------------------------------------------------------------------------------------------------------
# Sources, from the convert config.

def _need_input(cfg) -> Path:
  if not cfg.input:
    raise ValueError(f"--config.input (or --input) is required for format {cfg.format!r}")
  p = Path(cfg.input).expanduser()
  if not p.exists():
    raise FileNotFoundError(f"{p}: input does not exist")
  return p


def _image_args(c) -> dict:
  if c.image.colour not in base.COLOUR_MODES:
    raise ValueError(f"image.colour must be one of {base.COLOUR_MODES}, got {c.image.colour!r}")
  return {"max_pixels": c.image.max_pixels, "colour": c.image.colour}


SOURCES: dict[str, Callable[[ml_collections.ConfigDict], base.Source]] = {
    "phantom": lambda c: PhantomSource(**c.phantom.to_dict(), name=c.name or "phantom"),
    "busi": lambda c: BusiSource(_need_input(c), **c.busi.to_dict(), **_image_args(c), name=c.name or "busi"),
    "busbra": lambda c: BusbraSource(_need_input(c), **c.busbra.to_dict(), **_image_args(c), name=c.name or "busbra"),
    "manifest": lambda c: ManifestSource(_need_input(c), **c.manifest.to_dict(), **_image_args(c),
                                         name=c.name or "manifest"),
}


def make_source(cfg) -> base.Source:
  if cfg.format not in SOURCES:
    raise ValueError(f"unknown format {cfg.format!r}; choose one of {sorted(SOURCES)}")
  return SOURCES[cfg.format](cfg)


# ----------------------------------------------------------------------------------------------------------
# Resizing for storage.

def resize_for_storage(ex: schema.Example, mode: str, size: int) -> schema.Example:
  """"max_side": shrink so the longer side is <= size (never enlarge); "square": size x size (aspect changes;
  boxes are normalised so they stay right); "none": as is."""
  h, w = ex.image.shape
  if mode == "none":
    return ex
  if mode == "max_side":
    scale = min(1.0, size / max(h, w))
    new = (max(1, round(w * scale)), max(1, round(h * scale)))
  elif mode == "square":
    new = (size, size)
  else:
    raise ValueError(f"image.resize must be max_side, square or none, got {mode!r}")
  if new == (w, h):
    return ex
  image = np.asarray(Image.fromarray(ex.image).resize(new, Image.Resampling.LANCZOS))
  mask = None
  if ex.mask is not None:
    m = Image.fromarray(np.asarray(ex.mask, np.uint8) * 255).resize(new, Image.Resampling.BILINEAR)
    mask = np.asarray(m) >= 128
  return dataclasses.replace(ex, image=image, mask=mask, orig_height=ex.orig_height or h,
                             orig_width=ex.orig_width or w)


# ----------------------------------------------------------------------------------------------------------
# Shard tasks (run in worker processes: everything here is picklable).

@dataclasses.dataclass(frozen=True)
class ShardTask:
  index: int                 # global shard index across splits
  split: str
  shard: int                 # index within the split
  num_split_shards: int
  items: tuple[base.Item, ...]


def shard_filename(name: str, split: str, shard: int, num: int) -> str:
  return f"{name}-{split}.array_record-{shard:05d}-of-{num:05d}"


def write_json(path: Path, obj: Any) -> None:
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default))
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  raise TypeError(type(o))


def write_shard(source: base.Source, vocab: schema.Vocab, image_cfg: dict, ds_dir: Path, name: str,
                fingerprint: str, task: ShardTask) -> dict:
  from array_record.python import array_record_module
  serialize = schema.Serializer(vocab)
  path = ds_dir / shard_filename(name, task.split, task.shard, task.num_split_shards)
  tmp = path.with_name(path.name + ".tmp")
  writer = array_record_module.ArrayRecordWriter(str(tmp), "group_size:1")
  rejections, warnings, converted = [], [], []
  counts = collections.defaultdict(collections.Counter)
  try:
    for item in task.items:
      try:
        ex, warn = source.load(item)
        ex = resize_for_storage(ex, image_cfg["resize"], image_cfg["size"])
        record = serialize(schema.to_feature_dict(ex, task.split))
      except base.Reject as e:
        rejections.append({"file": item.source_file or item.key, "code": e.code, "reason": e.message})
        continue
      except Exception as e:  # a bug or an unforeseen input: reported against the input, never a crash
        rejections.append({"file": item.source_file or item.key, "code": "error",
                           "reason": f"{type(e).__name__}: {e}"})
        continue
      writer.write(record)
      warnings += warn
      converted.append([ex.id, ex.sha256])
      for field in schema.LABEL_FIELDS:
        counts[field][getattr(ex, field)] += 1
      counts["boxes"][str(len(ex.boxes))] += 1
  finally:
    writer.close()
  os.replace(tmp, path)
  report = {"fingerprint": fingerprint, "index": task.index, "split": task.split, "shard": task.shard,
            "file": path.name, "num_examples": len(converted), "num_bytes": path.stat().st_size,
            "num_inputs": len(task.items), "rejections": rejections, "warnings": warnings,
            "converted": converted, "counts": {k: dict(v) for k, v in counts.items()}}
  write_json(ds_dir / "shard_reports" / f"shard-{task.index:05d}.json", report)
  return report


def _run_task(args):
  return write_shard(*args)


def _imap(fn, args, workers: int):
  """fn over args, in this process or in `workers` spawned processes (safe beside JAX and threads)."""
  if workers <= 1:
    yield from map(fn, args)
    return
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap_unordered(fn, args)


# ----------------------------------------------------------------------------------------------------------
# Conversion.

def plan_tasks(plan: base.Plan, split_of: dict[str, str], examples_per_shard: int) -> list[ShardTask]:
  by_split = collections.defaultdict(list)
  for it in plan.items:
    by_split[split_of[it.key]].append(it)
  names = [s for s in splits.CANONICAL_ORDER if s in by_split] + sorted(set(by_split) - set(splits.CANONICAL_ORDER))
  tasks = []
  for split in names:
    items = by_split[split]
    n = max(1, math.ceil(len(items) / examples_per_shard))
    for k in range(n):
      # Strided, so every shard of a split gets a similar label mix.
      tasks.append(ShardTask(len(tasks), split, k, n, tuple(items[k::n])))
  return tasks


def dataset_dir(cfg, source: base.Source) -> Path:
  return Path(cfg.output).expanduser() / source.name / cfg.version


def convert(cfg: ml_collections.ConfigDict) -> Path:
  """Converts this host's part of the dataset; merges when every part is done. Returns the dataset dir."""
  if not cfg.output:
    raise ValueError("--config.output (or --output / --workdir) is required")
  if not 0 <= cfg.shard_index < cfg.num_shards:
    raise ValueError(f"shard_index must be in [0, num_shards), got {cfg.shard_index} of {cfg.num_shards}")
  source = make_source(cfg)
  t0 = time.time()
  plan = source.plan()
  split_of = splits.assign(plan.items, cfg.split.scheme, fractions=cfg.split.fractions.to_dict(),
                           seed=cfg.split.seed, test_fold=cfg.split.test_fold, val_fold=cfg.split.val_fold)
  tasks = plan_tasks(plan, split_of, cfg.examples_per_shard)
  ds = dataset_dir(cfg, source)
  (ds / "shard_reports").mkdir(parents=True, exist_ok=True)
  fingerprint = hashlib.sha256(json.dumps(
      [cfg.to_dict().get(k) for k in ("format", "name", "version", "image", "split", "examples_per_shard",
                                      cfg.format)] + [[t.split, [it.key for it in t.items]] for t in tasks],
      sort_keys=True, default=str).encode()).hexdigest()[:16]
  write_json(ds / "shard_reports" / "plan.json", {
      "fingerprint": fingerprint, "num_tasks": len(tasks), "num_inputs": plan.num_inputs,
      "vocab": plan.vocab.to_json(), "rejected": [dataclasses.asdict(r) for r in plan.rejected],
      "duplicates": plan.duplicates, "ignored_files": plan.ignored_files, "warnings": plan.warnings,
      "config": cfg.to_dict()})
  logging.info("planned %d inputs (%d rejected at planning) into %d shards in %.1fs", plan.num_inputs,
               len(plan.rejected), len(tasks), time.time() - t0)

  mine = [t for t in tasks if t.index % cfg.num_shards == cfg.shard_index]
  todo = [t for t in mine if not shard_done(ds, t.index, fingerprint)]
  if len(todo) < len(mine):
    logging.info("resuming: %d of this host's %d shards are already written", len(mine) - len(todo), len(mine))
  image_cfg = cfg.image.to_dict()
  args = [(source, plan.vocab, image_cfg, ds, source.name, fingerprint, t) for t in todo]
  workers = cfg.num_workers if cfg.num_workers >= 0 else (os.cpu_count() or 1)
  workers = min(workers, len(args))
  done = 0
  n_items = sum(len(t.items) for t in todo)
  t1 = time.time()
  for rep in _imap(_run_task, args, workers):
    done += rep["num_inputs"]
    rate = done / max(time.time() - t1, 1e-9)
    logging.info("shard %s/%d %s: %d written, %d rejected | %d/%d inputs, %.0f/s, ETA %.0fs", rep["index"] + 1,
                 len(tasks), rep["split"], rep["num_examples"], len(rep["rejections"]), done, n_items, rate,
                 (n_items - done) / max(rate, 1e-9))
  if all(shard_done(ds, t.index, fingerprint) for t in tasks):
    merge(ds)
  else:
    logging.info("this host's shards are done; the dataset is merged when every host has finished "
                 "(or run again with --config.merge_only=True)")
  return ds


def shard_done(ds: Path, index: int, fingerprint: str) -> bool:
  """Whether shard `index` is written (its file exists) by a run with this fingerprint."""
  p = ds / "shard_reports" / f"shard-{index:05d}.json"
  if not p.exists():
    return False
  rep = json.loads(p.read_text())
  return rep["fingerprint"] == fingerprint and (ds / rep["file"]).exists()


def merge(ds: Path) -> dict:
  """Per-shard reports -> TFDS metadata + conversion_report.json. Idempotent."""
  import tensorflow_datasets as tfds
  plan = json.loads((ds / "shard_reports" / "plan.json").read_text())
  reports = []
  for i in range(plan["num_tasks"]):
    p = ds / "shard_reports" / f"shard-{i:05d}.json"
    if not p.exists():
      raise FileNotFoundError(f"{p}: shard {i} has not been written yet; run the remaining hosts first")
    rep = json.loads(p.read_text())
    if rep["fingerprint"] != plan["fingerprint"]:
      raise ValueError(f"{p}: written from a different plan ({rep['fingerprint']} != {plan['fingerprint']}): "
                       "every host must use the same config and input")
    reports.append(rep)
  vocab = schema.Vocab(device=tuple(plan["vocab"]["device"]), histology=tuple(plan["vocab"]["histology"]))
  name = plan["config"]["name"] or plan["config"]["format"]
  split_infos = []
  by_split = collections.defaultdict(list)
  for rep in reports:
    by_split[rep["split"]].append(rep)
  for split, reps in by_split.items():
    reps.sort(key=lambda r: r["shard"])
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=[r["num_examples"] for r in reps], num_bytes=sum(r["num_bytes"] for r in reps),
        filename_template=tfds.core.ShardedFileTemplate(data_dir=ds, template=FILENAME_TEMPLATE,
                                                        dataset_name=name, split=split, filetype_suffix="array_record")))
  tfds.folder_dataset.write_metadata(
      data_dir=ds, features=schema.features(vocab), split_infos=split_infos, filename_template=FILENAME_TEMPLATE,
      description=f"busgen-jax {plan['config']['format']} dataset in the busgen-jax record schema "
                  f"(busgen_jax/data/schema.py). See conversion_report.json.",
      check_data=False)

  # The report: every input is converted or rejected.
  rejections = plan["rejected"] + [r for rep in reports for r in rep["rejections"]]
  converted = sum(rep["num_examples"] for rep in reports)
  counts: dict[str, Any] = {"split": {}, "by_split": {}}
  for rep in reports:
    counts["split"][rep["split"]] = counts["split"].get(rep["split"], 0) + rep["num_examples"]
    per = counts["by_split"].setdefault(rep["split"], {})
    for field, c in rep["counts"].items():
      for k, v in c.items():
        per.setdefault(field, {})[k] = per.setdefault(field, {}).get(k, 0) + v
        counts.setdefault(field, {})[k] = counts.get(field, {}).get(k, 0) + v
  by_hash = collections.defaultdict(list)
  for rep in reports:
    for key, digest in rep["converted"]:
      by_hash[digest].append(key)
  duplicates = plan["duplicates"] + [{"sha256": d, "files": keys, "action": "kept all (found after conversion)"}
                                     for d, keys in by_hash.items() if len(keys) > 1]
  reasons = collections.Counter(r["code"] for r in rejections)
  report = {
      "dataset": name, "format": plan["config"]["format"], "input": plan["config"]["input"],
      "directory": plan.get("directory", str(ds)), "schema_version": schema.SCHEMA_VERSION,
      "inputs": plan["num_inputs"], "converted": converted, "rejected": len(rejections),
      "accounted": plan["num_inputs"] == converted + len(rejections),
      "rejections_by_code": dict(reasons), "rejections": rejections, "duplicates": duplicates,
      "warnings": plan["warnings"] + [w for rep in reports for w in rep["warnings"]],
      "ignored_files": plan["ignored_files"], "counts": counts, "vocab": plan["vocab"],
      "shards": [{k: rep[k] for k in ("file", "split", "num_examples", "num_bytes")} for rep in reports],
      "config": plan["config"],
  }
  if not report["accounted"]:  # would be a bug in a source: say so loudly rather than write a wrong report
    raise AssertionError(f"{ds}: {plan['num_inputs']} inputs but {converted} converted + {len(rejections)} rejected")
  write_json(ds / REPORT, report)
  logging.info("%s: %d inputs -> %d converted, %d rejected %s; splits %s", ds, report["inputs"], converted,
               len(rejections), dict(reasons), counts["split"])
  return report


# ----------------------------------------------------------------------------------------------------------
# Subsets of a converted dataset, records copied byte for byte (the audit's filter, a few-shot site's images).

def copy_records(src, picks: dict[str, list[tuple[str, int]]], output: str | Path, *, fmt: str,
                 rejections: list[dict] | None = None, note: dict | None = None,
                 examples_per_shard: int = 1024) -> Path:
  """A new dataset at output/<name>/<version> whose split `s` holds the records `picks[s]` ((split, index) of
  `src`, in that order). `rejections` (records of `src` left out, with a code and reason) go into the
  conversion report, so every record of `src` named there is accounted for. Returns the dataset directory."""
  from array_record.python import array_record_module
  from busgen_jax.data import reader
  ds = src if isinstance(src, reader.Dataset) else reader.open_dataset(src)
  out = Path(output).expanduser() / ds.name / ds.dir.name
  if out.resolve() == ds.dir.resolve():
    raise ValueError(f"{out}: a copy must not overwrite the dataset it copies")
  for split, items in picks.items():
    for s, i in items:
      if s not in ds.splits or not 0 <= int(i) < ds.splits[s]:
        raise ValueError(f"{ds.dir}: no record {i} in split {s!r} (splits {ds.splits}), picked for {split!r}")
  (out / "shard_reports").mkdir(parents=True, exist_ok=True)
  tasks = [(split, k, items[k * examples_per_shard:(k + 1) * examples_per_shard],
            max(1, math.ceil(len(items) / examples_per_shard)))
           for split, items in picks.items() for k in range(max(1, math.ceil(len(items) / examples_per_shard)))]
  rejections = list(rejections or [])
  fingerprint = hashlib.sha256(json.dumps([str(ds.dir), picks, len(rejections)], default=str).encode()).hexdigest()
  write_json(out / "shard_reports" / "plan.json", {
      "fingerprint": fingerprint, "num_tasks": len(tasks),
      "num_inputs": sum(len(v) for v in picks.values()) + len(rejections),
      "vocab": {"device": ds.vocab("device"), "histology": ds.vocab("histology")},
      "rejected": rejections, "duplicates": [], "ignored_files": [], "warnings": [],
      "config": {"name": ds.name, "format": fmt, "input": str(ds.dir), **(note or {})}})
  records = {s: ds.records(s) for s in {s for items in picks.values() for s, _ in items}}
  for task, (split, k, items, n) in enumerate(tasks):
    path = out / shard_filename(ds.name, split, k, n)
    writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
    converted, counts = [], {"pathology": {}, "device": {}, "boxes": {}}
    try:
      for s, i in items:
        rec = records[s][int(i)]
        ex = ds.decode(rec, skip=("image", "mask"))
        writer.write(rec)
        converted.append([ex["id"], ex["sha256"]])
        for f, v in (("pathology", ds.vocab("pathology")[ex["pathology"]]),
                     ("device", ds.vocab("device")[ex["device"]]), ("boxes", str(len(ex["boxes"])))):
          counts[f][v] = counts[f].get(v, 0) + 1
    finally:
      writer.close()
    write_json(out / "shard_reports" / f"shard-{task:05d}.json", {
        "fingerprint": fingerprint, "index": task, "split": split, "shard": k, "file": path.name,
        "num_examples": len(converted), "num_bytes": path.stat().st_size, "num_inputs": len(converted),
        "rejections": [], "warnings": [], "converted": converted, "counts": counts})
  merge(out)
  return out


# ----------------------------------------------------------------------------------------------------------

def default_config() -> ml_collections.ConfigDict:
  """Conversion settings; `configs/convert.py` exposes these with the command that runs them."""
  c = ml_collections.ConfigDict()
  c.format = "phantom"          # one of SOURCES
  c.input = ""                  # input root (busi, busbra) or manifest file (manifest)
  c.output = ""                 # data_dir; the dataset goes to <output>/<name>/<version>
  c.name = ""                   # dataset name (default: the format)
  c.version = "1.0.0"
  # colour: RGB files with colour content (annotation marks, Doppler): "luma" converts them (a warning per file
  # in the report, as the official code's convert("RGB") keeps them) | "reject" (unsupported_mode)
  c.image = ml_collections.ConfigDict({"resize": "max_side", "size": 256, "max_pixels": 50_000_000,
                                       "colour": "luma"})
  c.split = ml_collections.ConfigDict({
      "scheme": "random", "fractions": {"train": 0.8, "val": 0.1, "test": 0.1}, "seed": 0,
      "test_fold": 1, "val_fold": -1})
  c.examples_per_shard = 1024
  c.num_workers = -1            # processes on this host; -1: one per core, 0: in this process
  c.shard_index = 0             # this host's index when several hosts convert one dataset
  c.num_shards = 1              # number of hosts
  c.merge_only = False          # only merge the per-shard reports (after every host finished)
  c.phantom = ml_collections.ConfigDict(dataclasses.asdict(PhantomSource()))
  del c.phantom.name
  c.busi = ml_collections.ConfigDict({"box_mode": "component", "min_component_pixels": 16, "on_conflict": "exclude"})
  c.busbra = ml_collections.ConfigDict({"csv_file": "bus_data.csv", "folds_file": "5-fold-cv.csv",
                                        "box_iou_warn": 0.5})
  c.manifest = ml_collections.ConfigDict({"root": "", "box_units": "auto"})
  return c


def run(cfg: ml_collections.ConfigDict) -> Path:
  if cfg.merge_only:
    source = make_source(cfg)
    ds = dataset_dir(cfg, source)
    merge(ds)
    return ds
  return convert(cfg)
