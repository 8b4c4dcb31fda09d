"""Privacy-protected sampling: steer samples away from training images while they are being generated.

In the spirit of classifier-protected sampling: a term from a model that recognises training members guides each
solver step. The recogniser is nearest-neighbour distance in a low-resolution, gain- and offset-normalised pixel
space (the audit's coarse descriptors, evaluate/privacy.py), against a bank of training images and their mirror
images. Its radius is calibrated as the audit calibrates its thresholds, on new patients: by default it is the
`holdout_quantile` of the held-out split's own nearest-training distances, so a sample may come no closer to a
training image than all but that fraction of new patients do (the distance-to-closest-record test's criterion).
At every model evaluation the predicted clean image x0 = (x - s eps) / a is compared with the
bank; when it lies within `radius` of a member, the step moves x0 down the gradient of the hinge penalty
sum_i max(0, radius - d_i)^2, by an RMS pixel change of `scale` x (radius - d_1) / radius, which is folded back
into the noise prediction (eps' = eps + a / s x the x0 change). Outside the radius the penalty and its gradient
are exactly zero and eps is returned unchanged, so samples that never approach a training image come out bit for
bit as without protection. The UNet is not differentiated: only the descriptor is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from busgen_jax.diffusion.schedule import Schedule


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.bank = ""              # the training dataset directory ("" = no protection)
  c.split = "train"
  c.max_images = 0         # bank at most this many training images (0: all)
  c.resolution = 16        # descriptor size (the audit's coarse_resolution)
  c.radius = 0.0           # descriptor distance that counts as "too close"; 0: calibrate it on held-out patients
  c.holdout_split = "test"  # the bank dataset's split of patients not trained on (for radius 0)
  c.holdout_quantile = 0.1  # radius = this quantile of their nearest-training distances
  c.scale = 1.0            # RMS pixel change of x0 (in [-1, 1] units) per step at distance 0
  return c


def descriptors(images: jax.Array, resolution: int) -> jax.Array:
  """(B, H, W[, C]) images -> (B, r*r) zero-mean unit-norm descriptors of the channel mean, box-pooled to r x r."""
  x = images.mean(-1) if images.ndim == 4 else images
  B, H, W = x.shape
  if H % resolution or W % resolution:
    raise ValueError(f"image size {H}x{W} is not a multiple of protect.resolution={resolution}")
  x = x.reshape(B, resolution, H // resolution, resolution, W // resolution).mean((2, 4)).reshape(B, -1)
  x = x - x.mean(1, keepdims=True)
  return x / (jnp.linalg.norm(x, axis=1, keepdims=True) + 1e-6)


def bank(train: np.ndarray, c: ml_collections.ConfigDict, holdout: np.ndarray | None = None
         ) -> tuple[np.ndarray, float]:
  """(descriptors (2N, r*r) of the training images (N, r, r) and their mirror images, the radius): the config's
  radius, or with radius 0 the holdout_quantile of the held-out images' nearest-bank distances."""
  train = np.asarray(descriptors(jnp.asarray(train, jnp.float32), c.resolution), np.float32)
  r = c.resolution
  mirror = train.reshape(-1, r, r)[:, :, ::-1].reshape(len(train), -1)
  members = np.concatenate([train, mirror])
  if c.radius > 0:
    return members, float(c.radius)
  if holdout is None or not len(holdout):
    raise ValueError("protect.radius=0 calibrates on held-out patients; name a split of patients not trained on "
                     "with protect.holdout_split, or give protect.radius")
  held = descriptors(jnp.asarray(holdout, jnp.float32), c.resolution)
  return members, float(np.quantile(_nearest_distance(held, members), c.holdout_quantile))


def _nearest_distance(q: jax.Array, bank: jax.Array) -> jax.Array:
  """(B,) distance of unit descriptors to their nearest bank member."""
  return jnp.sqrt(jnp.maximum(2 - 2 * jnp.max(q @ bank.T, axis=1), 0.0))


def nearest(x0: jax.Array, bank: jax.Array, resolution: int) -> jax.Array:
  """(B,) descriptor distance of each image to its nearest bank member."""
  return _nearest_distance(descriptors(x0, resolution), bank)


def protected(eps_fn, bank: jax.Array, sched: Schedule, *, radius, scale: float, resolution: int):
  """eps_fn(x, t) (the guided prediction a sampler steps with) -> the same with the protection term (radius may
  be traced: one compilation serves every calibration)."""
  sqrt_ab, sqrt_1m_ab = (jnp.asarray(a, jnp.float32) for a in (sched.sqrt_ab, sched.sqrt_1m_ab))

  def penalty(x0):
    q = descriptors(x0, resolution)
    d = jnp.sqrt(jnp.maximum(2 - 2 * q @ bank.T, 1e-12))
    return jnp.sum(jnp.square(jax.nn.relu(radius - d)))

  def eps(x, t):
    e = eps_fn(x, t)
    a = sqrt_ab[t].reshape((-1,) + (1,) * (x.ndim - 1))
    s = sqrt_1m_ab[t].reshape((-1,) + (1,) * (x.ndim - 1))
    x0 = jax.lax.stop_gradient((x - s * e) / a)
    g = jax.grad(penalty)(x0)                        # rows are independent: the sum's gradient is per image
    d1 = nearest(x0, bank, resolution)
    active = (d1 < radius).reshape(a.shape)
    rms = jnp.sqrt(jnp.mean(jnp.square(g), axis=tuple(range(1, x.ndim)), keepdims=True))
    step = scale * ((radius - d1) / radius).reshape(a.shape) * g / jnp.where(active, rms, 1.0)
    return jnp.where(active, e + (a / s) * step.astype(e.dtype), e)

  return eps
