"""Training objectives: forward noising, eps / v prediction, SNR weighting, classifier-free label dropout."""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from busgen_jax.diffusion.schedule import Schedule

CONDITION_KEYS = ("pathology", "device", "box", "mask")


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.prediction = "eps"        # "eps" (official) | "v"
  c.weighting = "none"        # "none" (official) | "min_snr"
  c.min_snr_gamma = 5.0
  c.cond_drop_prob = 0.1      # classifier-free guidance: probability of nulling the conditions
  c.cond_drop_mode = "batch"  # "batch" (official: the whole batch at once) | "example"
  # Offset noise (Guttenberg 2023): training noise plus this scale times one N(0, 1) draw per image and channel.
  # The schedule's last step keeps sqrt(ab_T) of the image, so without it the noisiest input still carries the
  # image's mean, which sampling from pure noise cannot supply: samples regress to mid-grey. 0: official.
  c.offset_noise = 0.0
  # Experimental. Weight of each image's per-channel mean (its DC) in the loss, in units of its pixel count: 0
  # official, 1 makes the DC's error weigh as much as all the other frequencies together. Per pixel, eps's mean has
  # variance 1/(H W): an eps network barely learns it, yet an error d in it moves x0's brightness by
  # d sigma_t / alpha_t (34x at the official schedule's last step), so generated brightness spreads too widely
  # (docs/EXPERIMENTS.md, "The brightness spread"). At 1 it over-corrects (every image mid-grey after 400 steps);
  # v prediction is the measured remedy there.
  c.mean_weight = 0.0
  return c


def drop_conditions(cond: Mapping[str, jax.Array], key: jax.Array, prob: float, mode: str = "batch") -> dict:
  """Null the conditions (label 0, empty box/mask channels) with probability `prob`, for the whole batch at
  once ("batch", as the official code does) or independently per example ("example")."""
  if mode not in ("batch", "example"):
    raise ValueError(f"cond_drop_mode must be batch or example, got {mode!r}")
  B = next(iter(cond.values())).shape[0]
  drop = jax.random.uniform(key, (1 if mode == "batch" else B,)) < prob
  out = {}
  for k, v in cond.items():
    keep = jnp.broadcast_to(~drop, (B,)).reshape((B,) + (1,) * (v.ndim - 1))
    out[k] = jnp.where(keep, v, jnp.zeros_like(v))
  return out


def diffusion_loss(eps_fn, x0: jax.Array, cond: Mapping[str, jax.Array], key: jax.Array, sched: Schedule,
                   c: ml_collections.ConfigDict) -> jax.Array:
  """Mean loss over the batch: t ~ U{0..T-1}, x_t = sqrt(ab) x0 + sqrt(1-ab) eps, regress eps (or v); eps has
  a per-image offset when `c.offset_noise`."""
  kt, kn = jax.random.split(key)
  t = jax.random.randint(kt, (x0.shape[0],), 0, sched.T)
  noise = jax.random.normal(kn, x0.shape, jnp.float32)
  if c.get("offset_noise", 0.0):   # its own key, folded in: runs without it keep their noise draws
    ko = jax.random.fold_in(kn, 1)
    noise = noise + c.offset_noise * jax.random.normal(ko, (x0.shape[0], 1, 1, x0.shape[-1]), jnp.float32)
  return jnp.mean(per_example_loss(eps_fn, x0, cond, t, noise, sched, c))


def per_example_loss(eps_fn, x0: jax.Array, cond: Mapping[str, jax.Array], t: jax.Array, noise: jax.Array,
                     sched: Schedule, c: ml_collections.ConfigDict) -> jax.Array:
  """(B,) weighted losses at given timesteps and noise (validation uses fixed ones, so evaluations compare)."""
  a = jnp.asarray(sched.sqrt_ab, jnp.float32)[t][:, None, None, None]
  s = jnp.asarray(sched.sqrt_1m_ab, jnp.float32)[t][:, None, None, None]
  xt = a * x0 + s * noise
  pred = eps_fn(xt, t, cond)
  if c.prediction == "eps":
    target = noise
  elif c.prediction == "v":
    target = a * noise - s * x0
  else:
    raise ValueError(f"objective.prediction must be eps or v, got {c.prediction!r}")
  err = pred.astype(jnp.float32) - target
  per_example = jnp.mean(jnp.square(err), axis=(1, 2, 3))
  if c.get("mean_weight", 0.0):
    dc = jnp.mean(err, axis=(1, 2))   # (B, C)
    per_example = per_example + c.mean_weight * (err.shape[1] * err.shape[2]) * jnp.mean(jnp.square(dc), axis=-1)
  snr = jnp.asarray(sched.snr, jnp.float32)[t]
  if c.weighting == "min_snr":   # Hang et al. 2023: min(SNR, gamma) / SNR for eps, / (SNR + 1) for v
    w = jnp.minimum(snr, c.min_snr_gamma) / (snr if c.prediction == "eps" else snr + 1)
  elif c.weighting == "none":
    w = jnp.ones_like(snr)
  else:
    raise ValueError(f"objective.weighting must be none or min_snr, got {c.weighting!r}")
  return w * per_example


def eps_from_prediction(pred: jax.Array, xt: jax.Array, t: jax.Array, sched: Schedule, prediction: str):
  """A model output (eps or v) as an eps prediction, for the samplers."""
  if prediction == "eps":
    return pred
  a = jnp.asarray(sched.sqrt_ab, jnp.float32)[t][:, None, None, None]
  s = jnp.asarray(sched.sqrt_1m_ab, jnp.float32)[t][:, None, None, None]
  return s * xt + a * pred   # v = a eps - s x0, x_t = a x0 + s eps  =>  eps = s x_t + a v
