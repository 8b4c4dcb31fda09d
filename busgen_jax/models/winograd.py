"""3x3 convolutions by Winograd's minimal filtering, F(2x2, 3x3) (Lavin & Gray, 2016), for training on XLA:CPU.

Each 4x4 input tile at stride 2 meets the 3x3 kernel in 16 products instead of 36: the convolution becomes an
input transform (B^T d B), 16 independent (tiles x in) @ (in x out) matmuls against the transformed kernel
(G g G^T), and an output transform (A^T m A). Its backward pass is written out in the same terms: the input
gradient is the same convolution of dy with the flipped, transposed kernel, the kernel gradient is 16 products
of the saved input tiles with the transformed dy. The transforms have only 0, +-1, +-1/2 coefficients, so f32
results match the direct convolution to ~1e-6 relative.

On XLA:CPU a 3x3 layer's forward + backward at (4, 64, 64, 128) and (4, 32, 32, 256) runs 1.4-1.6x faster in
this form than in XLA's (Eigen's) convolution; at 16x16 and below, or with fewer than 128 channels, the
transforms' memory traffic outweighs the saved multiplies (docs/BENCHMARKS.md, docs/experiments/conv_layers.py).
The saved input tiles take 4x the input's memory until the backward pass. `conv_general_dilated` is a
drop-in for lax.conv_general_dilated (nnx.Conv takes it as an argument) that takes this form only where it pays,
and only in programs lowered for CPU (lax.platform_dependent: an AOT compile for TPU on a CPU host gets XLA's
convolution, which the MXU runs directly).
"""

import jax
import jax.numpy as jnp
import numpy as np

# Where the transform pays on XLA:CPU (measured per layer, docs/BENCHMARKS.md).
MIN_CHANNELS = 128
MIN_PIXELS = 32 * 32

_BT = np.array(((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)), np.float32)
_G = np.array(((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1)), np.float32)
_AT = np.array(((1, 1, 1, 0), (0, 1, -1, -1)), np.float32)


def _combine(coefs, parts):
  """sum_i coefs[i] * parts[i], skipping zeros (the transforms are sparse: XLA fuses the few adds)."""
  out = None
  for c, p in zip(coefs, parts):
    if c:
      term = p if c == 1 else -p if c == -1 else p * c
      out = term if out is None else out + term
  return out


def _input_tiles(x):
  """(N, H, W, C) -> (16, N * H/2 * W/2, C): B^T d B of every 4x4 tile at stride 2 of x zero-padded by 1.

  Separable (rows, then columns), each stage one fusion over strided slices: ~2x faster on XLA:CPU than 16
  sums of four 2-D strided slices each."""
  N, H, W, C = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = [xp[:, r:r + H:2] for r in range(4)]                                      # (N, H/2, W+2, C)
  t = jnp.stack([_combine(_BT[a], rows) for a in range(4)])
  cols = [t[:, :, :, c:c + W:2] for c in range(4)]                                 # (4, N, H/2, W/2, C)
  return jnp.stack([_combine(_BT[b], cols) for b in range(4)], 1).reshape(16, -1, C)


def _output_tiles(m, shape):
  """(16, tiles, O) -> (N, H, W, O): A^T m A of every tile, its 2x2 outputs interleaved into the image."""
  N, H, W = shape
  m = m.reshape(4, 4, N, H // 2, W // 2, -1)
  parts = [m[p, q] for p in range(4) for q in range(4)]
  y = [[_combine(np.outer(_AT[a], _AT[b]).ravel(), parts) for b in range(2)] for a in range(2)]
  return jnp.stack([jnp.stack(row, 3) for row in y], 2).reshape(N, H, W, -1)


def _output_tiles_transposed(dy):
  """The transpose of _output_tiles: (N, H, W, O) -> (16, tiles, O)."""
  rows = [dy[:, a::2] for a in range(2)]
  t = jnp.stack([_combine(_AT[:, p], rows) for p in range(4)])                      # (4, N, H/2, W, O)
  cols = [t[:, :, :, b::2] for b in range(2)]
  return jnp.stack([_combine(_AT[:, q], cols) for q in range(4)], 1).reshape(16, -1, dy.shape[-1])


def _kernel_tiles(w):
  """(3, 3, I, O) -> (16, I, O): G g G^T."""
  return jnp.einsum("ar,bs,rsio->abio", _G, _G, w).reshape(16, *w.shape[2:])


@jax.custom_vjp
def conv3x3(x, w):
  """3x3, stride 1, zero padding 1 convolution of x (N, H, W, I) with w (3, 3, I, O); H and W even."""
  return _conv3x3_fwd(x, w)[0]


def _conv3x3_fwd(x, w):
  tiles = _input_tiles(x)
  m = jnp.einsum("sti,sio->sto", tiles, _kernel_tiles(w))
  return _output_tiles(m, x.shape[:3]), (tiles, w)


def _conv3x3_bwd(res, dy):
  tiles, w = res
  dx = conv3x3(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3))      # a stride-1 'same' conv's transpose
  du = jnp.einsum("sti,sto->sio", tiles, _output_tiles_transposed(dy)).reshape(4, 4, *w.shape[2:])
  return dx, jnp.einsum("ar,bs,abio->rsio", _G, _G, du)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def applies(lhs_shape, rhs_shape, dtype, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count=1) -> bool:
  """Whether conv_general_dilated takes the Winograd form for this convolution."""
  if len(lhs_shape) != 4 or tuple(rhs_shape[:2]) != (3, 3) or jnp.dtype(dtype) != jnp.float32:
    return False
  dn = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  N, H, W, C = lhs_shape
  ones = lambda v: v is None or tuple(v) == (1, 1)
  return (dn == jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, ("NHWC", "HWIO", "NHWC"))
          and ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)
          and not isinstance(padding, str) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
          and feature_group_count == 1 and batch_group_count == 1 and H % 2 == 0 and W % 2 == 0
          and H * W >= MIN_PIXELS and min(C, rhs_shape[3]) >= MIN_CHANNELS)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, **kwargs):
  """lax.conv_general_dilated, with qualifying 3x3 convolutions in Winograd's form in programs lowered for CPU."""
  def direct(x, w):
    return jax.lax.conv_general_dilated(
        x, w, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision, preferred_element_type=preferred_element_type,
        **kwargs)
  if (kwargs.get("out_sharding") is not None or preferred_element_type not in (None, jnp.float32)
      or rhs.dtype != lhs.dtype
      or not applies(lhs.shape, rhs.shape, lhs.dtype, window_strides, padding, lhs_dilation, rhs_dilation,
                     dimension_numbers, feature_group_count, batch_group_count)):
    return direct(lhs, rhs)
  return jax.lax.platform_dependent(lhs, rhs, cpu=conv3x3, default=direct)
