"""Where a train step's time goes on XLA:CPU (docs/BENCHMARKS.md), and A/Bs of its variants.

  python docs/experiments/step_profile.py --case official_64px                 # the step's slowest fusions
  python docs/experiments/step_profile.py --case official_64px --set conv=winograd
  python docs/experiments/step_profile.py --case official_64px --ab-attention  # written-out vs autodiff backward
  python docs/experiments/step_profile.py --case official_64px --ab attention=dense,chunked
  python docs/experiments/step_profile.py --case official_64px --set conv=winograd \
      --against conv=winograd4 --against attention=blocked --against attention_chunk=512
  python docs/experiments/step_profile.py --case official_64px --host-memory   # BUSGEN_JAX_HOST_MEMORY's modes

The first form traces two steps of a `busgen-jax bench` case (its model, size and batch) with jax.profiler and
lists the fusions that took longest per step, each with its result shape and the JAX operation it came from (XLA's
metadata). Eigen's convolutions run on their own thread pool and appear only as short dispatches: the step's wall
time minus the listed fusions is mostly convolution. The second form compiles the step twice, with attention's
backward written out (`unet.SOFTMAX_VJP_MIN_KEYS`, the default) and with autodiff's, and times them in
alternating rounds in one process, so that the machine's drift hits both; the third does the same for two values
of one field of the bench case (`bench.case`'s arguments); the fourth A/Bs the case with the --set fields against
it with the --against fields changed as well. The fifth runs the step (with any --set fields) in fresh processes,
in turn under each BUSGEN_JAX_HOST_MEMORY mode (hugepages, the CLI's default; keep; glibc's malloc as it comes:
busgen_jax/xla_env.py), and counts the page faults per step (malloc is set at process start, so this A/B cannot
share a process).
"""

import argparse
import statistics

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported


def _setup(case_name, **overrides):
  from busgen_jax.stages import bench
  case = dict(bench.default_config().cases[case_name], **overrides)
  step, state, batch, _ = bench.compiled_train_step(bench._config(case), case)
  return step, state, batch


def profile(case_name, top, overrides=None):
  import collections
  import gzip
  import json
  import re
  import tempfile
  from pathlib import Path
  import jax
  from busgen_jax.stages import bench
  step, state, batch = _setup(case_name, **(overrides or {}))
  state, step_s = bench.timed_steps(step, state, batch, 1)
  what = {}                                             # fusion name -> (shape, op_name) from the HLO text
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", step.as_text(), re.M):
    what[m.group(1)] = (m.group(2), m.group(3))
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
      bench.timed_steps(step, state, batch, 2)
    trace = json.load(gzip.open(next(Path(d).rglob("*perfetto_trace.json.gz"))))
  total = collections.Counter()
  for e in trace["traceEvents"] if isinstance(trace, dict) else trace:
    if e.get("ph") == "X" and e["name"] in what:
      total[e["name"]] += e.get("dur", 0) / 2e3         # microseconds over 2 steps -> ms per step
  print(f"{case_name}: {step_s:.2f} s per step; traced fusions {sum(total.values()) / 1e3:.2f} s per step")
  for name, ms in total.most_common(top):
    shape, op = what[name]
    print(f"{ms:9.1f} ms  {name:32s} {shape:28s} {op[:90]}")


def _ab(case_name, variants, rounds):
  """variants: label -> a function that compiles the step. Alternating rounds: the best round of each, and the
  ratio within each round."""
  from busgen_jax.stages import bench
  import jax.numpy as jnp
  compiled = {label: list(make()) for label, make in variants.items()}
  print(f"matmul peak {bench._matmul_peak(jnp.float32) / 1e9:.0f} GFLOP/s")
  times = {label: [] for label in compiled}
  for r in range(rounds):
    for label, (step, state, batch) in compiled.items():
      state, s = bench.timed_steps(step, state, batch, 2)
      compiled[label][1] = state
      times[label].append(s)
      print(f"round {r}: {label}: {s:.2f} s per step")
  (a, ta), (b, tb) = times.items()
  ratios = sorted(y / x for x, y in zip(ta, tb))   # each round's pair: the machine drifts less within a round
  print(f"best rounds: {a} {min(ta):.2f} against {b} {min(tb):.2f} s per step: {a} {min(tb) / min(ta):.2f}x; "
        f"per round {', '.join(f'{x:.2f}' for x in ratios)}x (median {statistics.median(ratios):.2f}x)")


def ab_attention(case_name, rounds):
  from busgen_jax.models import unet
  keys = unet.SOFTMAX_VJP_MIN_KEYS

  def with_threshold(n):
    def make():
      unet.SOFTMAX_VJP_MIN_KEYS = n                    # read when the step is traced
      try:
        return _setup(case_name)
      finally:
        unet.SOFTMAX_VJP_MIN_KEYS = keys
    return make
  _ab(case_name, {"written-out backward": with_threshold(keys), "autodiff backward": with_threshold(10 ** 12)},
      rounds)


def _values(case_name, field, values, flag):
  """values are strings from the command line, converted to the field's type in the case (bool from true/false)."""
  from busgen_jax.stages import bench
  case = bench.default_config().cases[case_name]
  if field not in case:
    raise SystemExit(f"{flag} {field}=...: {case_name} has no field {field!r}; its fields: {', '.join(sorted(case))}")
  kind = type(case[field])
  parse = (lambda v: {"true": True, "false": False}[v.lower()]) if kind is bool else kind
  try:
    return [parse(v) for v in values]
  except (KeyError, ValueError) as e:
    raise SystemExit(f"{flag} {field}={','.join(values)}: not a {kind.__name__} ({e})") from None


def ab_fields(case_name, base, changed, rounds):
  """The case with `base` fields against it with `changed` fields too (dicts of parsed values)."""
  label = lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "the case"
  _ab(case_name, {label(base): lambda: _setup(case_name, **base),
                  label(dict(base, **changed)): lambda: _setup(case_name, **base, **changed)}, rounds)


def ab_case(case_name, field, values, rounds):
  values = _values(case_name, field, values, "--ab")
  _ab(case_name, {f"{field}={v}": (lambda v=v: _setup(case_name, **{field: v})) for v in values}, rounds)


def _child(case_name, overrides, steps):
  """One process's steps (after a first one): each step's seconds and minor page faults, as JSON."""
  import json
  import resource
  from busgen_jax.stages import bench
  step, state, batch = _setup(case_name, **overrides)
  state, _ = bench.timed_steps(step, state, batch, 1)
  seconds, faults = [], []
  for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    state, s = bench.timed_steps(step, state, batch, 1)
    seconds.append(s)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
  print(json.dumps({"seconds": seconds, "faults": faults}))


def ab_host_memory(case_name, sets, rounds, steps=3):
  import json
  import os
  import subprocess
  import sys
  from busgen_jax import xla_env
  env = xla_env.without_malloc_settings(os.environ)
  best = {}
  for r in range(rounds):
    for how in xla_env.HOST_MEMORY_MODES:
      child = dict(env, **{xla_env.HOST_MEMORY: how})
      child = xla_env.hugepages_env(child) or child       # what the CLI's re-exec gives it
      cmd = [sys.executable, __file__, "--case", case_name, "--child-steps", str(steps)]
      cmd += [arg for x in sets for arg in ("--set", x)]
      out = subprocess.run(cmd, env=child, capture_output=True, text=True)
      if out.returncode:
        raise SystemExit(out.stderr[-3000:])
      res = json.loads(out.stdout.strip().splitlines()[-1])
      best.setdefault(how, []).append(min(res["seconds"]))
      print(f"round {r}: {xla_env.HOST_MEMORY}={how}: {min(res['seconds']):.2f} s per step (best of {steps}); "
            f"page faults per step {statistics.median(res['faults']):,.0f}")
  glibc = min(best["glibc"])
  print("best rounds: " + ", ".join(f"{how} {min(t):.2f} s per step ({glibc / min(t):.2f}x glibc's)"
                                    for how, t in best.items()))
  for how in (h for h in xla_env.HOST_MEMORY_MODES if h != "glibc"):
    ratios = sorted(g / t for g, t in zip(best["glibc"], best[how]))
    print(f"{how} per round: {', '.join(f'{x:.2f}' for x in ratios)}x (median {statistics.median(ratios):.2f}x)")


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--case", default="official_64px", help="a `busgen-jax bench` case (configs of bench.py)")
  p.add_argument("--top", type=int, default=25)
  p.add_argument("--ab-attention", action="store_true")
  p.add_argument("--ab", metavar="FIELD=A,B", help="A/B two values of a bench case field, e.g. attention=dense,chunked")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--set", metavar="FIELD=VALUE", action="append", default=[],
                 help="profile the case with this field changed, e.g. conv=winograd (repeatable)")
  p.add_argument("--against", metavar="FIELD=VALUE", action="append", default=[],
                 help="A/B the case (with any --set fields) against it with this field changed too (repeatable)")
  p.add_argument("--host-memory", action="store_true", help="BUSGEN_JAX_HOST_MEMORY's modes in fresh processes")
  p.add_argument("--child-steps", type=int, help=argparse.SUPPRESS)
  a = p.parse_args()
  if a.rounds < 1:
    p.error(f"--rounds {a.rounds}: at least one round")
  if a.ab_attention:
    ab_attention(a.case, a.rounds)
  elif a.ab:
    field, values = a.ab.split("=", 1)
    values = values.split(",")
    if len(values) != 2:
      p.error(f"--ab {a.ab}: give exactly two values, FIELD=A,B")
    ab_case(a.case, field, values, a.rounds)
  elif a.host_memory:
    ab_host_memory(a.case, a.set, a.rounds)
  else:
    fields = lambda items, flag: dict(_parse(p, a.case, item, flag) for item in items)
    overrides = fields(a.set, "--set")
    if a.child_steps:
      _child(a.case, overrides, a.child_steps)
    elif a.against:
      ab_fields(a.case, overrides, fields(a.against, "--against"), a.rounds)
    else:
      profile(a.case, a.top, overrides)


def _parse(p, case_name, item, flag):
  if "=" not in item:
    p.error(f"{flag} {item}: give FIELD=VALUE")
  field, value = item.split("=", 1)
  return field, _values(case_name, field, [value], flag)[0]


if __name__ == "__main__":
  main()
