"""Training and input-pipeline throughput on this machine, against its measured matmul peak (same run).

  python -m busgen_jax.train.benchmark --model official --size 64 --batch 4
  python -m busgen_jax.train.benchmark --model tiny --size 32 --batch 16 --pipeline_data DATASET_DIR
  python -m busgen_jax.train.benchmark --model official --size 64 --batch 8 --notrain --sample_steps 50

Reports the f32 matmul peak (best of several 2048^3 products), the train step's images/s and achieved
GFLOP/s (model FLOPs from XLA's cost analysis: forward x 3 for forward + backward), their fraction of the
peak; with --sample_steps the sampler's images/s (guided: two network passes per step); with --pipeline_data the Grain pipeline's images/s at the same image size for 0, 1 and 2 workers
and its ratio to what the train step consumes.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("model", "official", ["official", "tiny"], "official architecture, or configs/phantom_tiny")
flags.DEFINE_integer("size", 64, "image size")
flags.DEFINE_integer("batch", 4, "global batch")
flags.DEFINE_integer("steps", 3, "timed steps (after one warm-up step)")
flags.DEFINE_string("dtype", "float32", "compute dtype")
flags.DEFINE_string("pipeline_data", "", "a dataset directory: also time the Grain pipeline on it")
flags.DEFINE_integer("pipeline_batches", 40, "batches per pipeline measurement")
flags.DEFINE_integer("sample_steps", 0, "also time sampling: DPM-Solver++ (single-step, order 3) with guidance "
                     "over this many steps (official: 50); 0: skip")
flags.DEFINE_bool("train", True, "time the train step")


def matmul_peak(n: int = 2048, repeats: int = 10) -> float:
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = np.inf
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def train_config():
  from busgen_jax import official
  from busgen_jax.train import diffusion
  cfg = diffusion.default_config()
  if FLAGS.model == "official":
    cfg.model = official.model_config()
    cfg.model.dropout = 0.1
  else:
    from importlib import util
    from pathlib import Path
    spec = util.spec_from_file_location("phantom_tiny", Path(__file__).parents[2] / "configs" / "phantom_tiny.py")
    mod = util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = mod.get_config()
  cfg.model.dtype = FLAGS.dtype
  cfg.data.image_size, cfg.data.batch_size = FLAGS.size, FLAGS.batch
  cfg.mesh = {"data": 1, "fsdp": 1}
  return cfg


def time_train(cfg) -> dict:
  from busgen_jax import parallel
  from busgen_jax.models import unet
  from busgen_jax.train import diffusion
  setup = diffusion.Setup(cfg, mesh=parallel.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  state = setup.init_state(0)
  B, S = cfg.data.batch_size, cfg.data.image_size
  rng = np.random.default_rng(0)
  local = {"image": rng.uniform(-1, 1, (B, S, S, 3)).astype(np.float32),
           "box": np.zeros((B, S, S, 1), np.float32), "mask": np.zeros((B, S, S, 1), np.float32),
           "pathology": np.ones(B, np.int32), "device": np.ones(B, np.int32)}
  batch = parallel.global_batch({k: local[k] for k in setup.batch_keys}, setup.mesh, setup.rules)
  t = time.perf_counter()
  state, m = setup.train_step(state, batch)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, m = setup.train_step(state, batch)
  jax.block_until_ready(m)
  step_s = (time.perf_counter() - t) / FLAGS.steps
  flops = unet.flops_per_image(cfg.model, S)
  return {"compile_and_first_step_s": compile_s, "step_s": step_s, "images_per_s": B / step_s,
          "gflop_per_image": flops / 1e9, "gflop_per_s": flops * B / step_s / 1e9}


def time_sample(cfg) -> dict:
  """Images/s of the official sampler (DPM-Solver++ 3S with guidance 2.8) at the benchmark's batch."""
  from flax import nnx
  from busgen_jax.diffusion import samplers, schedule
  from busgen_jax.models import unet
  B, S = cfg.data.batch_size, cfg.data.image_size
  plan = samplers.make_plan(schedule.Schedule.from_config(cfg.schedule).betas, steps=FLAGS.sample_steps)
  graphdef, params = nnx.split(unet.create(cfg.model, 0), nnx.Param)

  @jax.jit
  def sample(params, cond, keys):
    net = nnx.merge(graphdef, params)
    return samplers.sample_from_keys(plan, lambda x, t, c: net(x, t, c), keys, (S, S, 3), cond=cond,
                                     guidance_scale=2.8)

  cond = {"pathology": jnp.ones(B, jnp.int32), "device": jnp.ones(B, jnp.int32),
          "box": jnp.zeros((B, S, S, 1)), "mask": jnp.zeros((B, S, S, 1))}
  cond = {k: v for k, v in cond.items() if k in cfg.model.conditions}
  keys = jax.random.split(jax.random.PRNGKey(1), B)
  t = time.perf_counter()
  jax.block_until_ready(sample(params, cond, keys))
  compile_s = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(sample(params, cond, keys))
  dt = time.perf_counter() - t
  fwd = unet.flops_per_image(cfg.model, S) / 3
  return {"sample_steps": FLAGS.sample_steps, "sample_compile_and_first_s": compile_s, "sample_s": dt,
          "sample_images_per_s": B / dt, "sample_gflop_per_s": 2 * plan.num_evals * fwd * B / dt / 1e9}


def time_pipeline(path: str, size: int, batch: int) -> dict:
  from busgen_jax.data import pipeline
  out = {}
  for workers in (0, 1, 2):
    c = pipeline.default_config()
    c.sources.real.path = path
    c.image_size, c.batch_size, c.worker_count = size, batch, workers
    it = iter(pipeline.build(c, process_index=0, process_count=1))
    try:
      for _ in range(3):
        next(it)
      t = time.perf_counter()
      for _ in range(FLAGS.pipeline_batches):
        next(it)
      out[workers] = batch * FLAGS.pipeline_batches / (time.perf_counter() - t)
    finally:
      it.close()
  return out


def main(argv):
  del argv
  flags.FLAGS.mark_as_parsed()
  cfg = train_config()
  peak = matmul_peak()
  result = {"device": str(jax.devices()[0].device_kind), "model": FLAGS.model, "size": FLAGS.size,
            "batch": FLAGS.batch, "dtype": FLAGS.dtype, "matmul_peak_gflop_per_s": peak / 1e9}
  if FLAGS.train:
    result.update(time_train(cfg))
    result["fraction_of_matmul_peak"] = result["gflop_per_s"] * 1e9 / peak
  if FLAGS.sample_steps:
    result.update(time_sample(cfg))
    result["sample_fraction_of_matmul_peak"] = result["sample_gflop_per_s"] * 1e9 / peak
  result["matmul_peak_after_gflop_per_s"] = matmul_peak() / 1e9   # the machine is shared: bracket the run
  if FLAGS.pipeline_data:
    pipe = time_pipeline(FLAGS.pipeline_data, FLAGS.size, FLAGS.batch)
    result["pipeline_images_per_s"] = pipe
    if FLAGS.train:
      result["pipeline_over_train_step"] = {w: v / result["images_per_s"] for w, v in pipe.items()}
  print(json.dumps(result, indent=1))


if __name__ == "__main__":
  app.run(main)
