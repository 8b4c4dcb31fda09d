"""Samplers as pure JAX functions of a noise-prediction function `eps_fn(x, t_index, cond)`, with
classifier-free guidance in one batched call (optionally only in an interval of noise levels).

A sampler is a plan (diffusion/plans.py: DDPM, DDIM, DPM-Solver / DPM-Solver++ as float64 tables of model
evaluations computed on the host) run here by one `lax.scan`, one model evaluation per iteration: a 50-step
sampler compiles the network once, and samplers differ only in their tables.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from busgen_jax.diffusion.plans import (  # noqa: F401  (plans are part of the sampling API)
    K, OFFICIAL_LOWER_ORDER_FINAL_BELOW, SKIP_TYPES, Plan, VPSchedule, ddim_grid, ddim_plan, ddpm_plan,
    dpm_solver_plan)


def guided(eps_fn: Callable, cond, uncond, scale: float) -> Callable:
  """eps(x, t) = eps_u + scale * (eps_c - eps_u) (official: scale = w + 1), one batched call."""
  if uncond is None or scale == 1.0:
    return lambda x, t: eps_fn(x, t, cond)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), cond, uncond)

  def eps(x, t):
    e = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    ec, eu = jnp.split(e, 2)
    return eu + scale * (ec - eu)

  return eps



# ------------------------------------------------------------------------------------------------ running a plan

def guided_rows(plan: Plan, interval=()) -> np.ndarray:
  """(J,) bool: the evaluations that get classifier-free guidance. interval (low, high): only where
  low < sigma_t / alpha_t <= high, the noise level in EDM's units (Kynkäänniemi et al. 2024, "Applying guidance in
  a limited interval"); elsewhere the conditional prediction alone, one network evaluation instead of two.
  () guides every evaluation (official)."""
  if not interval:
    return np.ones(plan.num_evals, bool)
  low, high = (float(v) for v in interval)
  if not 0 <= low < high:
    raise ValueError(f"guidance_interval must be (low, high) with 0 <= low < high, got {tuple(interval)}")
  level = plan.sigma / plan.alpha
  return (level > low) & (level <= high)


def network_evals(plan: Plan, guidance_scale: float, interval=()) -> int:
  """Network evaluations per image: two where guidance applies (conditional and unconditional), else one."""
  if guidance_scale == 1.0:
    return plan.num_evals
  return int(plan.num_evals + guided_rows(plan, interval).sum())


def run(plan: Plan, eps_fn: Callable, x_T: jax.Array, *, cond=None, uncond=None, guidance_scale: float = 1.0,
        keys: jax.Array | None = None, clip_x0: float | None = None, eps_transform: Callable | None = None,
        guidance_interval=()) -> jax.Array:
  """Runs a plan: `eps_fn(x, t_index, cond)` on batches of x_T (any layout; batch first).

  keys: one PRNG key per example for ancestral noise (noise of example b at evaluation j comes from
  fold_in(keys[b], j), so it does not depend on how the batch is split across devices). clip_x0 clips the
  x0 predictions of x0 plans to [-clip_x0, clip_x0]. eps_transform wraps the guided prediction eps(x, t) (e.g.
  diffusion/protect.py's privacy protection). guidance_interval: see guided_rows; the plan then runs as one scan
  per contiguous run of guided or unguided evaluations (the unguided ones on the single batch)."""
  guide = uncond is not None and guidance_scale != 1.0
  eps_fns = {}
  for g in (True, False):
    e = guided(eps_fn, cond, uncond, guidance_scale if g and guide else 1.0)
    eps_fns[g] = e if eps_transform is None else eps_transform(e)
  dt = x_T.dtype
  B = x_T.shape[0]
  tab = {k: jnp.asarray(getattr(plan, k), dt) for k in ("alpha", "sigma", "in_x", "in_m", "out_x", "out_m", "noise")}
  tab["t"] = jnp.asarray(plan.t_index, jnp.int32)
  tab["j"] = jnp.arange(plan.num_evals, dtype=jnp.uint32)
  noisy = bool(np.any(plan.noise))
  if noisy and keys is None:
    raise ValueError("this sampler is stochastic: pass keys (one PRNG key per example)")
  x0_plan = plan.predict == "x0"
  comb = lambda c, buf: jnp.tensordot(c, buf, axes=1)

  def body(eps_g):
    def step(carry, r):
      x, buf = carry
      x_in = r["in_x"] * x + comb(r["in_m"], buf)
      eps = eps_g(x_in, jnp.full((B,), r["t"], jnp.int32)).astype(dt)
      m = (x_in - r["sigma"] * eps) / r["alpha"] if x0_plan else eps
      if x0_plan and clip_x0 is not None:
        m = jnp.clip(m, -clip_x0, clip_x0)
      buf = jnp.concatenate([buf[1:], m[None]])
      x = r["out_x"] * x + comb(r["out_m"], buf)
      if noisy:
        z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, r["j"]), x.shape[1:], dt))(keys)
        x = x + r["noise"] * z
      return (x, buf), None
    return step

  rows = guided_rows(plan, guidance_interval) if guide else np.zeros(plan.num_evals, bool)
  cuts = [0, *(np.flatnonzero(np.diff(rows)) + 1).tolist(), plan.num_evals]
  carry = (x_T, jnp.zeros((K, *x_T.shape), dt))
  for a, b in zip(cuts[:-1], cuts[1:]):
    carry, _ = jax.lax.scan(body(eps_fns[bool(rows[a])]), carry, jax.tree.map(lambda v: v[a:b], tab))
  return carry[0]


def sample_from_keys(plan: Plan, eps_fn: Callable, keys: jax.Array, image_shape: tuple[int, ...], *, cond,
                     guidance_scale: float, clip_x0: float | None = None, eps_transform: Callable | None = None,
                     start: jax.Array | None = None, guidance_interval=()) -> jax.Array:
  """Images from one PRNG key per example: its x_T and its ancestral noise come from its own key, and
  guidance is against the null condition (every condition zero), so an image does not depend on the batch
  it is sampled in.

  start: (B, 2) per example, the (mean, std) of the training images' mean grey level. x_T then has the forward
  process's own image mean, alpha_T * m with m ~ N(mean, std): at T the schedule keeps alpha_T of the image
  (0.029 for the official one), and a trained model reads the image mean out of x_T, so pure noise (mean 0)
  asks it for mid-grey images. None (or zeros): pure noise, as the official sampler."""
  x_T = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0x7FFFFFFF), image_shape))(keys)
  if start is not None:
    z = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, 0x7FFFFFFE), ()))(keys)
    m = start[:, 0] + start[:, 1] * z
    x_T = x_T + (float(plan.alpha[0]) * m).reshape((-1,) + (1,) * len(image_shape)).astype(x_T.dtype)
  uncond = jax.tree.map(jnp.zeros_like, cond)
  return run(plan, eps_fn, x_T, cond=cond, uncond=uncond, guidance_scale=guidance_scale, keys=keys,
             clip_x0=clip_x0, eps_transform=eps_transform, guidance_interval=guidance_interval)


ALGORITHMS = ("dpmsolver++", "dpmsolver", "ddim", "ddpm")


def make_plan(betas, *, algorithm: str = "dpmsolver++", method: str = "singlestep", order: int = 3,
              steps: int | None = None, skip_type: str = "time_uniform", lower_order_final: bool = True,
              eta: float = 0.0, grid=(), lower_order_final_below: int = OFFICIAL_LOWER_ORDER_FINAL_BELOW) -> Plan:
  """The plan of any sampler by name (official defaults: DPM-Solver++ single-step order 3, 50 steps).
  steps=None: 50, or every timestep for DDPM. method, order, skip_type, lower_order_final and
  lower_order_final_below are DPM-Solver's; eta and grid (explicit timesteps) are DDIM's."""
  if steps is None or steps <= 0:
    steps = len(betas) if algorithm == "ddpm" else 50
  if algorithm in ("dpmsolver", "dpmsolver++"):
    return dpm_solver_plan(betas, steps=steps, order=order, skip_type=skip_type, method=method,
                           algorithm=algorithm, lower_order_final=lower_order_final,
                           lower_order_final_below=lower_order_final_below)
  if algorithm == "ddim":
    return ddim_plan(betas, steps=steps, eta=eta, grid=grid)
  if algorithm == "ddpm":
    return ddpm_plan(betas, steps=steps)
  raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")


def default_config():
  import ml_collections
  c = ml_collections.ConfigDict()
  c.algorithm = "dpmsolver++"   # dpmsolver++ | dpmsolver | ddim | ddpm
  c.method = "singlestep"       # singlestep | multistep | singlestep_fixed (DPM-Solver)
  c.order = 3
  c.steps = 50                  # 0: every timestep (DDPM)
  c.skip_type = "time_uniform"  # time_uniform | logSNR | time_quadratic
  c.lower_order_final = True
  # Multistep plans of fewer steps than this end with lower orders: 10 in the official code. 15 (the official
  # docstring's and diffusers' value) makes a 10-step plan's last step first order (docs/SAMPLING.md).
  c.lower_order_final_below = OFFICIAL_LOWER_ORDER_FINAL_BELOW
  c.eta = 0.0                   # DDIM
  c.grid = ()                   # DDIM: explicit decreasing timesteps (a progressive student's card sets them)
  c.guidance_scale = 2.8        # official: w + 1 = 2.8
  # (low, high): guidance only where low < sigma_t / alpha_t <= high, elsewhere the conditional prediction alone
  # (one network evaluation, not two; Kynkäänniemi et al. 2024). (): every step (official).
  c.guidance_interval = ()
  c.clip_x0 = 0.0               # > 0: clip x0 predictions to [-clip_x0, clip_x0] (x0 plans)
  # "data": x_T carries the training images' mean grey level as the forward process does (alpha_T * m, m from
  # the model card's image_mean; sample_from_keys). "noise": pure noise (official). Cards without image_mean
  # (official imports) start from pure noise either way.
  c.start = "data"
  # A distilled student (busgen-jax distill): "card" samples with the plan its card names (the steps it was
  # distilled for, one evaluation each, the guidance scale as an input); "config" with this config's plan.
  c.student_plan = "card"
  return c


PLAN_KEYS = ("algorithm", "method", "order", "steps", "skip_type", "lower_order_final", "lower_order_final_below",
             "eta", "grid")


def describe(c) -> str:
  """A sampler config in words, for reports (e.g. "DPM-Solver++ multistep order 2, 8 steps, guidance 2.8 where
  0.3 < sigma/alpha <= 3")."""
  names = {"dpmsolver++": "DPM-Solver++", "dpmsolver": "DPM-Solver", "ddim": "DDIM", "ddpm": "DDPM"}
  solver = names.get(c.algorithm, c.algorithm)
  if c.algorithm in ("dpmsolver++", "dpmsolver"):
    solver += f" {c.method} order {c.order}"
  text = f"{solver}, {c.steps or 'every'} steps"
  if c.guidance_scale == 1.0:
    return text + ", unguided"
  text += f", guidance {c.guidance_scale:g}"
  if tuple(c.guidance_interval):
    lo, hi = c.guidance_interval
    text += f" where {lo:g} < sigma/alpha <= {hi:g}"
  return text


def for_student(c, student: dict | None):
  """The sampler config a model samples with: a distilled student's card (`student["sampler"]`, PLAN_KEYS) replaces
  the plan unless c.student_plan == "config"; the guidance scale stays the config's. Idempotent."""
  import ml_collections
  if not student:
    return c
  mode = c.get("student_plan", "card")
  if mode not in ("card", "config"):
    raise ValueError(f"sampler.student_plan must be 'card' or 'config', got {mode!r}")
  out = ml_collections.ConfigDict(c.to_dict())
  if mode == "card":
    for k, v in student["sampler"].items():
      out[k] = tuple(v) if isinstance(v, list) else v
  return out


def with_guidance_input(eps_fn: Callable, scale) -> Callable:
  """A guidance-distilled student's eps(x, t, cond) at guidance `scale`: one evaluation, the scale an input."""
  def eps(x, t, cond):
    return eps_fn(x, t, {**cond, "guidance": jnp.full((x.shape[0],), scale, jnp.float32)})
  return eps


def plan_from_config(betas, c) -> Plan:
  return make_plan(betas, algorithm=c.algorithm, method=c.method, order=c.order, steps=c.steps,
                   skip_type=c.skip_type, lower_order_final=c.lower_order_final, eta=c.eta,
                   grid=tuple(c.get("grid", ())),
                   lower_order_final_below=c.get("lower_order_final_below", OFFICIAL_LOWER_ORDER_FINAL_BELOW))


def sample_with_eps_fn(eps_fn: Callable, x_T: jax.Array, *, betas, cond=None, uncond=None,
                       guidance_scale: float = 1.0, algorithm: str = "dpmsolver++", method: str = "singlestep",
                       order: int = 3, steps: int | None = None, skip_type: str = "time_uniform",
                       lower_order_final: bool = True, eta: float = 0.0, keys: jax.Array | None = None,
                       clip_x0: float | None = None) -> jax.Array:
  """Samples x_0 from x_T with any noise-prediction function `eps_fn(x, t_index, cond) -> eps`.

  Option names are the official DPM-Solver's (algorithm "dpmsolver"/"dpmsolver++", method "singlestep"/
  "multistep", skip_type "time_uniform"/"logSNR"/"time_quadratic"); "ddim" and "ddpm" are accepted too.
  Continuous times map to the network's integer index as floor((t - 1/N) * N). cond/uncond are pytrees
  batched like x_T; guidance evaluates both in one batch: eps_u + guidance_scale * (eps_c - eps_u).
  Works under jax.jit and with sharded inputs; float64 when x_T is float64 (jax.enable_x64)."""
  plan = make_plan(betas, algorithm=algorithm, method=method, order=order, steps=steps, skip_type=skip_type,
                   lower_order_final=lower_order_final, eta=eta)
  return run(plan, eps_fn, x_T, cond=cond, uncond=uncond, guidance_scale=guidance_scale, keys=keys,
             clip_x0=clip_x0)
