"""`busgen-jax sweep`: expansion and naming, print / TPU commands, a real local sweep that resumes, one table."""

import json
import subprocess
import sys
from pathlib import Path

import ml_collections
import pytest

from busgen_jax.stages import sweep
from busgen_jax.data import convert
from helpers import convert_config

ROOT = Path(__file__).resolve().parents[1]


def grid_config(**kw):
  c = sweep.default_config()
  c.stage, c.config = "classify", "configs/classify.py:real=/r,generated=/g"
  c.fixed = ("num_steps=10",)
  c.axes = ml_collections.ConfigDict({
      "n_gen": {"key": "data.sources.generated.limit", "values": (100, 1000)},
      "share": {"key": "data.sources.generated.weight", "values": (0.3, 0.7)},
      "real": {"key": "data.sources.real.weight", "values": (0.7, 0.3)},
      "model": {"key": "model.name", "values": ("resnet_tiny", "vit_tiny")}})
  c.update(kw)
  return c


def test_expand_crosses_axes_zips_and_names_each_run_from_its_overrides():
  runs = sweep.expand(grid_config(zip=("share", "real")))
  assert len(runs) == 2 * 2 * 2      # n_gen x model x (share, real) zipped
  names = [r["name"] for r in runs]
  assert len(set(names)) == 8
  r = next(r for r in runs if r["values"] == {"model": "vit_tiny", "n_gen": 1000, "real": 0.3, "share": 0.7})
  assert r["name"] == "model=vit_tiny,n_gen=1000,real=0.3,share=0.7"
  assert r["overrides"] == ["num_steps=10", "model.name=vit_tiny", "data.sources.generated.limit=1000",
                            "data.sources.real.weight=0.3", "data.sources.generated.weight=0.7"]
  assert len(sweep.expand(grid_config())) == 16       # all crossed
  with pytest.raises(ValueError, match="equal numbers"):
    c = grid_config(zip=("share", "n_gen"))
    c.axes.n_gen.values = (1, 2, 3)
    sweep.expand(c)
  with pytest.raises(ValueError, match="unknown axes"):
    sweep.expand(grid_config(zip=("nope",)))


def test_print_and_tpu_modes_give_the_commands():
  c = grid_config(zip=("share", "real"))
  c.tpu.zone, c.tpu.name = "us-east5-a", "pod"
  lines = []
  sweep.run(c, "gs://bucket/sweeps/s", mode="print", log=lines.append, only=["0"])
  assert lines == ["busgen-jax classify --config configs/classify.py:real=/r,generated=/g --workdir "
                   "gs://bucket/sweeps/s/model=resnet_tiny,n_gen=100,real=0.7,share=0.3 --config.num_steps=10 "
                   "--config.model.name=resnet_tiny --config.data.sources.generated.limit=100 "
                   "--config.data.sources.real.weight=0.7 --config.data.sources.generated.weight=0.3"]
  lines = []
  sweep.run(c, "gs://bucket/sweeps/s", mode="tpu", dry_run=True, log=lines.append)
  assert len(lines) == 8 and all(" run --name pod --zone us-east5-a --run model=" in ln for ln in lines)
  # The printed command is valid for launch/tpu.sh itself (its own --dry_run prints the gcloud ssh).
  argv = lines[0].split()[1:]      # drop "bash"
  out = subprocess.run(["bash", *argv[:-len(argv) + argv.index("--")], "--dry_run", *argv[argv.index("--"):]],
                       capture_output=True, text=True, check=True).stdout
  assert out.startswith("gcloud compute tpus tpu-vm ssh pod --zone us-east5-a --worker=all --command")
  assert "busgen-jax classify --config configs/classify.py:real" in out   # (bash %q escapes the commas)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
  out = tmp_path_factory.mktemp("sweep_data")
  return convert.convert(convert_config("phantom", "", out, **{"phantom.num_examples": 60, "phantom.size": 32}))


def test_local_sweep_runs_resumes_and_collects_one_table(phantom, tmp_path):
  # fit-box-prior: a real stage that needs no compilation, so the sweep's mechanics are what is timed here.
  cfg_file = tmp_path / "sweep_cfg.py"
  cfg_file.write_text(f'''
import ml_collections
from busgen_jax.stages import sweep
def get_config():
  c = sweep.default_config()
  c.stage = "fit-box-prior"
  c.config = ""
  c.fixed = ("dataset={phantom}",)
  c.axes = ml_collections.ConfigDict({{
      "bw": {{"key": "bandwidth", "values": (0.001, 0.01, 0.1)}},
      "split": {{"key": "split", "values": ("train", "nope")}}}})
  c.metrics = "box_prior.json"
  c.plot = {{"x": "bw", "y": "bandwidth", "group": "split", "xscale": "log"}}
  return c
''')
  # The stage's built-in config (no --config): sweep passes `--config` only when the sweep names one.
  work = tmp_path / "sweep"
  cmd = [sys.executable, "-m", "busgen_jax.cli", "sweep", "--config", str(cfg_file), "--workdir", str(work)]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  table = json.loads((work / "sweep.json").read_text())
  rows = {row["run"]: row for row in table["rows"]}
  assert set(rows) == {f"bw={b},split={s}" for b in ("0.001", "0.01", "0.1") for s in ("train", "nope")}
  for b in (0.001, 0.01, 0.1):
    ok = rows[f"bw={b},split=train"]
    assert ok["status"] == 0 and ok["bandwidth"] == b and ok["counts.benign"] > 0
    bad = rows[f"bw={b},split=nope"]            # a failing run is reported, not lost
    assert bad["status"] != 0 and "bandwidth" not in bad and bad["missing"].endswith("box_prior.json")
    assert "nope" in (work / bad["run"] / "sweep.log").read_text()
  assert (work / "sweep.png").stat().st_size > 1000 and (work / "sweep.csv").read_text().count("\n") == 7
  md = (work / "sweep.md").read_text()
  assert "| bw | split | status | bandwidth |" in md
  # Resume: finished runs are skipped; failed ones run again.
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0
  assert r.stdout.count("done before, skipped") == 3 and r.stdout.count("status 1") + r.stdout.count("status 2") >= 3
