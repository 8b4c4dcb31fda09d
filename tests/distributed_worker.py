"""One process of the 2-process jax.distributed tests: `train_preempted` (tests/test_train.py) and `generate`
(tests/test_sampling.py) each run two of these."""

import json
import os
import sys

# Two devices per process; LLVM at -O0 as in conftest (the tests compile far more than they run).
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0"
# and the production XLA:CPU settings, as conftest gives the single-process runs these are compared with
from busgen_jax import xla_env  # noqa: E402

xla_env.script()

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402


def generate(config_json, workdir, out):
  from busgen_jax import generate as generate_lib, parallel
  parallel.maybe_initialize_distributed()
  assert jax.process_count() == 2 and jax.device_count() == 4
  cfg = ml_collections.ConfigDict(json.loads(config_json))
  ds = generate_lib.generate(cfg, workdir)
  json.dump({"process": jax.process_index(), "dataset": str(ds)}, open(out, "w"))


def train_preempted(config_json, workdir, out):
  """The global batch from both processes' pipeline slices, then training in which process 1 gets a SIGTERM after
  its third step (as a spot VM's notice reaches one host)."""
  import signal
  from busgen_jax import checkpoint, parallel
  from busgen_jax.data import pipeline
  from busgen_jax.train import diffusion, writers
  parallel.maybe_initialize_distributed()
  cfg = ml_collections.ConfigDict(json.loads(config_json))
  assert jax.process_count() == 2 and jax.device_count() == 4
  # The global batch: each process's pipeline slice, in process order.
  mesh, rules = parallel.make_mesh(dict(cfg.mesh)), parallel.Rules(cfg.sharding_rules)
  pipe = pipeline.build(cfg.data)
  it = iter(pipe)
  local = next(it)
  it.close()
  batch = parallel.global_batch({"image": local["image"], "pathology": local["pathology"]}, mesh, rules)
  mine = [np.asarray(s.data) for s in batch["pathology"].addressable_shards]

  create = writers.create

  def create_with_notice(*args, **kwargs):
    writer, progress = create(*args, **kwargs)

    def notify(step):
      progress(step)
      if step == 3 and jax.process_index() == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return writer, notify

  writers.create = create_with_notice
  metrics = diffusion.train(cfg, workdir)
  json.dump({"process": jax.process_index(), "global_shape": list(batch["image"].shape),
             "local_rows": int(local["image"].shape[0]), "mine": np.concatenate(mine).tolist(),
             "local_pathology": local["pathology"].tolist(), "loss": metrics.get("loss"),
             "latest": checkpoint.Checkpointer(f"{workdir}/checkpoints").latest_step()}, open(out, "w"))


if __name__ == "__main__":
  {"generate": generate, "train_preempted": train_preempted}[sys.argv[1]](*sys.argv[2:])
