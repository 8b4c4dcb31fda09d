"""The UNet's downsampler, c1(x) + c2(x) with c1 a 3x3 and c2 a 5x5 convolution, both stride 2 and centred
(padding 1 and 2), as one 5x5 convolution with c1's kernel added to the centre of c2's: 25 taps where the two
take 34, forward and backward, on every platform. On XLA:CPU its input gradient also runs faster.

XLA takes a strided convolution's input gradient as a convolution over the zero-dilated output gradient (input
dilation), a slow path of XLA:CPU's convolutions. That gradient is a 5x5 / stride 2 transposed convolution of dy
(kernel flipped, inputs and outputs swapped): input pixel 2m + a (a = 0, 1) only meets the kernel taps of parity
a (taps 4, 2, 0 at output rows m - 1, m, m + 1 when a = 0; taps 3, 1 at m, m + 1 when a = 1), so one 3x3 stride-1
convolution over dy with the four phases (a, b) as output channels, followed by depth-to-space, gives the same
products without the dilation's zeros (transposed_conv5x5_s2). The forward pass and the kernel gradient stay
XLA's.

One layer, forward + backward (`python docs/experiments/downsample_layers.py`; docs/BENCHMARKS.md, "The
downsampler"): against the merged convolution with XLA's gradient the phase form is level or faster at 32-128
channels (2.5-2.9x at 64x64x32) and level or slower at 256, so it applies up to MAX_CHANNELS channels, and only
in programs lowered for CPU (lax.platform_dependent): accelerators keep XLA's gradient.

The upsampler's 5x5 / stride 2 transposed convolution (unet.TransposedConv) runs the same sub-pixel form in its
forward pass.
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
# Phase a of the output meets these taps of the front-zero-padded kernel (tap 0: the pad) at offsets -1, 0, +1.
_PHASE_TAPS = np.array([[1, 3, 5], [0, 2, 4]])
_merge = True   # False inside apart()


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


def transposed_conv5x5_s2(x: jax.Array, k: jax.Array, conv=jax.lax.conv_general_dilated) -> jax.Array:
  """PyTorch's ConvTranspose2d(5x5, stride 2, padding 2, output_padding 1) of x (B, H, W, I): (B, 2H, 2W, O), for
  `k` (5, 5, I, O) the equivalent forward kernel over the zero-dilated input (torch's (I, O, kh, kw) spatially
  flipped). Output pixel (2i + a, 2j + b) only meets the taps of its parity, so one 3x3 stride-1 `conv` with the
  four phases (a, b) as output channels, then depth-to-space, gives the same products without the zeros."""
  kz = jnp.pad(k, ((1, 0), (1, 0), (0, 0), (0, 0)))                                   # (6, 6, I, O)
  w = kz[_PHASE_TAPS[:, None, :, None], _PHASE_TAPS[None, :, None, :]]                # (a, b, 3, 3, I, O)
  B, H, W, _ = x.shape
  O = k.shape[3]
  w = jnp.transpose(w, (2, 3, 4, 0, 1, 5)).reshape(3, 3, k.shape[2], 4 * O)          # out channels (a, b, O)
  y = conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DN)
  return y.reshape(B, H, W, 2, 2, O).transpose(0, 1, 3, 2, 4, 5).reshape(B, 2 * H, 2 * W, O)


def input_gradient(dy: jax.Array, k: jax.Array, precision=None) -> jax.Array:
  """The input gradient of `_conv` at dy (B, h, w, O): (B, 2h, 2w, I). It is the transposed convolution of dy whose
  equivalent forward kernel is k flipped, inputs and outputs swapped: one stride-1 3x3 convolution."""
  conv = functools.partial(jax.lax.conv_general_dilated, precision=precision)
  return transposed_conv5x5_s2(dy, k[::-1, ::-1].swapaxes(2, 3).astype(dy.dtype), conv)


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
