"""The UNet's downsampler, c1(x) + c2(x) with c1 a 3x3 and c2 a 5x5 convolution, both stride 2 and centred
(padding 1 and 2), as one 5x5 convolution with c1's kernel added to the centre of c2's: 25 taps where the two
take 34, forward and backward, on every platform. On XLA:CPU its input gradient also runs faster.

XLA takes a strided convolution's input gradient as a convolution over the zero-dilated output gradient (input
dilation), a slow path of XLA:CPU's convolutions. Input pixel 2m + a (a = 0, 1) only meets the kernel taps of
parity a: taps 4, 2, 0 at output rows m - 1, m, m + 1 when a = 0, taps 3, 1 at m, m + 1 when a = 1. So one 3x3
stride-1 convolution over dy, with the four phases (a, b) as output channels (tap "5" a zero), followed by
depth-to-space gives the same products without the dilation's zeros: the sub-pixel trick of
unet.TransposedConv, applied to the backward pass. The forward pass and the kernel gradient stay XLA's.

One layer, forward + backward (`python docs/experiments/downsample_layers.py`; docs/BENCHMARKS.md, "The
downsampler"): against the merged convolution with XLA's gradient the phase form is level or faster at 32-128
channels (up to 3x at 64x64x32) and level or slower at 256, so it applies up to MAX_CHANNELS channels, and only
in programs lowered for CPU (lax.platform_dependent): accelerators keep XLA's gradient.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

MAX_CHANNELS = 128
_DN = ("NHWC", "HWIO", "NHWC")
_TAPS = np.array([[4, 2, 0], [5, 3, 1]])   # phase a: the kernel tap at output offsets -1, 0, +1 (5: the zero tap)
_merge = True                               # False inside apart()


def downsample(c1: nnx.Module, c2: nnx.Module, x: jax.Array) -> jax.Array:
  """c1(x) + c2(x) for the downsampler's two stride-2 nnx.Conv layers; LoRA-wrapped layers (or inside `apart()`)
  run as they are."""
  if not _merge or type(c1) is not nnx.Conv or type(c2) is not nnx.Conv:
    return c1(x) + c2(x)
  x, k1, k2, bias = c2.promote_dtype((x, c1.kernel[...], c2.kernel[...], c1.bias[...] + c2.bias[...]),
                                     dtype=c2.dtype)
  return conv5x5_s2(x, k2 + jnp.pad(k1, ((1, 1), (1, 1), (0, 0), (0, 0))), c2.precision) + bias


@contextlib.contextmanager
def apart():
  """Traces inside run the downsampler as its two convolutions (the model's own FLOPs, for cost analysis)."""
  global _merge
  before, _merge = _merge, False
  try:
    yield
  finally:
    _merge = before


def conv5x5_s2(x: jax.Array, k: jax.Array, precision=None) -> jax.Array:
  """conv_general_dilated(x, k, strides 2, padding 2), NHWC / HWIO, for a (5, 5, I, O) kernel."""
  if k.shape[:2] != (5, 5):
    raise ValueError(f"conv5x5_s2 takes a 5x5 kernel, got {k.shape}")
  plain = lambda x, k: _conv(x, k, precision)
  if not applies(x.shape):
    return plain(x, k)
  return jax.lax.platform_dependent(x, k, cpu=lambda x, k: _phase_vjp(x, k, precision), default=plain)


def applies(shape) -> bool:
  """Whether an NHWC input of this shape takes the phase form (on CPU): even height and width, at most
  MAX_CHANNELS channels."""
  _, H, W, C = shape
  return C <= MAX_CHANNELS and H % 2 == 0 and W % 2 == 0


def _conv(x, k, precision):
  return jax.lax.conv_general_dilated(x, k, (2, 2), ((2, 2), (2, 2)), dimension_numbers=_DN, precision=precision)


def input_gradient(dy: jax.Array, k: jax.Array, precision=None) -> jax.Array:
  """The input gradient of `_conv` at dy (B, h, w, O): (B, 2h, 2w, I), as one stride-1 3x3 convolution."""
  kz = jnp.pad(k, ((0, 1), (0, 1), (0, 0), (0, 0)))                          # tap 5: zeros
  w = kz[_TAPS[:, None, :, None], _TAPS[None, :, None, :]]                   # (a, b, 3, 3, I, O)
  B, h, wd, _ = dy.shape
  I = k.shape[2]
  w = jnp.transpose(w, (2, 3, 5, 0, 1, 4)).reshape(3, 3, k.shape[3], 4 * I)   # (dh, dw, O, (a, b, I))
  z = jax.lax.conv_general_dilated(dy, w.astype(dy.dtype), (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN,
                                   precision=precision)
  return z.reshape(B, h, wd, 2, 2, I).transpose(0, 1, 3, 2, 4, 5).reshape(B, 2 * h, 2 * wd, I)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _phase_vjp(x, k, precision):
  return _conv(x, k, precision)


def _phase_vjp_fwd(x, k, precision):
  return _conv(x, k, precision), (x, k)


def _phase_vjp_bwd(precision, res, dy):
  x, k = res
  dk = jax.vjp(lambda k: _conv(x, k, precision), k)[1](dy)[0]
  return input_gradient(dy, k, precision).astype(x.dtype), dk


_phase_vjp.defvjp(_phase_vjp_fwd, _phase_vjp_bwd)
