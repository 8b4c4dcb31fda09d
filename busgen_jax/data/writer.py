"""The one dataset writer: a plan, atomic shards with their reports, and the merge into TFDS metadata.

Every dataset busgen-jax writes goes through here: converted sources (`convert`), generated repositories
(`sample`), and subsets of a dataset (the audit's filter, a few-shot site). The directory layout:

  <name>-<split>.array_record-XXXXX-of-YYYYY      records (TFDS-serialised tf.train.Example, the record schema)
  shard_reports/plan.json                          what the writers agreed to write (fingerprint, inputs, vocab)
  shard_reports/shard-NNNNN.json                   per shard: its file, examples, rejections, label counts
  dataset_info.json, features.json, *.labels.txt   TFDS metadata (written by `merge`)
  conversion_report.json                           every input converted or rejected (written by `merge`)

A shard is written to a temporary file that replaces the shard when complete, then its report: a shard whose
report exists with the plan's fingerprint is done, so an interrupted writer resumes, on any number of hosts.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

from busgen_jax.data import schema

FILENAME_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
REPORT = "conversion_report.json"
REPORTS = "shard_reports"


def shard_filename(name: str, split: str, shard: int, num: int) -> str:
  return f"{name}-{split}.array_record-{shard:05d}-of-{num:05d}"


def write_json(path: Path, obj: Any) -> None:
  """Atomically (a temporary file renamed over it): a reader never sees half a report."""
  tmp = path.with_name(path.name + f".tmp{os.getpid()}")
  tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_json_default))
  os.replace(tmp, path)


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  raise TypeError(type(o))


def write_plan(ds: Path, *, fingerprint: str, num_tasks: int, num_inputs: int, vocab: dict, config: dict,
               rejected=(), duplicates=(), ignored_files=(), warnings=(), **extra) -> None:
  """shard_reports/plan.json: what every writer of the dataset must agree on (`merge` checks the fingerprint)."""
  (ds / REPORTS).mkdir(parents=True, exist_ok=True)
  write_json(ds / REPORTS / "plan.json", {
      "fingerprint": fingerprint, "num_tasks": num_tasks, "num_inputs": num_inputs, "vocab": vocab,
      "rejected": list(rejected), "duplicates": list(duplicates), "ignored_files": list(ignored_files),
      "warnings": list(warnings), "config": config, **extra})


def shard_done(ds: Path, index: int, fingerprint: str) -> bool:
  """Whether shard `index` is written (its file exists) by a run with this fingerprint."""
  p = ds / REPORTS / f"shard-{index:05d}.json"
  if not p.exists():
    return False
  rep = json.loads(p.read_text())
  return rep["fingerprint"] == fingerprint and (ds / rep["file"]).exists()


class Shard:
  """One shard of a dataset, written atomically with its report:

    with writer.Shard(ds, name, split, shard, num, index=i, fingerprint=f) as out:
      out.add(record_bytes, id=..., sha256=..., counts={"pathology": "benign", ...})
      out.reject(file, code, reason)          # an input that could not be converted, accounted for
  """

  def __init__(self, ds: Path, name: str, split: str, shard: int, num: int, *, index: int, fingerprint: str):
    from array_record.python import array_record_module
    self.ds, self.split, self.shard, self.index, self.fingerprint = ds, split, shard, index, fingerprint
    self.path = ds / shard_filename(name, split, shard, num)
    self._tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
    self._writer = array_record_module.ArrayRecordWriter(str(self._tmp), "group_size:1")
    self.converted, self.rejections, self.warnings = [], [], []
    self.counts = collections.defaultdict(collections.Counter)

  def add(self, record: bytes, *, id: str, sha256: str, counts: dict[str, str]) -> None:
    self._writer.write(record)
    self.converted.append([id, sha256])
    for field, value in counts.items():
      self.counts[field][value] += 1

  def reject(self, file: str, code: str, reason: str) -> None:
    self.rejections.append({"file": file, "code": code, "reason": reason})

  def __enter__(self) -> "Shard":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    self._writer.close()
    if exc_type is not None:       # an interrupted shard leaves no file and no report: the next run rewrites it
      self._tmp.unlink(missing_ok=True)
      return
    os.replace(self._tmp, self.path)
    self.report = {"fingerprint": self.fingerprint, "index": self.index, "split": self.split, "shard": self.shard,
                   "file": self.path.name, "num_examples": len(self.converted),
                   "num_bytes": self.path.stat().st_size,
                   "num_inputs": len(self.converted) + len(self.rejections), "rejections": self.rejections,
                   "warnings": self.warnings, "converted": self.converted,
                   "counts": {k: dict(v) for k, v in self.counts.items()}}
    write_json(self.ds / REPORTS / f"shard-{self.index:05d}.json", self.report)


def merge(ds: Path) -> dict:
  """Per-shard reports -> TFDS metadata + conversion_report.json. Idempotent."""
  import tensorflow_datasets as tfds
  plan = json.loads((ds / REPORTS / "plan.json").read_text())
  reports = []
  for i in range(plan["num_tasks"]):
    p = ds / REPORTS / f"shard-{i:05d}.json"
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
# Subsets of a dataset, records copied byte for byte (the audit's filter, a few-shot site's images).

def copy_records(src, picks: dict[str, list[tuple[str, int]]], output: str | Path, *, fmt: str,
                 rejections: list[dict] | None = None, note: dict | None = None,
                 examples_per_shard: int = 1024) -> Path:
  """A new dataset at output/<name>/<version> whose split `s` holds the records `picks[s]` ((split, index) of
  `src`, in that order). `rejections` (records of `src` left out, with a code and reason) go into the
  conversion report, so every record of `src` named there is accounted for. Returns the dataset directory."""
  from busgen_jax.data import reader
  ds = src if isinstance(src, reader.Dataset) else reader.open_dataset(src)
  out = Path(output).expanduser() / ds.name / ds.dir.name
  if out.resolve() == ds.dir.resolve():
    raise ValueError(f"{out}: a copy must not overwrite the dataset it copies")
  for split, items in picks.items():
    for s, i in items:
      if s not in ds.splits or not 0 <= int(i) < ds.splits[s]:
        raise ValueError(f"{ds.dir}: no record {i} in split {s!r} (splits {ds.splits}), picked for {split!r}")
  tasks = [(split, k, items[k * examples_per_shard:(k + 1) * examples_per_shard],
            max(1, math.ceil(len(items) / examples_per_shard)))
           for split, items in picks.items() for k in range(max(1, math.ceil(len(items) / examples_per_shard)))]
  rejections = list(rejections or [])
  fingerprint = hashlib.sha256(json.dumps([str(ds.dir), picks, len(rejections)], default=str).encode()).hexdigest()
  write_plan(out, fingerprint=fingerprint, num_tasks=len(tasks),
             num_inputs=sum(len(v) for v in picks.values()) + len(rejections),
             vocab={"device": ds.vocab("device"), "histology": ds.vocab("histology")}, rejected=rejections,
             config={"name": ds.name, "format": fmt, "input": str(ds.dir), **(note or {})})
  records = {s: ds.records(s) for s in {s for items in picks.values() for s, _ in items}}
  for task, (split, k, items, n) in enumerate(tasks):
    with Shard(out, ds.name, split, k, n, index=task, fingerprint=fingerprint) as shard:
      for s, i in items:
        rec = records[s][int(i)]
        ex = ds.decode(rec, skip=("image", "mask"))
        shard.add(rec, id=ex["id"], sha256=ex["sha256"],
                  counts={"pathology": ds.vocab("pathology")[ex["pathology"]],
                          "device": ds.vocab("device")[ex["device"]], "boxes": str(len(ex["boxes"]))})
  merge(out)
  return out
