"""`busgen-jax bench`: what the training step, the sampler and the Grain pipeline achieve on this machine.

  busgen-jax bench --workdir /tmp/bench                                  # the CPU cases
  busgen-jax bench --workdir /tmp/bench --config.docs=docs/BENCHMARKS.md # and rewrite its generated section
  busgen-jax bench --workdir /tmp/bench --config.only=tiny_32px          # one case
  busgen-jax bench --config configs/bench.py:accelerator --workdir /tmp/bench   # GPU/TPU: bf16, big batches
  busgen-jax bench --workdir /tmp/bench --config.only=official_64px --config.torch_reference=/path/to/BUSGen
                                               # beside the official PyTorch trainer, in the same process

Each case runs in its own process, so its peak host memory (ru_maxrss) is its own. In that process: the matmul peak
(best of ten jitted 2048^3 products; f32 on CPU, bf16 on an accelerator) before and after, because shared machines
drift (fractions are of the higher); the train step's cold compile time, step time, images/s, model FLOPs (XLA's cost
analysis, forward x 3) and their fraction of the measured peak, and on an accelerator the MFU against the chip's
published bf16 peak; XLA's compiled temporary memory of the step with materialised (dense) and memory-efficient
(chunked) attention; a LoRA adaptation step in both of lora.fold's forms (cases with adapt_rank); generation's
images/s and network evaluations per image for the official sampler, the case's solver setting and a guidance-distilled
student (_samplers); the Grain pipeline's images/s at the case's size for 0 and 2 workers, beside what the train step
consumes. Results: WORKDIR/bench.json and bench.md; with --config.docs, the section between `<!-- bench:begin -->`
and `<!-- bench:end -->` of that file. The four CPU cases took 21-25 minutes on 2 cores with the reference rows.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import ml_collections

from busgen_jax import console, paths

# Published dense bf16 peaks of GPUs (FLOP/s), matched as substrings of jax's device_kind; TPUs' are aot.CHIPS'
# (keyed by their exact device_kind). The MFU denominator.
GPU_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def case(model, size, batch, *, steps=3, sample_batch=0, sample_steps=0, official_steps=0, student_steps=0,
         pipeline_batches=0, dtype="float32", attention="auto", attention_chunk=1024, conv="direct",
         compare_attention=False, adapt_rank=0) -> dict:
  """One bench case: the model (a MODELS key: the demo's "tiny", configs/experiment.py:cpu's "experiment_cpu", or
  "official"), image size and train batch, timed train steps, sampler batch and steps (0: no sampling), the
  official sampler's steps and a guidance student's (0: no such row; _samplers), pipeline batches (0: none),
  compute dtype, attention and convolution implementations (model.attention, attention_chunk, conv), whether to
  compare dense with chunked attention's memory, and the LoRA rank of an adaptation step on every layer (0: none)."""
  return dict(locals())     # the arguments, by name


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.cases = ml_collections.ConfigDict({
      "tiny_32px": case("tiny", 32, 16, steps=10, sample_batch=16, sample_steps=25, official_steps=50,
                        student_steps=8, pipeline_batches=40),
      "experiment_cpu_64px": case("experiment_cpu", 64, 16, steps=10, sample_batch=16, sample_steps=10,
                                  pipeline_batches=20, adapt_rank=8),
      "official_64px": case("official", 64, 4, sample_batch=2, sample_steps=10, official_steps=50, student_steps=8,
                             pipeline_batches=20, compare_attention=True),
      "official_128px": case("official", 128, 1, steps=2, pipeline_batches=10, compare_attention=True),
  })
  c.only = ""                 # comma-separated case names ("" = all)
  c.pipeline_images = 256     # phantom images converted for the pipeline measurement
  c.docs = ""                 # a Markdown file whose generated section to rewrite (e.g. docs/BENCHMARKS.md)
  c.timeout_s = 3600          # per case
  # A checkout of the official BUSGen code (with torch): the official-model cases also time its trainer on the
  # same batch, in the same process, alternating with ours; the table gives the ratio.
  c.torch_reference = ""
  c.reference_rounds = 3      # alternating rounds of each; the best round of each counts
  return c


# ------------------------------------------------------------------------------------------------ one case

def _matmul_peak(dtype, n: int = 2048, repeats: int = 10) -> float:
  import jax
  import jax.numpy as jnp
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def _tiny_config():
  """configs/phantom_tiny.py (the demo's architecture)."""
  from busgen_jax import config_files
  return config_files.load(config_files.CONFIGS / "phantom_tiny.py")


def _official_config():
  """The official BUSGen UNet (dropout 0.1, as its Train.py) in the default diffusion trainer."""
  from busgen_jax import official
  from busgen_jax.train import diffusion
  cfg = diffusion.default_config()
  cfg.model = official.model_config(dropout=0.1)
  return cfg


def _experiment_cpu_config():
  """configs/experiment.py:cpu's diffusion model and trainer (what real-data runs train on 2 cores)."""
  from busgen_jax import config_files
  return config_files.load(f"{config_files.CONFIGS / 'experiment.py'}:cpu").diffusion


# A case's "model": the diffusion config whose architecture and trainer it measures.
MODELS = {"tiny": _tiny_config, "official": _official_config, "experiment_cpu": _experiment_cpu_config}


def _config(case: dict):
  if case["model"] not in MODELS:
    raise ValueError(f"bench case model must be one of {sorted(MODELS)}, got {case['model']!r}")
  cfg = MODELS[case["model"]]()
  cfg.model.dtype, cfg.model.attention, cfg.model.conv = case["dtype"], case["attention"], case["conv"]
  cfg.model.attention_chunk = case["attention_chunk"]
  cfg.data.image_size, cfg.data.batch_size = case["size"], case["batch"]
  return cfg


def _batch(B: int, S: int) -> dict:
  """A batch of every field a model may take (noise images, empty boxes and masks, label 1)."""
  import numpy as np
  return {"image": np.random.default_rng(0).uniform(-1, 1, (B, S, S, 3)).astype(np.float32),
          "box": np.zeros((B, S, S, 1), np.float32), "mask": np.zeros((B, S, S, 1), np.float32),
          "pathology": np.ones(B, np.int32), "device": np.ones(B, np.int32)}


def compiled_train_step(cfg, case: dict):
  """`train`'s step for a bench case on one device, compiled and warmed up: (step, state, batch, compile s).
  docs/experiments/step_profile.py profiles the same step."""
  import jax
  from busgen_jax import parallel
  from busgen_jax.train import diffusion
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  setup = diffusion.Setup(cfg, mesh=mesh)
  local = _batch(case["batch"], case["size"])
  batch = parallel.global_batch({k: local[k] for k in setup.batch_keys}, setup.mesh, setup.rules)
  state = setup.init_state(0)
  t = time.perf_counter()
  step = setup.train_step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  state, m = step(state, batch)                      # warm-up
  jax.block_until_ready(m)
  return step, state, batch, compile_s


def timed_steps(step, state, batch, n: int):
  """n steps from `state`: (the new state, seconds per step)."""
  import jax
  t = time.perf_counter()
  for _ in range(n):
    state, m = step(state, batch)
  jax.block_until_ready(m)
  return state, (time.perf_counter() - t) / n


def _train(cfg, case: dict, fwd_flops: float) -> dict:
  import jax
  from busgen_jax import parallel
  from busgen_jax.train import diffusion
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])
  B = case["batch"]
  local = _batch(B, case["size"])
  out = {}
  variants = ("dense", "chunked") if case["compare_attention"] else ()
  for impl in variants:   # compile only: XLA's temporary buffers of the whole step
    c = ml_collections.ConfigDict(cfg.to_dict())
    c.model.attention = impl
    setup = diffusion.Setup(c, mesh=mesh)
    batch = parallel.global_batch({k: local[k] for k in setup.batch_keys}, setup.mesh, setup.rules)
    mem = setup.train_step.lower(setup.abstract_state, batch).compile().memory_analysis()
    out[f"temp_gib_{impl}_attention"] = mem.temp_size_in_bytes / 2 ** 30
  step, state, batch, out["train_compile_s"] = compiled_train_step(cfg, case)

  def ours():
    nonlocal state
    state, s = timed_steps(step, state, batch, case["steps"])
    return s

  if not case.get("torch_reference"):
    step_s = ours()
  else:
    # As many rounds of each, alternating in one process so that a machine's drift hits both; the best of each counts.
    torch_step = _torch_trainer(cfg, local, case["torch_reference"])
    torch_step()                                     # warm-up, as compiled_train_step's for ours
    rounds = []
    for _ in range(case["reference_rounds"]):
      t = time.perf_counter()
      for _ in range(case["steps"]):
        torch_step()
      rounds.append({"torch_step_s": (time.perf_counter() - t) / case["steps"], "step_s": ours()})
    step_s = min(r["step_s"] for r in rounds)
    torch_s = min(r["torch_step_s"] for r in rounds)
    out.update(torch_rounds=rounds, torch_train_step_s=torch_s, torch_train_images_per_s=B / torch_s,
               train_over_torch=torch_s / step_s)
  flops = 3 * fwd_flops                              # forward + backward
  out.update(train_step_s=step_s, train_images_per_s=B / step_s, gflop_per_image=flops / 1e9,
             train_gflop_per_s=flops * B / step_s / 1e9)
  return out


def _adapt(cfg, case: dict) -> dict:
  """The LoRA adaptation step (busgen-jax adapt's: adapters on every layer at `adapt_rank`, the base frozen) in
  both of lora.fold's forms, alternating rounds in one process; the best round of each counts."""
  import jax
  from flax import nnx
  from busgen_jax.diffusion import schedule
  from busgen_jax.models import lora, unet
  from busgen_jax.train import diffusion, state as train_state
  tx = train_state.optimizer(cfg.optim, cfg.num_steps)
  sched = schedule.Schedule.from_config(cfg.schedule)
  steps = {}
  for fold in ("branch", "kernel"):
    lc = lora.default_config()
    lc.update(rank=case["adapt_rank"], alpha=float(case["adapt_rank"]), fold=fold)
    model = unet.create(cfg.model)
    lora.inject(model, lc)
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, nnx.Param)
    state = train_state.init_state(nnx.to_pure_dict(adapters), tx, 0)
    step = jax.jit(diffusion.make_train_step(graphdef, sched, cfg, tx), donate_argnums=0)
    batch = {k: v for k, v in _batch(case["batch"], case["size"]).items() if k in ("image", *cfg.model.conditions)}
    frozen = nnx.to_pure_dict(frozen)
    state, m = step(state, batch, frozen)          # compile and warm up
    jax.block_until_ready(m)
    steps[fold] = [state, step, batch, frozen]
  best = {fold: float("inf") for fold in steps}
  for _ in range(2):
    for fold, (state, step, batch, frozen) in steps.items():
      t = time.perf_counter()
      for _ in range(case["steps"]):
        state, m = step(state, batch, frozen)
      jax.block_until_ready(m)
      steps[fold][0] = state
      best[fold] = min(best[fold], (time.perf_counter() - t) / case["steps"])
  return {f"adapt_{fold}_images_per_s": case["batch"] / s for fold, s in best.items()}


def _official_checkout(checkout: str) -> Path:
  root = Path(checkout).expanduser().resolve()
  for f in ("BUSGen/Model.py", "BUSGen/Diffusion.py"):
    if not (root / f).is_file():
      raise FileNotFoundError(f"--config.torch_reference={checkout}: no {f} there (a checkout of the official "
                              "BUSGen code is expected)")
  return root


def _torch_trainer(cfg, local: dict, checkout: str):
  """One training step of the official PyTorch code on our batch, as its Train.py takes it: BUSGen/Model.py's
  UNet inside BUSGen/Diffusion.py's GaussianDiffusionTrainer, the loss summed / B^2, gradient clipping at 1, AdamW
  (weight decay 1e-4). The same architecture, size, batch and conditions as our step, f32, and as many threads
  as XLA's CPU client uses. The checkout's own requirements (torch, and what its Utils.py imports) must be
  importable."""
  import importlib
  root = _official_checkout(checkout)
  try:
    import torch
  except ImportError as e:
    raise ImportError("--config.torch_reference needs torch: pip install 'busgen-jax[torch]'") from e
  sys.path.insert(0, str(root))
  model_lib, diffusion_lib = (importlib.import_module(f"BUSGen.{m}") for m in ("Model", "Diffusion"))
  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  m, s = cfg.model, cfg.schedule
  if s.kind != "linear":
    raise ValueError(f"the official trainer has a linear beta schedule, the case {s.kind!r}")
  net = model_lib.UNet(T=m.T, ch=m.ch, ch_mult=list(m.ch_mult), num_res_blocks=m.num_res_blocks, dropout=m.dropout,
                       num_groups=m.num_groups, affine=True, box_cond=True, cls_cond=True, dev_cond=True,
                       dev_num=m.num_devices)
  trainer = diffusion_lib.GaussianDiffusionTrainer(net, s.beta_1, s.beta_T, s.T)
  opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=1e-4)
  x0 = torch.from_numpy(local["image"]).permute(0, 3, 1, 2).contiguous()          # NHWC -> NCHW
  B = x0.shape[0]
  labels = (torch.zeros(B, 1, 5), torch.from_numpy(local["pathology"]).long(),    # no valid box, as our batch
            torch.from_numpy(local["device"]).long())

  def step():
    opt.zero_grad()
    loss = trainer(x0, labels).sum() / B ** 2.
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
  return step


def _samplers(case: dict) -> dict[str, tuple[str, dict, bool]]:
  """Generation rows of a case: name -> (label, sampler overrides, a guidance student?). The official sampler
  (DPM-Solver++ single-step order 3, guided), the case's solver setting (DPM-Solver++ 2M, guided) and a
  guidance-distilled student (`busgen-jax distill`: the scale an input, one evaluation per step)."""
  rows = {}
  if case.get("official_steps"):
    rows["official"] = (f"official: DPM-Solver++ 3S, {case['official_steps']} steps, guided",
                        {"method": "singlestep", "order": 3, "steps": case["official_steps"]}, False)
  rows["solver"] = (f"DPM-Solver++ 2M, {case['sample_steps']} steps, guided",
                    {"method": "multistep", "order": 2, "steps": case["sample_steps"]}, False)
  if case.get("student_steps"):
    rows["student"] = (f"guidance student, DPM-Solver++ 2M, {case['student_steps']} steps",
                       {"method": "multistep", "order": 2, "steps": case["student_steps"]}, True)
  return rows


def _sample(cfg, case: dict, fwd_flops: float) -> dict:
  """The production sampling program (generate.make_sampler) at the case's batch and guidance 2.8, for each of
  _samplers(case); the case's solver row also fills the top-level sample_* figures."""
  import jax
  import numpy as np
  from flax import nnx
  from busgen_jax import generate, parallel
  from busgen_jax.diffusion import samplers
  from busgen_jax.models import unet
  B, S = case["sample_batch"], case["size"]
  mesh = parallel.make_mesh({"data": 1}, jax.devices()[:1])
  batch = _batch(B, S)
  out, params = {"samplers": {}}, {}
  for name, (label, overrides, student) in _samplers(case).items():
    scfg = generate.default_config()
    scfg.schedule = ml_collections.ConfigDict(cfg.schedule.to_dict())
    scfg.sampler.update(guidance_scale=2.8, **overrides)
    model_cfg = ml_collections.ConfigDict({**cfg.model.to_dict(), "guidance_embed": student})
    sample, plan = generate.make_sampler(scfg, model_cfg, S, cfg.objective.prediction, mesh)
    if student not in params:   # the teacher's weights serve every guided row
      params[student] = nnx.to_pure_dict(nnx.state(unet.create(model_cfg, 0), nnx.Param))
    args = (params[student], np.arange(B, dtype=np.int32), {k: batch[k] for k in cfg.model.conditions},
            np.tile(np.float32([[-0.3, 0.25]]), (B, 1)))
    t = time.perf_counter()
    fn = sample.lower(*args).compile()
    compile_s = time.perf_counter() - t
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    dt = time.perf_counter() - t
    evals = samplers.network_evals(plan, generate.batch_guidance(scfg, model_cfg))
    out["samplers"][name] = {"label": label, "steps": overrides["steps"], "network_evals": evals,
                             "images_per_s": B / dt, "gflop_per_s": evals * fwd_flops * B / dt / 1e9,
                             "compile_s": compile_s}
  r = out["samplers"]["solver"]
  out.update(sample_steps=r["steps"], sample_network_evals=r["network_evals"], sample_compile_s=r["compile_s"],
             sample_images_per_s=r["images_per_s"], sample_gflop_per_s=r["gflop_per_s"])
  return out


def _pipeline(case: dict, data: str) -> dict:
  from busgen_jax.data import pipeline
  out = {}
  for workers in (0, 2):
    c = pipeline.default_config()
    c.sources.real.path = data
    c.image_size, c.batch_size, c.worker_count = case["size"], max(case["batch"], 8), workers
    it = iter(pipeline.build(c, process_index=0, process_count=1))
    try:
      for _ in range(3):
        next(it)
      t = time.perf_counter()
      for _ in range(case["pipeline_batches"]):
        next(it)
      seconds = time.perf_counter() - t
      out[f"pipeline_images_per_s_{workers}_workers"] = c.batch_size * case["pipeline_batches"] / seconds
    finally:
      it.close()
  return out


def _published_bf16_peak(device_kind: str) -> float | None:
  from busgen_jax.stages import aot
  if device_kind in aot.CHIPS:
    return aot.CHIPS[device_kind].bf16_flops
  return next((v for k, v in GPU_BF16_PEAK.items() if k in device_kind), None)


def run_case(case: dict, data: str) -> dict:
  """One case, in this process."""
  import jax
  import jax.numpy as jnp
  device = jax.devices()[0]
  accelerator = device.platform != "cpu"
  dtype = jnp.bfloat16 if accelerator else jnp.float32
  from busgen_jax.models import unet
  cfg = _config(case)
  out = {"platform": device.platform, "device_kind": device.device_kind, "matmul_dtype": jnp.dtype(dtype).name,
         "matmul_peak_gflop_per_s": _matmul_peak(dtype) / 1e9}
  fwd = unet.flops_per_image(cfg.model, case["size"], backward=False)
  out.update(_train(cfg, case, fwd))
  if case.get("adapt_rank"):
    out.update(_adapt(cfg, case))
  if case["sample_steps"] and case["sample_batch"]:
    out.update(_sample(cfg, case, fwd))
  out["matmul_peak_after_gflop_per_s"] = _matmul_peak(dtype) / 1e9
  # Fractions of the better of the two peaks: a conservative figure on a machine that others share.
  best = max(out["matmul_peak_gflop_per_s"], out["matmul_peak_after_gflop_per_s"])
  out["train_fraction_of_matmul_peak"] = out["train_gflop_per_s"] / best
  if "sample_gflop_per_s" in out:
    out["sample_fraction_of_matmul_peak"] = out["sample_gflop_per_s"] / best
  spec = _published_bf16_peak(device.device_kind)
  if accelerator and spec:
    out["bf16_peak_tflop_per_s_published"] = spec / 1e12
    out["train_mfu"] = out["train_gflop_per_s"] * 1e9 / spec
    if "sample_gflop_per_s" in out:
      out["sample_mfu"] = out["sample_gflop_per_s"] * 1e9 / spec
  if case["pipeline_batches"] and data:
    out.update(_pipeline(case, data))
    out["pipeline_over_train"] = out["pipeline_images_per_s_2_workers"] / out["train_images_per_s"]
  return out


# ------------------------------------------------------------------------------------------------ the stage

def _child(name: str, case: dict, data: str, out: Path, timeout: float) -> dict:
  """Run one case in a child process; its result plus the child's peak host memory."""
  cmd = [sys.executable, "-m", "busgen_jax.stages.bench", json.dumps(case), data, str(out)]
  t = time.perf_counter()
  env = dict(os.environ, JAX_ENABLE_COMPILATION_CACHE="false")   # compile times are cold compiles
  proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
  deadline = time.time() + timeout
  log = []
  for line in proc.stdout:             # stream the child's log (and keep its tail for errors)
    log.append(line)
    if time.time() > deadline:
      proc.kill()
  _, status, usage = os.wait4(proc.pid, 0)
  if status != 0 or not out.exists():
    raise RuntimeError(f"bench case {name} failed (status {status}):\n{''.join(log[-40:])}")
  res = json.loads(out.read_text())
  res["peak_host_memory_gib"] = usage.ru_maxrss / 2 ** 20          # KiB on Linux
  res["wall_s"] = time.perf_counter() - t
  return res


def run(cfg: ml_collections.ConfigDict, workdir: str | Path) -> dict:
  from absl import logging
  from busgen_jax.data import convert
  work = paths.local(workdir, "bench workdir (it holds the converted phantom dataset the pipeline cases read)")
  work.mkdir(parents=True, exist_ok=True)
  names = [n for n in cfg.only.split(",") if n] or list(cfg.cases.keys())
  if unknown := sorted(set(names) - set(cfg.cases.keys())):
    raise ValueError(f"--config.only: unknown cases {unknown} (cases: {sorted(cfg.cases.keys())})")
  cases = {n: cfg.cases[n].to_dict() for n in names}
  if cfg.torch_reference:
    if not any(c["model"] == "official" for c in cases.values()):
      raise ValueError(f"--config.torch_reference times the official model: none of the cases {names} is one")
    _official_checkout(cfg.torch_reference)          # before any case runs
    for c in cases.values():
      if c["model"] == "official":
        c.update(torch_reference=cfg.torch_reference, reference_rounds=cfg.reference_rounds)
  data = ""
  if any(case["pipeline_batches"] for case in cases.values()):
    c = convert.default_config()
    c.format, c.output = "phantom", str(work / "data")
    c.phantom.num_examples = cfg.pipeline_images
    c.phantom.size = max(case["size"] for case in cases.values())
    data = str(convert.convert(c))
  results = {}
  bar = console.bar(len(names), "bench", unit="case")
  for name in names:
    logging.info("bench case %s: %s", name, cases[name])
    results[name] = {"case": cases[name], **_child(name, cases[name], data, work / f"{name}.json", cfg.timeout_s)}
    logging.info("bench case %s: %s", name, json.dumps(results[name]))
    bar.update()
  bar.close()
  report = {"date": datetime.date.today().isoformat(), "host": platform.node(), "cpu_count": os.cpu_count(),
            "command": shlex.join(["busgen-jax", *sys.argv[1:]]) if "bench" in sys.argv else "busgen-jax bench",
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
            "cases": results}
  (work / "bench.json").write_text(json.dumps(report, indent=1))
  md = markdown(report)
  (work / "bench.md").write_text(md)
  if cfg.docs:
    from busgen_jax.evaluate import report as report_lib
    report_lib.write_section(Path(cfg.docs), md, BEGIN, END, "Generated by `busgen-jax bench`")
  return report


def _f(x, fmt="{:.3g}") -> str:
  return "-" if x is None else fmt.format(x)


def _table(cases: dict, needs: str, header: list[str], row) -> list[str]:
  """A Markdown table of the cases that have `needs`, one row of cells each (row(name, result))."""
  rows = [row(n, r) for n, r in cases.items() if needs in r]
  if not rows:
    return []
  return ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header),
          *("| " + " | ".join(cells) + " |" for cells in rows)]


def markdown(report: dict) -> str:
  """The report as Markdown, cases from small to large: training, sampling, attention memory, pipeline."""
  cases = dict(sorted(report["cases"].items(),
                      key=lambda kv: (kv[1]["case"]["model"] != "tiny", kv[1]["case"]["size"], kv[0])))
  first = next(iter(cases.values()), {})
  lines = [f"Generated by `{report['command']}` on {report['date']} ({report['cpu_count']} CPU cores; "
           f"{first.get('platform', '?')}: {first.get('device_kind', '?')}). The matmul peak is measured in each "
           "case's process before and after it; fractions are of the higher of the two."
           + "".join(f" {k.upper()}: `{report[k]}`." for k in ("xla_flags", "glibc_tunables") if report.get(k))]
  lines += _table(cases, "train_images_per_s", [
      "case", "matmul peak GFLOP/s (before/after)", "train images/s", "GFLOP/image", "train GFLOP/s", "of peak",
      "MFU", "compile s", "peak host GiB"], lambda n, r: [
      f"{n} ({r['case']['model']}, {r['case']['size']} px, batch {r['case']['batch']}, {r['case']['dtype']})",
      f"{_f(r['matmul_peak_gflop_per_s'], '{:.0f}')} / {_f(r['matmul_peak_after_gflop_per_s'], '{:.0f}')}",
      _f(r["train_images_per_s"]), _f(r["gflop_per_image"], "{:.1f}"), _f(r["train_gflop_per_s"], "{:.1f}"),
      _f(r["train_fraction_of_matmul_peak"], "{:.1%}"), _f(r.get("train_mfu"), "{:.1%}"),
      _f(r["train_compile_s"], "{:.0f}"), _f(r["peak_host_memory_gib"], "{:.2f}")])
  lines += _table(cases, "train_over_torch", [
      "case", "train images/s: busgen-jax", "official PyTorch trainer", "busgen-jax ÷ official",
      "rounds (s/step: ours, official)"], lambda n, r: [
      n, _f(r["train_images_per_s"]), _f(r["torch_train_images_per_s"]), f"{r['train_over_torch']:.2f}×",
      "; ".join(f"{x['step_s']:.2f}, {x['torch_step_s']:.2f}" for x in r["torch_rounds"])])
  lines += _table(cases, "adapt_kernel_images_per_s", [
      "case", "LoRA rank (every layer)", "adaptation images/s: fold=branch", "fold=kernel (CPU default)",
      "kernel ÷ branch", "kernel ÷ full train step"], lambda n, r: [
      n, str(r["case"]["adapt_rank"]), _f(r["adapt_branch_images_per_s"]), _f(r["adapt_kernel_images_per_s"]),
      f"{r['adapt_kernel_images_per_s'] / r['adapt_branch_images_per_s']:.2f}×",
      f"{r['adapt_kernel_images_per_s'] / r['train_images_per_s']:.2f}×"])
  rows = {f"{n}/{k}": {**r, **v, "name": n} for n, r in cases.items() for k, v in r.get("samplers", {}).items()}
  lines += _table(rows, "images_per_s", [
      "case", "sampler (guidance 2.8)", "network evaluations / image", "images/s", "GFLOP/s", "of peak", "MFU",
      "compile s"], lambda n, r: [
      f"{r['name']} (batch {r['case']['sample_batch']})", r["label"], str(r["network_evals"]),
      _f(r["images_per_s"]), _f(r["gflop_per_s"], "{:.1f}"),
      _f(r["gflop_per_s"] / max(r["matmul_peak_gflop_per_s"], r["matmul_peak_after_gflop_per_s"]), "{:.1%}"),
      _f(r["gflop_per_s"] * 1e9 / (r["bf16_peak_tflop_per_s_published"] * 1e12)
         if r.get("bf16_peak_tflop_per_s_published") else None, "{:.1%}"), _f(r["compile_s"], "{:.0f}")])
  lines += _table(cases, "temp_gib_dense_attention", [
      "case", "XLA temporary memory of the train step: dense attention", "chunked (memory-efficient)"],
      lambda n, r: [n, f"{_f(r['temp_gib_dense_attention'], '{:.2f}')} GiB",
                    f"{_f(r['temp_gib_chunked_attention'], '{:.2f}')} GiB"])
  lines += _table(cases, "pipeline_over_train", [
      "case", "Grain pipeline images/s, 0 workers", "2 workers", "÷ what the train step consumes"],
      lambda n, r: [n, _f(r["pipeline_images_per_s_0_workers"], "{:.0f}"),
                    _f(r["pipeline_images_per_s_2_workers"], "{:.0f}"), f"{_f(r['pipeline_over_train'], '{:,.0f}')}×"])
  return "\n".join(lines) + "\n"


if __name__ == "__main__":     # a case's child process: bench.py CASE_JSON DATA OUT_JSON
  from absl import flags, logging
  flags.FLAGS.mark_as_parsed()
  logging.set_verbosity(logging.WARNING)
  result = run_case(json.loads(sys.argv[1]), sys.argv[2])
  Path(sys.argv[3]).write_text(json.dumps(result))


def main(cfg: ml_collections.ConfigDict, workdir: str, argv) -> None:
  run(cfg, workdir)
  print((Path(workdir) / "bench.md").read_text())
