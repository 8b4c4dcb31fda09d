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
from typing import Callable

import ml_collections
import numpy as np
from absl import logging
from PIL import Image

from busgen_jax import console
from busgen_jax.data import schema, splits, writer
from busgen_jax.data.sources import base
from busgen_jax.data.sources.busbra import BusbraSource
from busgen_jax.data.sources.busi import BusiSource
from busgen_jax.data.sources.manifest import ManifestSource
from busgen_jax.data.sources.phantom import PhantomSource

REPORT = writer.REPORT


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


def write_shard(source: base.Source, vocab: schema.Vocab, image_cfg: dict, ds_dir: Path, name: str,
                fingerprint: str, task: ShardTask) -> dict:
  serialize = schema.Serializer(vocab)
  with writer.Shard(ds_dir, name, task.split, task.shard, task.num_split_shards, index=task.index,
                    fingerprint=fingerprint) as shard:
    for item in task.items:
      try:
        ex, warn = source.load(item)
        ex = resize_for_storage(ex, image_cfg["resize"], image_cfg["size"])
        record = serialize(schema.to_feature_dict(ex, task.split))
      except base.Reject as e:
        shard.reject(item.source_file or item.key, e.code, e.message)
        continue
      except Exception as e:  # a bug or an unforeseen input: reported against the input, never a crash
        shard.reject(item.source_file or item.key, "error", f"{type(e).__name__}: {e}")
        continue
      shard.warnings += warn
      shard.add(record, id=ex.id, sha256=ex.sha256,
                counts={**{f: getattr(ex, f) for f in schema.LABEL_FIELDS}, "boxes": str(len(ex.boxes))})
  return shard.report


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
  fingerprint = hashlib.sha256(json.dumps(
      [cfg.to_dict().get(k) for k in ("format", "name", "version", "image", "split", "examples_per_shard",
                                      cfg.format)] + [[t.split, [it.key for it in t.items]] for t in tasks],
      sort_keys=True, default=str).encode()).hexdigest()[:16]
  writer.write_plan(ds, fingerprint=fingerprint, num_tasks=len(tasks), num_inputs=plan.num_inputs,
                    vocab=plan.vocab.to_json(), rejected=[dataclasses.asdict(r) for r in plan.rejected],
                    duplicates=plan.duplicates, ignored_files=plan.ignored_files, warnings=plan.warnings,
                    config=cfg.to_dict())
  logging.info("planned %d inputs (%d rejected at planning) into %d shards in %.1fs", plan.num_inputs,
               len(plan.rejected), len(tasks), time.time() - t0)

  mine = [t for t in tasks if t.index % cfg.num_shards == cfg.shard_index]
  todo = [t for t in mine if not writer.shard_done(ds, t.index, fingerprint)]
  if len(todo) < len(mine):
    logging.info("resuming: %d of this host's %d shards are already written", len(mine) - len(todo), len(mine))
  image_cfg = cfg.image.to_dict()
  args = [(source, plan.vocab, image_cfg, ds, source.name, fingerprint, t) for t in todo]
  workers = cfg.num_workers if cfg.num_workers >= 0 else (os.cpu_count() or 1)
  workers = min(workers, len(args))
  done = 0
  n_items = sum(len(t.items) for t in todo)
  t1 = time.time()
  bar = console.bar(n_items, f"convert {source.name}", unit="image")
  for rep in _imap(_run_task, args, workers):
    done += rep["num_inputs"]
    bar.update(rep["num_inputs"])
    rate = done / max(time.time() - t1, 1e-9)
    logging.info("shard %s/%d %s: %d written, %d rejected | %d/%d inputs, %.0f/s, ETA %.0fs", rep["index"] + 1,
                 len(tasks), rep["split"], rep["num_examples"], len(rep["rejections"]), done, n_items, rate,
                 (n_items - done) / max(rate, 1e-9))
  bar.close()
  if all(writer.shard_done(ds, t.index, fingerprint) for t in tasks):
    writer.merge(ds)
  else:
    logging.info("this host's shards are done; the dataset is merged when every host has finished "
                 "(or run again with --config.merge_only=True)")
  return ds


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
    writer.merge(ds)
    return ds
  return convert(cfg)
