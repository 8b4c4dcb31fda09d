"""Where a train step's time goes on XLA:CPU (docs/BENCHMARKS.md), and the attention backward's A/B.

  python docs/experiments/step_profile.py --case official_64px                 # the step's slowest fusions
  python docs/experiments/step_profile.py --case official_64px --ab-attention  # written-out vs autodiff backward

The first form traces two steps of a `busgen-jax bench` case (its model, size and batch) with jax.profiler and
lists the fusions that took longest per step, each with its result shape and the JAX operation it came from (XLA's
metadata). Eigen's convolutions run on their own thread pool and appear only as short dispatches: the step's wall
time minus the listed fusions is mostly convolution. The second form compiles the step twice, with attention's
backward written out (`unet.SOFTMAX_VJP_MIN_KEYS`, the default) and with autodiff's, and times them in
alternating rounds in one process, so that the machine's drift hits both.
"""

import argparse

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported


def _setup(case_name):
  import jax
  from busgen_jax import parallel
  from busgen_jax.stages import bench
  from busgen_jax.train import diffusion
  case = dict(bench.default_config().cases[case_name])
  cfg = bench._config(case)
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  setup = diffusion.Setup(cfg, mesh=mesh)
  local = bench._batch(case["batch"], case["size"])
  batch = parallel.global_batch({k: local[k] for k in setup.batch_keys}, setup.mesh, setup.rules)
  state = setup.init_state(0)
  step = setup.train_step.lower(state, batch).compile()
  state, m = step(state, batch)                       # warm-up
  jax.block_until_ready(m)
  return step, state, batch


def _timed(step, state, batch, n):
  import time
  import jax
  t = time.perf_counter()
  for _ in range(n):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return state, (time.perf_counter() - t) / n


def profile(case_name, top):
  import collections
  import gzip
  import json
  import re
  import tempfile
  from pathlib import Path
  import jax
  step, state, batch = _setup(case_name)
  state, step_s = _timed(step, state, batch, 1)
  what = {}                                             # fusion name -> (shape, op_name) from the HLO text
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", step.as_text(), re.M):
    what[m.group(1)] = (m.group(2), m.group(3))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      _timed(step, state, batch, 2)
    trace = json.load(gzip.open(next(Path(d).rglob("*perfetto_trace.json.gz"))))
  total = collections.Counter()
  for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
    if e.get("ph") == "X" and e["name"] in what:
      total[e["name"]] += e.get("dur", 0) / 2e3         # microseconds over 2 steps -> ms per step
  print(f"{case_name}: {step_s:.2f} s per step; traced fusions {sum(total.values()) / 1e3:.2f} s per step")
  for name, ms in total.most_common(top):
    shape, op = what[name]
    print(f"{ms:9.1f} ms  {name:32s} {shape:28s} {op[:90]}")


def ab_attention(case_name, rounds):
  from busgen_jax.models import unet
  from busgen_jax.stages import bench
  import jax.numpy as jnp
  compiled = {}
  for label, keys in [("written-out backward", unet.SOFTMAX_VJP_MIN_KEYS), ("autodiff backward", 10 ** 12)]:
    unet.SOFTMAX_VJP_MIN_KEYS = keys                   # read when the step is traced
    compiled[label] = list(_setup(case_name))
  print(f"matmul peak {bench._matmul_peak(jnp.float32) / 1e9:.0f} GFLOP/s")
  best = {}
  for r in range(rounds):
    for label, (step, state, batch) in compiled.items():
      state, s = _timed(step, state, batch, 2)
      compiled[label][1] = state
      best[label] = min(best.get(label, s), s)
      print(f"round {r}: {label}: {s:.2f} s per step")
  a, b = best.values()
  print(f"best rounds: {a:.2f} against {b:.2f} s per step: the written-out backward {b / a:.2f}x")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", default="official_64px", help="a `busgen-jax bench` case (configs of bench.py)")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--ab-attention", action="store_true")
  p.add_argument("--rounds", type=int, default=3)
  a = p.parse_args()
  if a.ab_attention:
    ab_attention(a.case, a.rounds)
  else:
    profile(a.case, a.top)


if __name__ == "__main__":
  main()
