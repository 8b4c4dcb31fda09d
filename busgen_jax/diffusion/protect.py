"""Privacy-protected sampling: steer samples away from training images while they are being generated.

In the spirit of classifier-protected sampling: a term from a model that recognises training members guides each
solver step. The recogniser here is the audit's own: nearest-neighbour distance in a low-resolution, gain- and
offset-normalised pixel space (evaluate/privacy.py's coarse descriptors), against a bank of training images and
their mirror images. At every model evaluation the predicted clean image x0 = (x - s eps) / a is compared with the
bank; when it lies within `radius` of a member, the step moves x0 down the gradient of the hinge penalty
sum_i max(0, radius - d_i)^2, by an RMS pixel change of `scale` x (radius - d_1) / radius, which is folded back
into the noise prediction (eps' = eps + a / s x the x0 change). Outside the radius the penalty and its gradient
are exactly zero and eps is returned unchanged, so samples that never approach a training image come out bit for
bit as without protection. The UNet is not differentiated: only the descriptor is.
"""

from __future__ import annotations

from pathlib import Path

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
  c.radius = 0.35          # descriptor distance that counts as "too close" (new patients sit at ~0.6-0.9)
  c.scale = 0.5            # RMS pixel change of x0 (in [-1, 1] units) per step at distance 0
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


def load_bank(c: ml_collections.ConfigDict, seed: int = 0) -> np.ndarray:
  """Descriptors (2N, r*r) of the bank's training images and their mirror images, each a centre square crop
  (what generated images are)."""
  from busgen_jax.evaluate import privacy
  from busgen_jax.data import reader
  n = reader.open_dataset(c.bank).splits.get(c.split)
  if not n:
    raise ValueError(f"protect.bank={c.bank!r} has no images in split {c.split!r}")
  imgs = privacy.read_images(c.bank, c.split, privacy.subsample(n, c.max_images, seed))["images"]
  r = c.resolution
  side = [privacy._resize(privacy._square(im), r, r) for im in imgs]
  x = np.stack(side + [s[:, ::-1] for s in side])
  return np.asarray(descriptors(jnp.asarray(x), r), np.float32)


def nearest(x0: jax.Array, bank: jax.Array, resolution: int) -> jax.Array:
  """(B,) descriptor distance of each image to its nearest bank member."""
  q = descriptors(x0, resolution)
  return jnp.sqrt(jnp.maximum(2 - 2 * jnp.max(q @ bank.T, axis=1), 0.0))


def protected(eps_fn, bank: jax.Array, sched: Schedule, *, radius: float, scale: float, resolution: int):
  """eps_fn(x, t) (the guided prediction a sampler steps with) -> the same with the protection term."""
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
