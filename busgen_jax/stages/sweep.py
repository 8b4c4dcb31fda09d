"""Config sweeps: `busgen-jax sweep --config configs/sweeps/<name>.py --workdir DIR [--mode local|print|tpu|collect]`.

A sweep config names a stage, its config, fixed overrides and axes; runs are the product of the axes (axes in
`zip` vary together). Each run's workdir is DIR/<axis>=<value>,... (from its overrides), so a sweep resumes:
runs that finished (DIR/<run>/sweep_run.json with status 0) are skipped.

  local    run every run here, one after another (a subprocess each), then collect
  print    print each run's `busgen-jax` command
  tpu      run each on a TPU VM through `launch/tpu.sh run` (all workers, one run after another); with --dry_run,
           print those commands. DIR may be gs://...; `--mode collect` reads the results from there
  collect  gather every run's metrics file into DIR/sweep.{json,csv,md} and DIR/sweep.png (metric vs an axis,
           one line per value of another)

    c.stage = "classify"
    c.config = "configs/classify.py:real=/r,generated=/g"
    c.fixed = ("num_steps=500",)                            # --config.<...> for every run
    c.axes.n_gen = {"key": "data.sources.generated.limit", "values": (250, 500, 1000)}
    c.axes.w_gen = {"key": "data.sources.generated.weight", "values": (0.5, 1.0)}
    c.zip = ()                                              # axis names that vary together instead of crossed
    c.metrics = "eval/real_test.json"                       # JSON in each run's workdir
    c.plot = {"x": "n_gen", "y": "auc", "group": "w_gen", "xscale": "log"}
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ml_collections

from busgen_jax import paths

ROOT = Path(__file__).resolve().parents[2]
RUN_FILE = "sweep_run.json"


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = ""
  c.config = ""                # the stage's config file (path.py[:arg]), relative to the checkout or absolute;
                               # "": the stage's built-in config
  c.fixed = ()                 # "key=value" overrides for every run
  c.axes = ml_collections.ConfigDict()   # name -> {"key": config key, "values": (...)}
  c.zip = ()                   # names of axes that vary together (equal lengths); the rest are crossed
  c.metrics = ""               # JSON file in each run's workdir
  c.plot = ml_collections.ConfigDict({"x": "", "y": "", "group": "", "xscale": "linear"})
  c.tpu = ml_collections.ConfigDict({"name": "busgen", "zone": "", "project": ""})
  return c


# ------------------------------------------------------------------------------------------------ expansion

def _value_str(v) -> str:
  if isinstance(v, (list, tuple)):
    return ",".join(_value_str(x) for x in v)
  if isinstance(v, float) and v.is_integer():
    return str(int(v)) if abs(v) >= 1 else str(v)
  return str(v)


def _name_part(v) -> str:
  s = _value_str(v)
  return "".join(ch if ch.isalnum() or ch in ".-_" else "-" for ch in s)


def expand(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The runs: [{"name", "values": {axis: value}, "overrides": ["key=value", ...]}], in a fixed order."""
  if not cfg.stage:
    raise ValueError("a sweep config needs `stage` (the busgen-jax stage each run executes)")
  axes = {name: dict(a) for name, a in cfg.axes.items()}
  for name, a in axes.items():
    if not a.get("key") or not len(a.get("values", ())):
      raise ValueError(f"sweep axis {name!r} needs a `key` and non-empty `values`")
  zipped = [n for n in cfg.zip]
  unknown = set(zipped) - set(axes)
  if unknown:
    raise ValueError(f"sweep zip names unknown axes {sorted(unknown)}")
  if zipped and len({len(axes[n]["values"]) for n in zipped}) > 1:
    raise ValueError(f"zipped axes {zipped} must have equal numbers of values")
  crossed = [n for n in axes if n not in zipped]
  dims = [[{n: v} for v in axes[n]["values"]] for n in crossed]
  if zipped:
    dims.append([{n: axes[n]["values"][i] for n in zipped} for i in range(len(axes[zipped[0]]["values"]))])
  runs = []
  for combo in itertools.product(*dims) if dims else [()]:
    values = {k: v for d in combo for k, v in d.items()}
    values = {n: values[n] for n in axes}  # axis order of the config
    name = ",".join(f"{n}={_name_part(v)}" for n, v in values.items()) or "run"
    overrides = list(cfg.fixed) + [f"{axes[n]['key']}={_value_str(v)}" for n, v in values.items()]
    runs.append({"name": name, "values": values, "overrides": overrides})
  if len({r["name"] for r in runs}) != len(runs):
    raise ValueError("two runs of the sweep get the same name: make the axis values distinct")
  return runs


def _config_path(cfg) -> str:
  path, _, arg = cfg.config.partition(":")
  p = Path(path)
  if not p.is_absolute() and not p.exists() and (ROOT / p).exists():
    p = ROOT / p
  return str(p) + (f":{arg}" if arg else "")


def command(cfg, run: dict, workdir: str) -> list[str]:
  """The `busgen-jax` argument list of one run."""
  config = ["--config", _config_path(cfg)] if cfg.config else []   # none: the stage's built-in config
  return [cfg.stage, *config, "--workdir", f"{workdir.rstrip('/')}/{run['name']}",
          *[f"--config.{o}" for o in run["overrides"]]]


# ------------------------------------------------------------------------------------------------ running

def run_local(cfg, workdir: str, runs: list[dict], *, log=print) -> list[dict]:
  """Run each run as a subprocess (`python -m busgen_jax.cli ...`), skipping finished ones. Returns statuses."""
  out = []
  for i, r in enumerate(runs):
    run_dir = paths.path(workdir) / r["name"]
    done = run_dir / RUN_FILE
    if done.exists() and json.loads(done.read_text()).get("status") == 0:
      log(f"[{i + 1}/{len(runs)}] {r['name']}: done before, skipped")
      out.append(json.loads(done.read_text()))
      continue
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "busgen_jax.cli", *command(cfg, r, workdir)]
    log(f"[{i + 1}/{len(runs)}] {r['name']}: {shlex.join(argv[2:])}")
    t = time.time()
    # Through a local file: a child needs a real file descriptor, and the run directory may be gs://.
    with tempfile.TemporaryFile("w+") as f:
      status = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT).returncode
      f.seek(0)
      (run_dir / "sweep.log").write_text(f.read())
    rec = {"name": r["name"], "values": r["values"], "overrides": r["overrides"], "status": status,
           "seconds": round(time.time() - t, 1), "command": shlex.join(["busgen-jax", *argv[3:]])}
    done.write_text(json.dumps(rec, indent=1))
    log(f"    status {status} in {rec['seconds']:.0f} s" + ("" if status == 0 else f"; log: {run_dir / 'sweep.log'}"))
    out.append(rec)
  return out


def tpu_commands(cfg, workdir: str, runs: list[dict]) -> list[list[str]]:
  """`bash launch/tpu.sh run ...` for each run: every worker runs it; the next starts when it ends."""
  t = cfg.tpu
  base = ["bash", str(ROOT / "launch" / "tpu.sh"), "run", "--name", t.name, "--zone", t.zone]
  if t.project:
    base += ["--project", t.project]
  return [base + ["--run", r["name"], "--", *command(cfg, r, workdir)] for r in runs]


# ------------------------------------------------------------------------------------------------ collecting

def _flatten(d: Any, prefix: str = "") -> dict[str, float]:
  """Numeric leaves of a JSON document as {dotted.name: value}; [lo, hi] pairs become name.0 / name.1."""
  out = {}
  if isinstance(d, dict):
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
  elif isinstance(d, (list, tuple)) and len(d) <= 4:
    for i, v in enumerate(d):
      out.update(_flatten(v, f"{prefix}{i}."))
  elif isinstance(d, (int, float)) and not isinstance(d, bool):
    out[prefix[:-1]] = float(d)
  return out


def collect(cfg, workdir: str, runs: list[dict]) -> dict:
  """Every run's axis values, status and metrics in one table: DIR/sweep.json, .csv, .md and .png."""
  work = paths.path(workdir)
  rows = []
  for r in runs:
    run_dir = work / r["name"]
    row = {"run": r["name"], **r["values"]}
    status = run_dir / RUN_FILE
    row["status"] = json.loads(status.read_text()).get("status") if status.exists() else None
    metrics = run_dir / cfg.metrics if cfg.metrics else None
    if metrics is not None and metrics.exists():
      row.update(_flatten(json.loads(metrics.read_text())))
    else:
      row["missing"] = str(metrics) if metrics is not None else "no metrics file configured"
    rows.append(row)
  columns = list(dict.fromkeys(k for row in rows for k in row))
  table = {"stage": cfg.stage, "config": cfg.config, "metrics": cfg.metrics, "axes": list(cfg.axes.keys()),
           "columns": columns, "rows": rows}
  work.mkdir(parents=True, exist_ok=True)
  (work / "sweep.json").write_text(json.dumps(table, indent=1, default=str))
  buf = io.StringIO()
  w = csv.DictWriter(buf, fieldnames=columns)
  w.writeheader()
  w.writerows(rows)
  (work / "sweep.csv").write_text(buf.getvalue())
  (work / "sweep.md").write_text(markdown(table, cfg))
  if cfg.plot.y and cfg.plot.x:
    plot(table, cfg, work / "sweep.png")
  return table


def _fmt(v) -> str:
  if isinstance(v, float):
    return "" if math.isnan(v) else f"{v:.4g}"
  return "" if v is None else str(v)


def markdown(table: dict, cfg) -> str:
  axes = table["axes"]
  keep = axes + ["status"] + ([cfg.plot.y] if cfg.plot.y else []) + [
      c for c in table["columns"] if c not in axes and c not in ("run", "status", cfg.plot.y)
      and c.count(".") <= 1][:8]
  keep = list(dict.fromkeys(keep))
  lines = [f"# Sweep: `busgen-jax {table['stage']} --config {table['config']}`", "",
           f"{len(table['rows'])} runs; metrics from `<run>/{table['metrics']}`.", "",
           "| " + " | ".join(keep) + " |", "|" + "---|" * len(keep)]
  lines += ["| " + " | ".join(_fmt(r.get(c)) for c in keep) + " |" for r in table["rows"]]
  return "\n".join(lines) + "\n"


def plot(table: dict, cfg, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  x, y, group = cfg.plot.x, cfg.plot.y, cfg.plot.group
  fig, ax = plt.subplots(figsize=(5.5, 4))
  groups = sorted({r.get(group) for r in table["rows"]}, key=str) if group else [None]
  for g in groups:
    mine = [r for r in table["rows"] if (not group or r.get(group) == g) and isinstance(r.get(x), (int, float))
            and isinstance(r.get(y), float)]
    if not mine:
      continue
    mine.sort(key=lambda r: r[x])
    ax.plot([r[x] for r in mine], [r[y] for r in mine], marker="o", label=f"{group}={g}" if group else y)
    if all(f"{y}_ci95.0" in r for r in mine):   # the metric's confidence interval, when it has one
      ax.fill_between([r[x] for r in mine], [r[f"{y}_ci95.0"] for r in mine], [r[f"{y}_ci95.1"] for r in mine],
                      alpha=0.15)
  ax.set_xscale(cfg.plot.get("xscale", "linear") or "linear")
  ax.set_xlabel(cfg.axes[x]["key"] if x in cfg.axes else x)
  ax.set_ylabel(y)
  ax.grid(alpha=0.3)
  if group:
    ax.legend(fontsize=8)
  ax.set_title(f"{table['stage']}: {y} vs {x}", fontsize=9)
  fig.tight_layout()
  with paths.path(path).open("wb") as f:
    fig.savefig(f, format="png", dpi=120)
  plt.close(fig)


# ------------------------------------------------------------------------------------------------ the stage

def run(cfg: ml_collections.ConfigDict, workdir: str, *, mode: str = "local", dry_run: bool = False,
        only: list[str] = (), log=print) -> dict | list:
  runs = expand(cfg)
  if only:
    runs = [r for i, r in enumerate(runs) if r["name"] in only or str(i) in only]
  if mode == "print":
    for r in runs:
      log(shlex.join(["busgen-jax", *command(cfg, r, workdir)]))
    return runs
  if mode == "tpu":
    if not cfg.tpu.zone:
      raise ValueError("--mode=tpu needs --config.tpu.zone (and --config.tpu.name of a VM from launch/tpu.sh create)")
    for argv in tpu_commands(cfg, workdir, runs):
      log(shlex.join(argv))
      if not dry_run:
        status = subprocess.run(argv, cwd=ROOT).returncode
        if status:
          raise RuntimeError(f"{shlex.join(argv)} exited with status {status}")
    return runs
  if mode == "local":
    run_local(cfg, workdir, runs, log=log)
  elif mode != "collect":
    raise ValueError(f"--mode must be local, print, tpu or collect, got {mode!r}")
  table = collect(cfg, workdir, expand(cfg) if not only else runs)
  log(markdown(table, cfg))
  return table


REQUIRES_CONFIG = True   # a sweep file (configs/sweeps/*.py)


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_enum("mode", "local", ["local", "print", "tpu", "collect"],
                    "local: run here one after another; print: the commands; tpu: through launch/tpu.sh on a TPU VM; "
                    "collect: only gather the runs' metrics")
  flags.DEFINE_bool("dry_run", False, "with --mode=tpu: print the launch/tpu.sh commands, run nothing")
  flags.DEFINE_list("only", [], "run only these runs (names or indices)")


def main(cfg: ml_collections.ConfigDict, workdir: str, argv) -> None:
  from absl import flags
  F = flags.FLAGS
  run(cfg, workdir, mode=F.mode, dry_run=F.dry_run, only=F.only)
