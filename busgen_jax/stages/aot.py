"""Pod-scale checks on any machine: `busgen-jax aot` compiles the real programs for a TPU topology ahead of time.

  busgen-jax aot --config configs/busgen_official.py --topology v5p:4x4x4 --workdir /tmp/aot
  busgen-jax aot --config configs/phantom_tiny.py --topology v5e:2x2 --batch_sizes 16,64 --workdir /tmp/aot

With libtpu installed (`pip install -e '.[tpu]'`), JAX describes a TPU slice without having one
(`jax.experimental.topologies`). On its devices we build what the run would build: `diffusion.Setup`'s mesh,
shardings and jitted train step (every chip of the slice), and `generate.make_sampler`'s guided DPM-Solver loop
(one host's chips, or the whole slice where `generate.resolve_scope` says so, as `busgen-jax sample` runs it),
lower them on abstract arrays and compile with the TPU
compiler. Per chip and per program we report:

  HBM        arguments + outputs - donated aliases + temporaries (XLA's memory analysis) against the chip's
             capacity; the stage exits with status 1 when a program does not fit
  FLOPs      model FLOPs (forward, x3 for training, from XLA's cost analysis of the dense network) and the
             compiled program's FLOPs (remat recomputation included; loops counted once by XLA)
  collectives count and bytes of all-gather / all-reduce / reduce-scatter / all-to-all / collective-permute
             results in the compiled HLO (loop bodies counted once)
  time       estimated step time = max(compute at `utilisation` of the bf16 peak, HBM traffic at full
             bandwidth, collective bytes at the chip's ICI bandwidth): the three overlap on TPU, so the largest
             is the estimate; MFU = model FLOPs / (time x peak)

Peaks, capacities and bandwidths are the Cloud TPU documentation's per-chip figures (CHIPS). The estimate is a
roofline, not a measurement; what is exact is whether and how the program compiles, its memory and its
collectives.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shlex
import time
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from busgen_jax import console, paths

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str            # the accelerator type prefix (v5p-64 ...)
  hbm_bytes: float
  bf16_flops: float    # peak bf16 FLOP/s
  hbm_bandwidth: float # bytes/s
  ici_bandwidth: float # bytes/s per chip (bidirectional, as documented)


# device_kind -> chip (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}).
CHIPS = {
    "TPU v4": Chip("v4", 32 * GiB, 275e12, 1228e9, 300e9),
    "TPU v5 lite": Chip("v5e", 16 * GiB, 197e12, 819e9, 400e9),
    "TPU v5": Chip("v5p", 95 * GiB, 459e12, 2765e9, 600e9),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 918e12, 1638e9, 800e9),
}


class DoesNotFit(RuntimeError):
  """A program needs more HBM per chip than the chip has."""


def _quiet_libtpu() -> None:
  # Off a TPU VM libtpu warns that it cannot find worker hostnames and the accelerator type; we only describe
  # a topology, so say so. JAX itself stays on the host platform (nothing runs on the described chips).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  # libtpu takes a machine-wide lock meant for real chips; describing topologies from several processes at once
  # (parallel tests, two aot runs) is safe.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def topology(name: str, num_slices: int = 1):
  """The devices of `num_slices` TPU slices described by name (v5p:4x4x4, v5e:16x16, v6e:8x8, v4:2x2x2)."""
  _quiet_libtpu()
  from jax.experimental import topologies
  try:
    kw = {"num_slices": num_slices} if num_slices > 1 else {}
    topo = topologies.get_topology_desc(platform="tpu", topology_name=name, **kw)
  except Exception as e:  # no libtpu, or a name libtpu does not know
    raise RuntimeError(f"cannot describe TPU topology {name!r}: {e}. `busgen-jax aot` needs libtpu: "
                       "pip install -e '.[tpu]'; names look like v5p:4x4x4, v5e:16x16, v6e:8x8") from e
  devices = list(topo.devices)
  kind = devices[0].device_kind
  if kind not in CHIPS:
    raise RuntimeError(f"topology {name!r} has {kind!r} chips; known: {sorted(CHIPS)}")
  return devices, CHIPS[kind]


# ------------------------------------------------------------------------------------------------ HLO reading

_DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
# `%name = <shape or (tuple)> op(` with op a collective or its async -start half (the -done half is not counted).
_OP = re.compile(r"=\s*(\((?:[^()]|\([^()]*\))*\)|[a-z0-9]+\[[0-9,]*\][^ ]*)\s+(" + "|".join(COLLECTIVES)
                 + r")(-start)?\(")
_ARRAY = re.compile(r"([a-z]+[0-9]*(?:e[0-9]m[0-9](?:fn)?)?)\[([0-9,]*)\]")


def _array_bytes(shape: str) -> list[float]:
  return [_DTYPE_BYTES.get(dt, 4) * math.prod(int(d) for d in dims.split(",") if d) for dt, dims in _ARRAY.findall(shape)]


def _top_level(tuple_shape: str) -> list[str]:
  """The elements of an HLO tuple shape `(a, (b, c), ...)`, split at its top-level commas."""
  parts, depth, start = [], 0, 1
  for i, ch in enumerate(tuple_shape[1:-1], 1):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(tuple_shape[start:i])
      start = i + 1
  return parts + [tuple_shape[start:-1]]


def collectives(hlo_text: str) -> dict[str, dict[str, float]]:
  """Count and result bytes of each collective kind in a compiled module's HLO text (each instruction once).

  Combined collectives return tuples: their bytes are the sum. An async all-gather / collective-permute -start
  returns (operands, results, ...): its bytes are the results'."""
  out = {k: {"count": 0, "bytes": 0.0} for k in COLLECTIVES}
  for shape, op, start in _OP.findall(hlo_text):
    if start and op in ("all-gather", "collective-permute") and shape.startswith("("):
      shape = _top_level(shape)[1]
    sizes = _array_bytes(shape)
    if sizes:
      out[op]["count"] += 1
      out[op]["bytes"] += sum(sizes)
  return out


# ------------------------------------------------------------------------------------------------ analysis

def analyse(compiled, chip: Chip, *, model_flops: float, utilisation: float) -> dict[str, Any]:
  """Per-chip memory, FLOPs, traffic, collectives and the roofline estimate of one compiled program."""
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  hbm = {"arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
         "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
         "code": mem.generated_code_size_in_bytes}
  hbm["total"] = hbm["arguments"] + hbm["outputs"] - hbm["aliased"] + hbm["temporaries"] + hbm["code"]
  compiled_flops = float(cost.get("flops", 0.0))
  traffic = float(cost.get("bytes accessed", 0.0))
  coll = collectives(compiled.as_text())
  coll_bytes = sum(c["bytes"] for c in coll.values())
  times = {"compute": max(compiled_flops, model_flops) / (chip.bf16_flops * utilisation),
           "hbm": traffic / chip.hbm_bandwidth, "ici": coll_bytes / chip.ici_bandwidth}
  step = max(times.values())
  return {"hbm_bytes": hbm, "hbm_capacity": chip.hbm_bytes, "hbm_fraction": hbm["total"] / chip.hbm_bytes,
          "fits": hbm["total"] <= chip.hbm_bytes,
          "model_flops": model_flops, "compiled_flops": compiled_flops, "hbm_traffic_bytes": traffic,
          "collectives": coll, "collective_bytes": coll_bytes, "time_bounds_s": times,
          "bound_by": max(times, key=times.get), "step_time_s": step,
          "mfu": model_flops / (step * chip.bf16_flops) if step > 0 else 0.0}


def _compile(lowered, effort: float):
  import jax
  opts = {"exec_time_optimization_effort": effort} if effort else None
  cache = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)   # TPU executables: not loadable here, don't store
  try:
    return lowered.compile(compiler_options=opts) if opts else lowered.compile()
  except Exception as e:
    # The TPU compiler refuses programs that cannot fit in HBM ("RESOURCE_EXHAUSTED ... Ran out of memory").
    if "RESOURCE_EXHAUSTED" in str(e) or "memory" in str(e).lower():
      raise DoesNotFit(str(e).splitlines()[0][:600]) from e
    raise
  finally:
    jax.config.update("jax_enable_compilation_cache", cache)


# ------------------------------------------------------------------------------------------------ programs

def train_program(cfg: ml_collections.ConfigDict, devices: Sequence, batch_size: int):
  """diffusion.Setup's train step on every chip, lowered on abstract state and batch."""
  import jax
  import jax.numpy as jnp
  from busgen_jax import parallel
  from busgen_jax.train import diffusion
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.data.batch_size = batch_size
  setup = diffusion.Setup(cfg, mesh=parallel.make_mesh(dict(cfg.mesh), devices))
  S = cfg.data.image_size
  shapes = {"image": (batch_size, S, S, 3), "box": (batch_size, S, S, 1), "mask": (batch_size, S, S, 1),
            "pathology": (batch_size,), "device": (batch_size,)}
  batch = {k: jax.ShapeDtypeStruct(shapes[k], jnp.int32 if len(shapes[k]) == 1 else jnp.float32,
                                   sharding=setup.batch_shardings[k])
           for k in setup.batch_keys}
  return setup.train_step.lower(setup.abstract_state, batch), dict(setup.mesh.shape)


def sample_program(cfg: ml_collections.ConfigDict, sample_cfg: ml_collections.ConfigDict, devices: Sequence):
  """generate.make_sampler's whole sampling loop for `cfg.model` on `devices` (params replicated)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from busgen_jax import generate, parallel
  from busgen_jax.models import unet
  mesh = parallel.make_mesh(dict(sample_cfg.mesh), devices)
  sample, plan = generate.make_sampler(sample_cfg, cfg.model, cfg.data.image_size, cfg.objective.prediction, mesh)
  repl = parallel.replicated(mesh)
  rows = parallel.rows(mesh)
  params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl),
                        nnx.to_pure_dict(nnx.state(unet.abstract(cfg.model), nnx.Param)))
  B, S = sample_cfg.per_device_batch * mesh.size, cfg.data.image_size
  shapes = {"box": (B, S, S, 1), "mask": (B, S, S, 1), "pathology": (B,), "device": (B,)}
  cond = {k: jax.ShapeDtypeStruct(shapes[k], jnp.int32 if len(shapes[k]) == 1 else jnp.float32, sharding=rows)
          for k in cfg.model.conditions}
  index = jax.ShapeDtypeStruct((B,), jnp.int32, sharding=rows)
  start = jax.ShapeDtypeStruct((B, 2), jnp.float32, sharding=rows)
  return sample.lower(params, index, cond, start), dict(mesh.shape), B, plan


SAMPLE_PROGRAMS = ("sample", "student")


def sample_configs(cfg: ml_collections.ConfigDict, program: str):
  """(model config, `busgen-jax sample` config) of a sampling program: "sample" is the config's model with the
  default guided sampler; "student" is its guidance-distilled student (`busgen-jax distill`: the scale an input)
  with the plan a student's card names by default, one network evaluation per step."""
  from busgen_jax import generate
  from busgen_jax.diffusion import samplers
  from busgen_jax.train import distill
  scfg = generate.default_config()
  if program == "sample":
    return cfg, scfg
  student = ml_collections.ConfigDict(cfg.to_dict())
  student.model.guidance_embed = True
  plan = distill.default_config().sampler
  scfg.sampler = samplers.for_student(scfg.sampler, {"sampler": {k: plan[k] for k in samplers.PLAN_KEYS}})
  return student, scfg


# ------------------------------------------------------------------------------------------------ the stage

def run(cfg: ml_collections.ConfigDict, workdir: str | Path | None, *, topology_name: str,
        batch_sizes: Sequence[int] = (), programs: Sequence[str] = ("train", "sample"),
        sample_per_device_batch: int = 0, utilisation: float = 0.5, effort: float = 0.0,
        num_slices: int = 1) -> dict:
  """Compile `programs` for the topology and write aot.json / aot.md to `workdir`. `batch_sizes` (global
  training batches) are tried in turn; the largest that fits is `best_train_batch`. Raises DoesNotFit (after
  writing the report) when no training batch fits or the sampler does not."""
  from busgen_jax import generate
  from busgen_jax.diffusion import samplers
  from busgen_jax.models import unet
  devices, chip = topology(topology_name, num_slices)
  hosts = sorted({d.process_index for d in devices})
  per_host = [d for d in devices if d.process_index == hosts[0]]
  fwd = unet.flops_per_image(cfg.model, cfg.data.image_size, backward=False)
  report = {"topology": topology_name, "num_slices": num_slices, "chip": dataclasses.asdict(chip), "chips": len(devices), "hosts": len(hosts),
            "config": {"image_size": cfg.data.image_size, "model": cfg.model.to_dict(), "mesh": dict(cfg.mesh),
                       "accum_steps": cfg.accum_steps},
            "utilisation": utilisation, "effort": effort, "forward_flops_per_image": fwd, "programs": []}
  train_batches = list(batch_sizes or [cfg.data.batch_size]) if "train" in programs else []
  sample_programs = [p for p in SAMPLE_PROGRAMS if p in programs]
  bar = console.bar(len(train_batches) + len(sample_programs), f"aot {topology_name}", unit="program")
  for b in train_batches:
    entry = {"program": "train", "global_batch": b, "per_chip_batch": b / len(devices)}
    t = time.perf_counter()
    try:
      lowered, mesh = train_program(cfg, devices, b)
      entry["mesh"] = mesh
      compiled = _compile(lowered, effort)
      entry.update(analyse(compiled, chip, model_flops=3 * fwd * b / len(devices), utilisation=utilisation))
      entry["images_per_s"] = b / entry["step_time_s"]
    except DoesNotFit as e:
      entry.update(fits=False, error=str(e))
    entry["compile_s"] = time.perf_counter() - t
    report["programs"].append(entry)
    bar.update()
  for program in sample_programs:
    pcfg, scfg = sample_configs(cfg, program)
    if sample_per_device_batch:
      scfg.per_device_batch = sample_per_device_batch
    scope = generate.resolve_scope(scfg.scope, devices)
    entry = {"program": program, "sampler": scfg.sampler.to_dict(), "scope": scope}
    t = time.perf_counter()
    try:
      lowered, mesh, B, plan = sample_program(pcfg, scfg, per_host if scope == "host" else devices)
      # Network evaluations per image: two per guided solver step (the doubled batch), one per unguided one and
      # one per step of a guidance student (the scale is its input).
      nfe = samplers.network_evals(plan, generate.batch_guidance(scfg, pcfg.model),
                                   tuple(scfg.sampler.guidance_interval))
      steps = plan.num_evals
      entry.update(mesh=mesh, call_batch=B, per_chip_batch=scfg.per_device_batch, network_evals=nfe,
                   solver_steps=steps)
      compiled = _compile(lowered, effort)
      model = fwd * scfg.per_device_batch * nfe
      a = analyse(compiled, chip, model_flops=model, utilisation=utilisation)
      # The scan body (one solver step) is counted once by XLA: scale its traffic by the steps.
      a["compiled_flops_per_eval"] = a["compiled_flops"]
      a["hbm_traffic_bytes"] *= steps
      a["time_bounds_s"]["hbm"] *= steps
      a["step_time_s"] = max(a["time_bounds_s"].values())
      a["bound_by"] = max(a["time_bounds_s"], key=a["time_bounds_s"].get)
      a["mfu"] = model / (a["step_time_s"] * chip.bf16_flops)
      entry.update(a)
      entry["images_per_s_per_chip"] = scfg.per_device_batch / a["step_time_s"]
      entry["images_per_s"] = entry["images_per_s_per_chip"] * len(devices)
    except DoesNotFit as e:
      entry.update(fits=False, error=str(e))
    entry["compile_s"] = time.perf_counter() - t
    report["programs"].append(entry)
    bar.update()
  bar.close()
  # Several batch sizes are a search: the best is the largest that fits. Fail when a program has none that fits.
  fitting = [p for p in report["programs"] if p["program"] == "train" and p["fits"]]
  report["best_train_batch"] = max((p["global_batch"] for p in fitting), default=None)
  if workdir:
    out = paths.path(workdir)   # local or gs://
    out.mkdir(parents=True, exist_ok=True)
    (out / "aot.json").write_text(json.dumps(report, indent=1))
    (out / "aot.md").write_text(markdown(report))
  bad = [p for p in report["programs"] if not p["fits"]]
  if any(p["program"] in SAMPLE_PROGRAMS for p in bad) or ("train" in programs and not fitting):
    raise DoesNotFit("; ".join(f"{p['program']} (batch {p.get('global_batch', p.get('call_batch'))}): "
                               + (p.get("error") or f"{p['hbm_bytes']['total'] / GiB:.1f} GiB per chip > "
                                  f"{chip.hbm_bytes / GiB:.0f} GiB") for p in bad))
  return report


def markdown(report: dict) -> str:
  chip = report["chip"]
  slices = f" x {report['num_slices']} slices" if report.get("num_slices", 1) > 1 else ""
  lines = [f"# AOT: {report['topology']}{slices} ({report['chips']} {chip['name']} chips, {report['hosts']} hosts), "
           f"{report['config']['image_size']} px",
           "",
           f"Estimated at {report['utilisation']:.0%} of the bf16 peak ({chip['bf16_flops'] / 1e12:.0f} TFLOP/s), "
           f"HBM {chip['hbm_bytes'] / GiB:.0f} GiB at {chip['hbm_bandwidth'] / 1e9:.0f} GB/s, "
           f"ICI {chip['ici_bandwidth'] / 1e9:.0f} GB/s per chip.",
           "",
           "| program | batch (global / per chip) | mesh | HBM per chip | model TFLOP per chip | compiled TFLOP per chip "
           "| collectives (MB per chip) | est. step | bound by | MFU | images/s | compile |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for p in report["programs"]:
    if isinstance(p.get("mesh"), dict):
      p = {**p, "mesh": ", ".join(f"{k} {v}" for k, v in p["mesh"].items())}
    best = " (best)" if p["program"] == "train" and p.get("global_batch") == report.get("best_train_batch") else ""
    batch = (f"{p['global_batch']} / {p['per_chip_batch']:g}{best}" if p["program"] == "train"
             else f"{p.get('call_batch', '?')} per {'call' if p.get('scope') == 'slice' else 'host'} "
                  f"/ {p.get('per_chip_batch', '?')}")
    if "hbm_bytes" not in p:
      lines.append(f"| {p['program']} | {batch} | {p.get('mesh', '')} | does not fit: {p.get('error', '')[:200]} "
                   f"| | | | | | | | {p['compile_s']:.0f} s |")
      continue
    hbm = p["hbm_bytes"]["total"]
    coll = ", ".join(f"{k} {v['count']}× {v['bytes'] / 1e6:.0f}" for k, v in p["collectives"].items() if v["count"])
    lines.append(
        f"| {p['program']} | {batch} | {p['mesh']} | {hbm / GiB:.2f} GiB ({p['hbm_fraction']:.0%})"
        f"{'' if p['fits'] else ' **does not fit**'} | {p['model_flops'] / 1e12:.3g} | {p['compiled_flops'] / 1e12:.3g} "
        f"| {coll or 'none'} | {p['step_time_s'] * 1e3:.1f} ms | {p['bound_by']} | {p['mfu']:.0%} "
        f"| {p['images_per_s']:.0f} | {p['compile_s']:.0f} s |")
  lines += ["", "Sampling rows: one whole sampling run (every network evaluation) per batch, on one host's chips "
            "(each host independently) or, in slice scope, on every chip at once; XLA counts the sampling loop's "
            "body once, so its compiled FLOPs are per evaluation. `sample` is the guided sampler (two evaluations "
            "per guided step); `student` is the model's guidance-distilled student (`busgen-jax distill`) on its "
            "default few-step plan, one evaluation per step.", ""]
  return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ docs

def slice_name(report: dict) -> str:
  """Cloud TPU's accelerator-type name of the compiled slice(s): v5p-64, or 2x v5e-4."""
  name = f"{report['chip']['name']}-{report['chips'] // report.get('num_slices', 1)}"
  return f"{report['num_slices']}x {name}" if report.get("num_slices", 1) > 1 else name


def summary_row(report: dict) -> dict:
  """The figures docs/TPU.md's summary keeps per topology: the best training batch and the sampler's rate."""
  train = [p for p in report["programs"] if p["program"] == "train"]
  best = next((p for p in train if p["global_batch"] == report.get("best_train_batch")), None)
  bigger = [p for p in train if best and p["global_batch"] > best["global_batch"] and not p["fits"]]
  rate = {p["program"]: [p["images_per_s"], p["network_evals"]] for p in report["programs"]
          if p["program"] in SAMPLE_PROGRAMS and p["fits"]}
  row = {"slice": slice_name(report), "topology": report["topology"], "chips": report["chips"],
         "hosts": report["hosts"], "sample": rate.get("sample"), "student": rate.get("student")}
  if best:
    row.update(best_batch=best["global_batch"], per_chip=best["per_chip_batch"],
               hbm=best["hbm_bytes"]["total"] / GiB, hbm_capacity=best["hbm_capacity"] / GiB,
               hbm_fraction=best["hbm_fraction"], step_s=best["step_time_s"], bound_by=best["bound_by"],
               mfu=best["mfu"], train_images_per_s=best["images_per_s"])
  if bigger:
    row["next"] = {"batch": bigger[0]["global_batch"], "error": bigger[0].get("error", "")}
  return row


def summary_table(rows: Sequence[dict]) -> str:
  lines = ["| slice | chips / hosts | best global batch (per chip) | HBM per chip | est. train step | bound by | MFU "
           "| train images/s | sampling images/s (network evals per image) | student's images/s (evals) "
           "| next batch tried |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    sample = " | ".join(f"{r[k][0]:.0f} ({r[k][1]})" if r.get(k) else "not compiled" for k in ("sample", "student"))
    nxt = r.get("next")
    nxt = f"{nxt['batch']}: does not fit" + (f" ({m.group(1)} GiB of temporaries)" if (m := re.search(
        r"temporaries \(([\d.]+)G\)", nxt["error"])) else "") if nxt else "none larger tried"
    if "best_batch" not in r:
      lines.append(f"| {r['slice']} (`{r['topology']}`) | {r['chips']} / {r['hosts']} | no batch fits | | | | | "
                   f"| {sample} | {nxt} |")
      continue
    lines.append(f"| {r['slice']} (`{r['topology']}`) | {r['chips']} / {r['hosts']} | **{r['best_batch']}** "
                 f"({r['per_chip']:g}) | {r['hbm']:.1f} of {r['hbm_capacity']:.0f} GiB ({r['hbm_fraction']:.0%}) "
                 f"| {r['step_s']:.2f} s | {r['bound_by']} | {r['mfu']:.0%} | {r['train_images_per_s']:.0f} "
                 f"| {sample} | {nxt} |")
  return "\n".join(lines) + "\n"


ROW = re.compile(r"<!-- aot:row (\{.*?\}) -->")


def write_docs(path: str | Path, report: dict, command: str) -> None:
  """Rewrite `path`'s section for this topology (between `<!-- aot:TOPOLOGY:begin/end -->`, appended when new)
  and its summary table (between `<!-- aot:summary:begin/end -->`), rebuilt from every topology section's
  recorded row: docs/TPU.md is written by one `busgen-jax aot --docs` run per topology."""
  import jax
  from busgen_jax.evaluate import report as report_lib
  try:
    from importlib.metadata import version
    libtpu = version("libtpu")
  except Exception:                               # noqa: BLE001  (a name for the record only)
    libtpu = "?"
  key = report["topology"] + (f"x{report['num_slices']}" if report.get("num_slices", 1) > 1 else "")
  chip = report["chip"]
  row = summary_row(report)
  md = markdown(report).split("\n")
  body = [f"### {row['slice']} (`{report['topology']}`: {report['chips']} chips, {report['hosts']} hosts; "
          f"{chip['bf16_flops'] / 1e12:.0f} TFLOP/s bf16, {chip['hbm_bytes'] / GiB:.0f} GiB at "
          f"{chip['hbm_bandwidth'] / 1e9:.0f} GB/s, ICI {chip['ici_bandwidth'] / 1e9:.0f} GB/s)", "",
          f"`{command}` (libtpu {libtpu}, jax {jax.__version__}, effort {report['effort']:g}, "
          f"{report['utilisation']:.0%} of peak assumed)", "",
          *[l for l in md if l.startswith("|")], "",
          f"<!-- aot:row {json.dumps(row, default=float)} -->", ""]
  path = Path(path)
  report_lib.write_section(path, "\n".join(body), f"<!-- aot:{key}:begin -->", f"<!-- aot:{key}:end -->",
                           None)   # the body's own heading
  text = path.read_text()
  rows = [json.loads(m.group(1)) for m in ROW.finditer(text)]
  report_lib.write_section(path, summary_table(rows), "<!-- aot:summary:begin -->", "<!-- aot:summary:end -->",
                           "Summary: the global batch that fits best")


def default_config() -> ml_collections.ConfigDict:
  """A training config: the model and batch the programs are compiled for."""
  from busgen_jax.train import diffusion
  return diffusion.default_config()


WORKDIR_OPTIONAL = True


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string("topology", None, "TPU slice to compile for: v5p:4x4x4, v5e:16x16, v6e:8x8, v4:2x2x2 ...")
  flags.DEFINE_list("batch_sizes", [], "global train batch sizes to compile (default: the config's data.batch_size)")
  flags.DEFINE_list("programs", ["train", "sample"], "train, sample (the guided sampler) and/or student (a "
                    "guidance-distilled student of the model with its default few-step plan)")
  flags.DEFINE_integer("sample_batch", 0, "sampling batch per chip (default: `busgen-jax sample`'s)")
  flags.DEFINE_float("utilisation", 0.5, "fraction of the bf16 peak assumed for the step-time estimate")
  flags.DEFINE_integer("num_slices", 1, "multi-slice: this many copies of the topology over the data-centre network")
  flags.DEFINE_float("effort", 0.0, "XLA exec_time_optimization_effort in [-1, 1]; -1 compiles about 2x faster")
  flags.DEFINE_string("docs", "", "a Markdown file (docs/TPU.md) whose section for this topology and whose summary "
                      "table to rewrite")


def main(cfg: ml_collections.ConfigDict, workdir: str | None, argv) -> None:
  import sys
  import jax
  from absl import app, flags
  F = flags.FLAGS
  # Nothing runs on the described chips: keep JAX on the host even where libtpu would claim a local TPU (jax is
  # already imported by the config, but its backends start lazily).
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  if not F.topology:
    raise app.UsageError("--topology is required (e.g. v5p:4x4x4)")
  bad = set(F.programs) - {"train", *SAMPLE_PROGRAMS}
  if bad:
    raise app.UsageError(f"--programs takes train, sample and/or student, got {sorted(bad)}")
  try:
    report = run(cfg, workdir, topology_name=F.topology, batch_sizes=[int(b) for b in F.batch_sizes],
                 programs=F.programs, sample_per_device_batch=F.sample_batch, utilisation=F.utilisation,
                 effort=F.effort, num_slices=F.num_slices)
  except DoesNotFit as e:
    print(f"busgen-jax aot: does not fit on {F.topology}: {e}", file=sys.stderr)
    sys.exit(1)
  print(markdown(report))
  if F.docs:
    args = sys.argv[1:]
    args = [a for i, a in enumerate(args)     # the command that made the section, less where it was written
            if not a.startswith("--docs") and not (i and args[i - 1] == "--docs")]
    write_docs(F.docs, report, shlex.join(["busgen-jax", *args]))
