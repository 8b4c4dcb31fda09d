"""The optimizer's share of a train step on XLA:CPU: gradient clipping, AdamW and the EMA over the official model's
47.8 M parameters, with busgen-jax's clipping (torch's formula, the step's gradient norm passed in) against
optax.clip_by_global_norm (a second norm inside the update and a materialised g / norm).

  python docs/experiments/update_step.py
  python docs/experiments/update_step.py --rounds 30 --case experiment_cpu_64px

Both run diffusion.make_update_step (the non-finite guard's branch, AdamW, the EMA) around a loss whose gradient
is a fixed random tree (sum of p * g: no network), compiled once each with the state donated, 3 steps a round in
alternating rounds: the median round of each, the median of the per-round ratios, and the number of fusions in
each compiled program.
"""

import argparse
import statistics
import time

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--case", default="official_64px", help="a `busgen-jax bench` case: its model")
  p.add_argument("--rounds", type=int, default=20)
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from flax import nnx
  from busgen_jax.models import unet
  from busgen_jax.stages import bench
  from busgen_jax.train import diffusion, state as train_state

  cfg = bench._config(dict(bench.default_config().cases[args.case]))
  params = nnx.to_pure_dict(nnx.state(unet.create(cfg.model, 0), nnx.Param))
  rng = np.random.default_rng(0)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape, dtype=np.float32)), params)
  loss_fn = lambda p, g, key, frozen: sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(g)))
  c = cfg.optim
  forms = {"busgen-jax": train_state.optimizer(c, cfg.num_steps),
           "optax clip": optax.chain(optax.clip_by_global_norm(c.grad_clip), optax.adamw(
               train_state.learning_rate(c, cfg.num_steps), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))}
  steps, states = {}, {}
  for name, tx in forms.items():
    state = train_state.init_state(jax.tree.map(jnp.copy, params), tx, 0)
    steps[name] = jax.jit(diffusion.make_update_step(loss_fn, cfg, tx), donate_argnums=0).lower(state, grads).compile()
    states[name], _ = steps[name](state, grads)
  times = {name: [] for name in forms}
  for _ in range(args.rounds):
    for name, step in steps.items():
      t = time.perf_counter()
      for _ in range(3):
        states[name], _ = step(states[name], grads)
      jax.block_until_ready(states[name])
      times[name].append((time.perf_counter() - t) / 3)
  (a, ta), (b, tb) = times.items()
  print(f"{args.case}: {unet.num_params(params) / 1e6:.1f} M parameters; matmul peak "
        f"{bench._matmul_peak(jnp.float32) / 1e9:.0f} GFLOP/s; {args.rounds} rounds")
  for name, ts in times.items():
    print(f"  {name}: {statistics.median(ts) * 1e3:.1f} ms per step (median round), "
          f"{steps[name].as_text().count(' fusion(')} fusions")
  print(f"  {b} / {a} per round: median {statistics.median(y / x for x, y in zip(ta, tb)):.2f}x")


if __name__ == "__main__":
  main()
