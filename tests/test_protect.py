"""Privacy-protected sampling changes samples only where intended: a sample that would copy a training image is
pushed away from it, a sample far from every training image comes out bit for bit as without protection."""

import jax
import jax.numpy as jnp
import numpy as np

from busgen_jax.diffusion import protect, samplers, schedule


def _smooth(seed: int, size: int = 32) -> np.ndarray:
  """A smooth random (size, size, 3) image in [-1, 1] (grayscale replicated, as the model's images are)."""
  from scipy import ndimage
  x = ndimage.zoom(np.random.default_rng(seed).normal(size=(8, 8)), size / 8, order=1)
  x = (x - x.min()) / (x.max() - x.min()) * 1.6 - 0.8
  return np.repeat(x[..., None], 3, -1).astype(np.float32)


def test_protection_pushes_copies_away_and_leaves_other_samples_bit_identical():
  sched = schedule.Schedule.from_config(schedule.default_config())
  members = np.stack([_smooth(s) for s in range(6)])             # the "training set"
  outsider = _smooth(100)                                          # an image far from all of them
  targets = jnp.asarray(np.stack([members[2], outsider]))
  bank = jnp.asarray(protect.descriptors(jnp.asarray(np.concatenate([members, members[:, :, ::-1]])), 16))
  assert float(protect.nearest(jnp.asarray(outsider[None]), bank, 16)[0]) > 0.6

  # A model that has memorised: whatever x_t, it predicts the noise that makes x0 its target image.
  def eps_fn(x, t, cond):
    a = jnp.asarray(sched.sqrt_ab, jnp.float32)[t][:, None, None, None]
    s = jnp.asarray(sched.sqrt_1m_ab, jnp.float32)[t][:, None, None, None]
    return (x - a * targets[cond]) / s

  plan = samplers.make_plan(sched.betas, algorithm="dpmsolver++", method="multistep", order=2, steps=10)
  x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  cond = jnp.arange(2)
  run = jax.jit(lambda transform: samplers.run(plan, eps_fn, x_T, cond=cond, eps_transform=transform),
                static_argnums=0)
  plain = np.asarray(run(None))
  guard = np.asarray(run(lambda f: protect.protected(f, bank, sched, radius=0.35, scale=0.5, resolution=16)))

  d_plain = np.asarray(protect.nearest(jnp.asarray(plain), bank, 16))
  d_guard = np.asarray(protect.nearest(jnp.asarray(guard), bank, 16))
  assert d_plain[0] < 0.02                     # without protection: a copy of training image 2
  assert d_guard[0] > 0.3, d_guard             # with it: pushed out to about the radius
  assert np.abs(guard[0] - plain[0]).mean() > 0.05
  np.testing.assert_array_equal(guard[1], plain[1])   # the outsider never came near: untouched, bit for bit
