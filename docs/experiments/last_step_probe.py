"""Why the `cpu` preset's 10-step sampler lost FD (docs/SAMPLING.md): solver settings against the official sampler
from the same noise, in pixels and in the real classifier's feature space.

  python docs/experiments/last_step_probe.py --base /tmp/exp_cpu --plans "8,9,9:second,10,10:first,11,12"

Every plan samples the same images (the first `--images` training records' conditions, one PRNG key each, pure
noise start, guidance 2.8) with the base run's diffusion model, as DPM-Solver++ 2M at the given steps; the
reference is the official sampler (DPM-Solver++ singlestep order 3, 50 steps). A plan "N:first" makes the last
step first order (`sampler.lower_order_final_below=15`), "N:second" keeps it second order
(`lower_order_final=False`); a bare N follows the official rule (lower orders at the end below 10 steps only).
Columns: RMS pixel difference to the reference images (grey levels, 0-255), the mean distance to them in the
base run's real-only classifier's features (the encoder FD is measured on), and the mean feature norm.
"""

import argparse

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="a finished `busgen-jax experiment --config ...:cpu` workdir")
  p.add_argument("--plans", default="8,9,9:second,10,10:first,11,12")
  p.add_argument("--images", type=int, default=48)
  a = p.parse_args()

  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from flax import nnx

  from busgen_jax.data import pipeline
  from busgen_jax.diffusion import objectives, samplers, schedule
  from busgen_jax.evaluate import encoder as encoder_lib
  from busgen_jax.models import card, unet

  model = card.load(f"{a.base}/diffusion/checkpoints")
  sched = schedule.Schedule.from_config(ml_collections.ConfigDict(model.train_config["schedule"]))
  prediction = model.train_config["objective"]["prediction"]
  data = f"{a.base}/data/busbra/1.0.0"
  pipe = pipeline.build_eval(data, "train", image_size=model.image_size, batch_size=a.images, process_index=0,
                             process_count=1, device_vocab=tuple(model.vocab.get("device", ())))
  b = pipe.batches[0]
  cond = {k: jnp.asarray(b[k][b["valid"]]) for k in model.cfg.conditions}
  n = int(b["valid"].sum())
  net = nnx.merge(nnx.graphdef(unet.abstract(model.cfg)), model.params)
  eps = lambda x, t, c: objectives.eps_from_prediction(net(x, t, c), x, t, sched, prediction)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(n))
  shape = (model.image_size, model.image_size, 3)

  def images(**plan_kw):
    plan = samplers.make_plan(sched.betas, **plan_kw)
    f = jax.jit(lambda k, c: samplers.sample_from_keys(plan, eps, k, shape, cond=c, guidance_scale=2.8))
    return np.asarray(f(keys, cond))

  enc = encoder_lib.ClassifierEncoder(f"{a.base}/classify/real/best")

  def features(x):
    x = np.round((x + 1) * 127.5).clip(0, 255) / 127.5 - 1     # as a generated dataset stores them (8-bit)
    return enc.encode(x)[0]

  ref = images(method="singlestep", order=3, steps=50)
  f_ref = features(ref)
  lines = [f"Command: `python docs/experiments/last_step_probe.py --base {a.base} --plans \"{a.plans}\" "
           f"--images {a.images}` ({n} images)", "",
           "| DPM-Solver++ 2M plan | RMS pixel difference to the official sampler | feature distance to it | "
           "feature norm |", "|---|---|---|---|",
           f"| official sampler (3S, 50 steps) | 0 | 0 | {np.linalg.norm(f_ref, axis=1).mean():.3f} |"]
  for spec in a.plans.split(","):
    steps, _, last = spec.partition(":")
    kw = {"method": "multistep", "order": 2, "steps": int(steps)}
    if last == "first":
      kw["lower_order_final_below"] = 15
    elif last == "second":
      kw["lower_order_final"] = False
    elif last:
      raise ValueError(f"--plans: {spec!r}: expected N, N:first or N:second")
    x = images(**kw)
    f = features(x)
    label = {"": "official rule", "first": "last step first order", "second": "last step second order"}[last]
    lines.append(f"| {steps} steps, {label} | {np.sqrt((((x - ref) * 127.5) ** 2).mean()):.2f} | "
                 f"{np.linalg.norm(f - f_ref, axis=1).mean():.3f} | {np.linalg.norm(f, axis=1).mean():.3f} |")
    print(lines[-1], flush=True)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
