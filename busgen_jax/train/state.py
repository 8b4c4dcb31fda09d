"""Optimizer (optax), EMA, and the train state: a plain pytree {step, params, ema, opt_state, rng}."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.lr = 2e-4
  c.warmup_steps = 100
  c.schedule = "cosine"       # "cosine" (warm-up then cosine decay, official) | "constant" (after warm-up)
  c.end_lr_fraction = 0.0
  c.b1 = 0.9
  c.b2 = 0.999
  c.weight_decay = 1e-4
  c.grad_clip = 1.0           # global-norm clipping (0: off)
  c.ema_decay = 0.9999
  # With warm-up the decay is min(ema_decay, (1 + step) / (10 + step)): early EMA tracks the params, and a run of N
  # steps never averages longer than (N + 1) / (N + 10) (0.9936 at 1,400): a larger ema_decay changes nothing there.
  c.ema_warmup = True
  return c


def learning_rate(c: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  if c.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, c.lr, max(c.warmup_steps, 1), max(total_steps, c.warmup_steps + 1),
                                              end_value=c.lr * c.end_lr_fraction)
  if c.schedule == "constant":
    return optax.join_schedules([optax.linear_schedule(0.0, c.lr, max(c.warmup_steps, 1)),
                                 optax.constant_schedule(c.lr)], [max(c.warmup_steps, 1)])
  raise ValueError(f"optim.schedule must be cosine or constant, got {c.schedule!r}")


def optimizer(c: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  chain = [optax.clip_by_global_norm(c.grad_clip)] if c.grad_clip else []
  chain.append(optax.adamw(learning_rate(c, total_steps), b1=c.b1, b2=c.b2, weight_decay=c.weight_decay))
  return optax.chain(*chain)


def ema_decay_at(c: ml_collections.ConfigDict, step, xp=jnp):
  """The EMA's decay at `step` (the warm-up's cap applied): what the run actually averages with."""
  decay = xp.asarray(c.ema_decay, xp.float32)
  if c.ema_warmup:
    s = xp.asarray(step).astype(xp.float32)
    decay = xp.minimum(decay, (1.0 + s) / (10.0 + s))
  return decay


def ema_update(ema, params, step, c: ml_collections.ConfigDict):
  decay = ema_decay_at(c, step)
  return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


def init_state(params, tx: optax.GradientTransformation, seed: int) -> dict:
  return {"step": jnp.zeros((), jnp.int32), "params": params, "ema": jax.tree.map(jnp.copy, params),
          "opt_state": tx.init(params), "rng": jax.random.PRNGKey(seed)}
