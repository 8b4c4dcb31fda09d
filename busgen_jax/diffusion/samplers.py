"""Samplers as pure functions of a noise-prediction function `eps_fn(x, t_index, cond)`.

DDIM (deterministic for eta=0, ancestral-like for eta=1) with classifier-free guidance; the conditional and
unconditional passes run as one batch. (The DPM-Solver family joins this module with issue 5.)
"""

from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from busgen_jax.diffusion.schedule import Schedule


def guided(eps_fn: Callable, cond: Mapping, uncond: Mapping | None, scale: float) -> Callable:
  """eps(x, t) = eps_u + scale * (eps_c - eps_u) (official: scale = w + 1), one batched call."""
  if uncond is None or scale == 1.0:
    return lambda x, t: eps_fn(x, t, cond)
  both = jax.tree.map(lambda c, u: jnp.concatenate([c, u]), dict(cond), dict(uncond))

  def eps(x, t):
    e = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both)
    ec, eu = jnp.split(e, 2)
    return eu + scale * (ec - eu)

  return eps


def ddim(eps_fn: Callable, x_T: jax.Array, sched: Schedule, *, steps: int, cond: Mapping,
         uncond: Mapping | None = None, guidance_scale: float = 1.0, eta: float = 0.0,
         key: jax.Array | None = None, clip: bool = True) -> jax.Array:
  """DDIM over `steps` evenly spaced integer timesteps (T-1 ... 0); returns x_0."""
  ts = np.linspace(sched.T - 1, 0, steps).round().astype(np.int32)
  prev = np.append(ts[1:], -1)
  ab = np.append(sched.alphas_cumprod, 1.0)  # index -1 -> alpha_bar = 1 (the clean image)
  tab = jnp.asarray(np.stack([ts, prev]), jnp.int32)
  a_t, a_p = jnp.asarray(ab[ts], jnp.float32), jnp.asarray(ab[prev], jnp.float32)
  eps_g = guided(eps_fn, cond, uncond, guidance_scale)
  key = jax.random.PRNGKey(0) if key is None else key
  B = x_T.shape[0]

  def body(i, carry):
    x, key = carry
    t = jnp.full((B,), tab[0, i])
    eps = eps_g(x, t)
    x0 = (x - jnp.sqrt(1 - a_t[i]) * eps) / jnp.sqrt(a_t[i])
    if clip:
      x0 = jnp.clip(x0, -1, 1)
      eps = (x - jnp.sqrt(a_t[i]) * x0) / jnp.sqrt(1 - a_t[i])
    sigma = eta * jnp.sqrt((1 - a_p[i]) / (1 - a_t[i]) * (1 - a_t[i] / a_p[i]))
    key, k = jax.random.split(key)
    noise = jax.random.normal(k, x.shape, x.dtype)
    x = jnp.sqrt(a_p[i]) * x0 + jnp.sqrt(jnp.maximum(1 - a_p[i] - sigma ** 2, 0)) * eps + sigma * noise
    return x, key

  x, _ = jax.lax.fori_loop(0, steps, body, (x_T, key))
  return x
