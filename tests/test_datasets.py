"""Dataset directories: three readers agree, no TensorFlow at read time, host-sharded and multi-process
conversion give the same bytes as one process, conversion resumes, the CLI works end to end."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from busgen_jax.data import convert, reader, writer
from helpers import convert_config

PHANTOM = {"phantom.num_examples": 90, "phantom.size": 48, "examples_per_shard": 16}


@pytest.fixture(scope="module")
def phantom_ds(tmp_path_factory):
  out = tmp_path_factory.mktemp("phantom")
  return convert.convert(convert_config("phantom", "", out, **PHANTOM))


def _records(ds_dir: Path) -> dict[str, bytes]:
  """Every shard file's bytes, by file name."""
  return {p.name: p.read_bytes() for p in sorted(ds_dir.glob("*.array_record-*"))}


def test_three_readers_agree(phantom_ds):
  import grain.python as grain
  import tensorflow_datasets as tfds
  ds = reader.open_dataset(phantom_ds.parent.parent)  # data_dir works as well as the dataset dir
  assert ds.dir == phantom_ds and sum(ds.splits.values()) == 90
  ours = ds.source("train")
  via_builder = tfds.builder_from_directory(str(phantom_ds)).as_data_source("train")
  via_name = tfds.data_source("phantom", data_dir=str(phantom_ds.parent.parent))["train"]
  via_grain = grain.ArrayRecordDataSource(ds.files("train"))
  assert len(ours) == len(via_builder) == len(via_name) == len(via_grain) == ds.splits["train"]
  for i in (0, len(ours) - 1):
    a, b, c, d = ours[i], via_builder[i], via_name[i], ds.decode(via_grain[i])
    for other in (b, c, d):
      np.testing.assert_array_equal(a["image"], other["image"])
      np.testing.assert_array_equal(a["boxes"], other["boxes"])
      assert a["pathology"] == other["pathology"] and a["device"] == other["device"]
    assert a["id"] == b["id"].decode() and a["split"] == "train"
  assert a["image"].dtype == np.uint8 and a["image"].shape == (48, 48, 1)
  assert ds.vocab("pathology") == ["unknown", "benign", "malignant", "normal"]
  # Vocabularies are stored with the dataset, not implied by code.
  assert (phantom_ds / "device.labels.txt").read_text().split("\n")[0] == "unknown"


def test_reading_never_imports_tensorflow(phantom_ds):
  code = f"""
import sys, pickle
from busgen_jax.data import reader
import grain.python as grain
import tensorflow_datasets as tfds
ds = reader.open_dataset({str(phantom_ds)!r})
src = pickle.loads(pickle.dumps(ds.source("train")))  # picklable for Grain workers
ex = src[3]
tfds.builder_from_directory({str(phantom_ds)!r}).as_data_source("test")[0]
ds.decode(grain.ArrayRecordDataSource(ds.files("val"))[0])
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
print("ok", ex["image"].shape)
"""
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


def test_shards_are_group_size_one(phantom_ds):
  from array_record.python import array_record_module
  f = reader.open_dataset(phantom_ds).files("train")[0]
  r = array_record_module.ArrayRecordReader(f)
  assert "group_size:1" in r.writer_options_string()
  r.close()


def test_report_accounts_and_counts(phantom_ds):
  rep = json.loads((phantom_ds / convert.REPORT).read_text())
  assert rep["inputs"] == rep["converted"] == 90 and rep["rejected"] == 0 and rep["accounted"]
  assert sum(rep["counts"]["split"].values()) == 90
  assert sum(rep["counts"]["pathology"].values()) == 90
  assert set(rep["counts"]["by_split"]) == {"train", "val", "test"}


def test_host_sharding_and_workers_give_identical_files(phantom_ds, tmp_path):
  ref = _records(phantom_ds)
  out = tmp_path / "hosts"
  for host in (1, 0, 2):  # any order; the last to finish merges
    ds_dir = convert.convert(convert_config("phantom", "", out, shard_index=host, num_shards=3, **PHANTOM))
    if host != 2:
      assert not (ds_dir / convert.REPORT).exists()
  assert _records(ds_dir) == ref
  assert json.loads((ds_dir / "dataset_info.json").read_text())["splits"] == \
      json.loads((phantom_ds / "dataset_info.json").read_text())["splits"]
  # Two spawned worker processes on one host.
  mp = convert.convert(convert_config("phantom", "", tmp_path / "mp", num_workers=2, **PHANTOM))
  assert _records(mp) == ref


def test_resume_redoes_only_missing_shards_and_plans_must_match(tmp_path):
  cfg = convert_config("phantom", "", tmp_path, **PHANTOM)
  ds_dir = convert.convert(cfg)
  first = {p.name: p.stat().st_mtime_ns for p in ds_dir.glob("*.array_record-*")}
  (ds_dir / "shard_reports" / "shard-00002.json").unlink()
  convert.convert(cfg)
  again = {p.name: p.stat().st_mtime_ns for p in ds_dir.glob("*.array_record-*")}
  changed = [n for n in first if first[n] != again[n]]
  assert len(changed) == 1
  # A host with a different config must not be merged silently into the dataset: shard 1, left from the
  # first plan, no longer matches the plan that host 0 of the new config wrote.
  other = convert_config("phantom", "", tmp_path, shard_index=0, num_shards=2,
                         **{**PHANTOM, "phantom.seed": 9})
  convert.convert(other)
  with pytest.raises(ValueError, match="different plan"):
    writer.merge(ds_dir)


def test_resize_modes(tmp_path):
  ds_dir = convert.convert(convert_config("phantom", "", tmp_path, **{
      **PHANTOM, "phantom.num_examples": 8, "image.resize": "max_side", "image.size": 32}))
  ex = reader.open_dataset(ds_dir).source("train")[0]
  assert ex["image"].shape == (32, 32, 1) and ex["mask"].shape == (32, 32, 1)
  assert (ex["orig_height"], ex["orig_width"]) == (48, 48)


def test_cli_convert_and_inspect(tmp_path):
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  exe = [sys.executable, "-m", "busgen_jax.cli"]
  configs = Path(__file__).resolve().parents[1] / "configs"
  r = subprocess.run(exe + ["convert", f"--config={configs / 'convert.py'}:phantom", "--workdir", str(tmp_path),
                            "--config.phantom.num_examples=12", "--config.phantom.size=32", "--config.num_workers=0"],
                     capture_output=True, text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "12 inputs -> 12 converted, 0 rejected" in r.stdout
  sheet = tmp_path / "sheet.png"
  r = subprocess.run(exe + ["inspect", str(tmp_path), "--sheet", str(sheet), "--json"], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(r.stdout)
  assert sum(summary["splits"].values()) == 12 and sheet.stat().st_size > 1000
  assert set(summary["case_overlap_between_splits"].values()) == {0}
  r = subprocess.run(exe + ["convert", "--config.format=nope", "--workdir", str(tmp_path)], capture_output=True,
                     text=True, env=env, timeout=300)
  assert r.returncode != 0 and "unknown format 'nope'" in r.stderr
  r = subprocess.run(exe + ["frobnicate"], capture_output=True, text=True, env=env, timeout=60)
  assert r.returncode == 2 and "unknown stage" in r.stderr


def test_tfds_builder_writes_the_same_schema(tmp_path):
  from busgen_jax.data import tfds_builders
  b = tfds_builders.BusgenPhantom(data_dir=str(tmp_path), config_overrides={
      "phantom.num_examples": 12, "phantom.size": 32})
  b.download_and_prepare()
  assert sum(s.num_examples for s in b.info.splits.values()) == 12
  ex = reader.open_dataset(tmp_path / "busgen_phantom").source("train")[0]
  assert ex["image"].shape == (32, 32, 1) and ex["source_dataset"] == "phantom"


def test_stages_import_tensorflow_only_to_write_summaries():
  """TensorFlow (~5 s to import, clu's summary writer) loads when a trainer opens its TensorBoard writer, not
  when a stage module is imported: a CLI that trains nothing (evaluate, inspect, a rerun of finished stages, a
  usage error) starts without it."""
  code = """
import sys
from busgen_jax.stages import audit, classify, demo, evaluate, experiment, quality, sample, sweep
from busgen_jax.train import adapt, classifier, diffusion, distill, writers
assert "tensorflow" not in sys.modules, "TensorFlow was imported"
writers.create(sys.argv[1], 10, process_index=0, every_steps=5)[0].close()
assert "tensorflow" in sys.modules
print("ok")
"""
  with tempfile.TemporaryDirectory() as d:
    r = subprocess.run([sys.executable, "-c", code, d], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]
