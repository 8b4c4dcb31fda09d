"""Distillation targets (math only): a teacher's guided prediction, and two of its DDIM steps as one.

`teacher(z, t, cond, w)` is the teacher's noise prediction at per-example guidance scales w (B,): its conditional
and unconditional halves in one batch (an ordinary model), or one evaluation with w as an input (a guidance
student). Students take w as an input (cond["guidance"]).

  guidance     Meng et al. 2023 ("On distillation of guided diffusion models", stage one): the student's
               eps(z_t, c, w) regresses eps_u + w (eps_c - eps_u) at t ~ U{0..T-1}, w ~ U(range).
  progressive  Salimans & Ho 2022: at a point t_i of the student's DDIM grid (every other point of the
               teacher's), the teacher takes two DDIM steps t_i -> t_mid -> t_{i+1}; the student's target x0 is the
               one whose single DDIM step lands where those two did; loss max(SNR, 1) |x0_pred - target|^2 (their
               "truncated SNR" weighting).
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from busgen_jax.diffusion.schedule import Schedule


def guided_teacher(eps_fn: Callable, takes_guidance: bool) -> Callable:
  """teacher(z, t, cond, w) from a model's eps_fn(z, t, cond); the null condition is every condition zero."""
  if takes_guidance:
    return lambda z, t, cond, w: eps_fn(z, t, {**cond, "guidance": w})

  def teacher(z, t, cond, w):
    both = {k: jnp.concatenate([v, jnp.zeros_like(v)]) for k, v in cond.items()}
    ec, eu = jnp.split(eps_fn(jnp.concatenate([z, z]), jnp.concatenate([t, t]), both), 2)
    return eu + w.reshape((-1,) + (1,) * (z.ndim - 1)) * (ec - eu)

  return teacher


def _draws(key, x0, w_range):
  kt, kn, kw = jax.random.split(key, 3)
  noise = jax.random.normal(kn, x0.shape, jnp.float32)
  w = jax.random.uniform(kw, (x0.shape[0],), jnp.float32, *w_range)
  return kt, noise, w


def _bcast(v, x):
  return v.reshape((-1,) + (1,) * (x.ndim - 1))


def guidance_loss(student: Callable, teacher: Callable, x0: jax.Array, cond: Mapping[str, jax.Array],
                  key: jax.Array, sched: Schedule, w_range: tuple[float, float]) -> jax.Array:
  """Mean squared error between the student's eps(z_t, c, w) and the teacher's guided eps."""
  kt, noise, w = _draws(key, x0, w_range)
  t = jax.random.randint(kt, (x0.shape[0],), 0, sched.T)
  z = _bcast(jnp.asarray(sched.sqrt_ab, jnp.float32)[t], x0) * x0 + _bcast(
      jnp.asarray(sched.sqrt_1m_ab, jnp.float32)[t], x0) * noise
  target = jax.lax.stop_gradient(teacher(z, t, cond, w))
  return jnp.mean(jnp.square(student(z, t, {**cond, "guidance": w}) - target))


def student_grid(teacher_grid) -> np.ndarray:
  """Every other point of an even-length, strictly decreasing teacher DDIM grid (ending at 0)."""
  g = np.asarray(teacher_grid, np.int32)
  if len(g) < 2 or len(g) % 2 or g[-1] != 0 or np.any(np.diff(g) >= 0):
    raise ValueError(f"progressive distillation needs an even number (>= 2) of decreasing teacher steps ending at "
                     f"t=0, got {g.tolist()}")
  return g[0::2]


def ddim_step(z, eps, a_t, s_t, a_n, s_n):
  """z_t -> z_n along the deterministic DDIM path (a_n = 1, s_n = 0: the x0 prediction)."""
  x0 = (z - s_t * eps) / a_t
  return a_n * x0 + s_n * eps


def two_step_target(teacher: Callable, z, tab, cond, w, A, S):
  """The x0 whose single DDIM step t -> t_next from z lands where the teacher's two (t -> t_mid -> t_next) do.
  tab (B, 3): the timesteps; A, S: their alpha and sigma, broadcast like z."""
  z_mid = ddim_step(z, teacher(z, tab[:, 0], cond, w), A[0], S[0], A[1], S[1])
  z_next = ddim_step(z_mid, teacher(z_mid, tab[:, 1], cond, w), A[1], S[1], A[2], S[2])
  ratio = S[2] / S[0]
  return (z_next - ratio * z) / (A[2] - ratio * A[0])


def progressive_loss(student: Callable, teacher: Callable, x0: jax.Array, cond: Mapping[str, jax.Array],
                     key: jax.Array, sched: Schedule, w_range: tuple[float, float], teacher_grid) -> jax.Array:
  """Salimans & Ho's loss for one round: the student halves `teacher_grid` (the teacher's DDIM timesteps)."""
  tg = np.asarray(teacher_grid, np.int32)
  student_grid(tg)   # checks the grid
  # Per student step i: timesteps (t, t_mid, t_next) and their alpha, sigma (t_next past the end: x0 itself).
  a = np.concatenate([sched.sqrt_ab, [1.0]])
  s = np.concatenate([sched.sqrt_1m_ab, [0.0]])
  ext = np.concatenate([tg, [-1]])                       # index -1 -> the appended alpha 1, sigma 0
  idx = np.stack([ext[0:-1:2], ext[1::2], ext[2::2]], 1)  # (N, 3)
  kt, noise, w = _draws(key, x0, w_range)
  i = jax.random.randint(kt, (x0.shape[0],), 0, len(idx))
  tab = jnp.asarray(idx, jnp.int32)[i]                    # (B, 3)
  al = jnp.asarray(a, jnp.float32)[tab]                   # -1 indexes the appended entry
  sg = jnp.asarray(s, jnp.float32)[tab]
  A = [_bcast(al[:, k], x0) for k in range(3)]
  S = [_bcast(sg[:, k], x0) for k in range(3)]
  z = A[0] * x0 + S[0] * noise
  target = jax.lax.stop_gradient(two_step_target(teacher, z, tab, cond, w, A, S))
  x_pred = (z - S[0] * student(z, tab[:, 0], {**cond, "guidance": w})) / A[0]
  weight = jnp.maximum(jnp.square(al[:, 0] / sg[:, 0]), 1.0)
  return jnp.mean(weight * jnp.mean(jnp.square(x_pred - target), axis=(1, 2, 3)))


LOSSES = {"guidance": guidance_loss, "progressive": progressive_loss}
