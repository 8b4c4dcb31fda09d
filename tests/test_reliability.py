"""Crash, preemption and long runs: `busgen-jax train` killed with SIGKILL at random points and resumed each time
ends with the parameters of an uninterrupted run, bit for bit; no checkpoint is ever left unreadable; SIGTERM saves
the next step and exits with status 0; host memory does not grow over a long run. The CI variants kill 3 times and
run 500 steps; `-m slow -k "many_kills or long_run"` kills 9 times and runs 3,000 steps."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from busgen_jax.data import convert
from busgen_jax import checkpoint
from helpers import convert_config, tiny_diffusion_config

ROOT = Path(__file__).resolve().parents[1]
NUM_STEPS, EVERY = 40, 4     # 10 saves


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The data, a config file for the CLI, the child environment, and an uninterrupted reference run."""
  root = tmp_path_factory.mktemp("reliability")
  data = convert.convert(convert_config("phantom", "", root / "data", **{"phantom.num_examples": 40,
                                                                          "phantom.size": 32}))
  cfg = tiny_diffusion_config(data, NUM_STEPS)
  cfg.checkpoint_every, cfg.log_every, cfg.keep_checkpoints = EVERY, EVERY, 3
  (root / "config.json").write_text(cfg.to_json())
  (root / "config.py").write_text(
      '"""The test\'s tiny run: busgen-jax train --config config.py --workdir DIR"""\nimport json, pathlib\n'
      "import ml_collections\n\n\ndef get_config():\n  return ml_collections.ConfigDict(json.loads("
      "(pathlib.Path(__file__).parent / 'config.json').read_text()))\n")
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", PYTHONPATH=str(ROOT),
             JAX_COMPILATION_CACHE_DIR=str(root / "xla_cache"))   # compile once, every restart reuses it
  ref = {"root": root, "config": root / "config.py", "env": env}
  t0 = time.perf_counter()
  proc = _start(ref, root / "reference")
  assert proc.wait(timeout=600) == 0, _log(root / "reference")
  ref["seconds"] = time.perf_counter() - t0
  ref["params"] = {w: checkpoint.load_params(root / "reference" / "checkpoints", which=w) for w in ("params", "ema")}
  return ref


def _start(run, workdir: Path) -> subprocess.Popen:
  """`busgen-jax train` in a child process, its output appended to WORKDIR.log (`_log`)."""
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{workdir}.log", "a") as log:
    return subprocess.Popen([sys.executable, "-m", "busgen_jax.cli", "train", "--config", str(run["config"]),
                             "--workdir", str(workdir)], env=run["env"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=run["root"])


def _log(workdir: Path, tail: int = 4000) -> str:
  text = Path(f"{workdir}.log").read_text()
  return text[-tail:] if tail else text


def _steps(directory: Path) -> list[int]:
  return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit()) if directory.exists() else []


def _all_readable(directory: Path) -> list[int]:
  """Every finalised step restores (params, EMA and meta); returns them."""
  ck = checkpoint.Checkpointer(directory)   # also cleans up a killed save's temporary directory
  steps = list(ck.manager.all_steps())
  ck.close()
  for s in steps:
    for which in ("params", "ema"):
      assert all(np.isfinite(x).all() for x in jax.tree.leaves(checkpoint.load_params(directory, which=which, step=s)))
    assert checkpoint.load_meta(directory, s)[1]["data_offset"] == 0
  return steps


def _wait_for(directory: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
  """Until a save of `step` has started (its temporary or final directory exists) or the run ended."""
  deadline = time.time() + timeout
  while proc.poll() is None and time.time() < deadline:
    if directory.exists() and any(p.name.split(".")[0] == str(step) for p in directory.iterdir()):
      return
    time.sleep(0.01)


def _kill_and_resume(run, workdir: Path, kills: int, seed: int):
  """SIGKILL `kills` times: during start-up, or when a randomly chosen later save has begun plus a random
  delay (so some land mid-save); check every checkpoint after each; then finish and compare with the reference."""
  rng = random.Random(seed)
  directory = workdir / "checkpoints"
  targets = sorted(rng.sample(range(EVERY, NUM_STEPS, EVERY), kills - 1))
  history = []
  for target in [None] + targets:
    proc = _start(run, workdir)
    if target is None:
      time.sleep(rng.uniform(1.0, 5.0))                   # before or during compilation
    else:
      _wait_for(directory, target, proc)
      time.sleep(rng.uniform(0.0, 0.5))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    history.append((target, _all_readable(directory)))
  proc = _start(run, workdir)
  assert proc.wait(timeout=600) == 0, _log(workdir)
  assert _steps(directory)[-1] == NUM_STEPS
  for which in ("params", "ema"):
    jax.tree.map(np.testing.assert_array_equal, run["params"][which],
                 checkpoint.load_params(directory, which=which))
  return history


@pytest.mark.slow   # CI checks exact resume in-process (test_train's crash) and across two processes (SIGTERM)
def test_kill_9_at_random_points_then_resume_is_bit_identical(run, tmp_path):
  history = _kill_and_resume(run, tmp_path / "killed", kills=3, seed=0)
  assert history[-1][1], history     # the last kill came after a checkpoint: the final run really resumed


@pytest.mark.slow
def test_many_kills(run, tmp_path):
  _kill_and_resume(run, tmp_path / "killed", kills=9, seed=1)


@pytest.mark.slow   # the CLI's SIGTERM path; CI covers preemption with two processes (test_train)
def test_sigterm_saves_the_next_step_and_exits_cleanly(run, tmp_path):
  workdir = tmp_path / "preempted"
  proc = _start(run, workdir)
  directory = workdir / "checkpoints"
  deadline = time.time() + 300
  while not _steps(directory) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=120) == 0, _log(workdir)
  assert "preemption signal: saved step" in _log(workdir, None), _log(workdir)
  stopped = _steps(directory)[-1]
  assert stopped < NUM_STEPS, "the run finished before the signal: make it longer"
  assert _all_readable(directory)[-1] == stopped
  proc = _start(run, workdir)
  assert proc.wait(timeout=600) == 0, _log(workdir)
  jax.tree.map(np.testing.assert_array_equal, run["params"]["ema"], checkpoint.load_params(directory))


def _memory_over_a_run(run, tmp_path, steps: int) -> list[tuple[int, float]]:
  """(step, host RSS GiB) as the trainer logs it every steps/20, over a run of `steps` (4 checkpoints)."""
  cfg = json.loads((run["root"] / "config.json").read_text())
  cfg.update(num_steps=steps, log_every=steps // 20, checkpoint_every=steps // 4)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  shutil.copy(run["config"], tmp_path / "config.py")
  proc = _start({**run, "config": tmp_path / "config.py"}, tmp_path / "long")
  assert proc.wait(timeout=3000) == 0, _log(tmp_path / "long")
  from helpers import tensorboard   # the trainer's logged host RSS, read back from its TensorBoard events
  rss = tensorboard(tmp_path / "long")[0]["host_rss_gib"]
  assert [s for s, _ in rss] == list(range(steps // 20, steps + 1, steps // 20)), rss
  return rss


def _assert_flat(rss, limit_gib: float = 0.15):
  # From a quarter of the way in (caches, the first checkpoint's buffers and the allocator have settled).
  settled = [r for s, r in rss if s >= rss[-1][0] // 4]
  assert max(settled) - settled[0] < limit_gib, rss


@pytest.mark.slow   # 500 steps; every run's host memory is in its TensorBoard events (host_rss_gib)
def test_host_memory_is_flat_over_a_run(run, tmp_path):
  _assert_flat(_memory_over_a_run(run, tmp_path, 500))


@pytest.mark.slow
def test_long_run_host_memory(run, tmp_path):
  _assert_flat(_memory_over_a_run(run, tmp_path, 3000))
