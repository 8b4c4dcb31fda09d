"""3x3 convolutions by Winograd's minimal filtering, F(m x m, 3x3) (Lavin & Gray, 2016), for training on XLA:CPU.

With output tiles of m = 2 (the default), each 4x4 input tile at stride 2 meets the 3x3 kernel in 16 products
instead of 36; with m = 4, each 6x6 tile at stride 4 in 36 instead of 144. The convolution becomes an input
transform (B^T d B), (m+2)^2 independent (tiles x in) @ (in x out) matmuls against the transformed kernel
(G g G^T), and an output transform (A^T y A). Its backward pass is written out in the same terms, both gradients
from dy's tiles transformed once (A dy A^T, the output transform's transpose): the input gradient is the forward
pass transposed, (m+2)^2 products against the transformed kernel over its output channels, then the input
transform's transpose (B t B^T of each tile, overlap-added), and the kernel gradient is (m+2)^2 products of the
saved input tiles with them. F(2x2)'s transforms have only 0, +-1, +-1/2 coefficients, so f32 results match the
direct convolution to ~1e-6 relative; F(4x4)'s (4, 5, 8, 1/6, 1/24) round to ~1e-5.

The kernel's transform is one (a*a, 9) @ (9, I*O) product (_KRON); as an einsum over G twice it had cost as
much as the convolution's own products. Forward + backward of one layer against XLA's (Eigen's) convolution on an
AVX-512 host, F(4x4): 1.50-1.74x at 64x64 and 32x32 with 128-256 channels, 1.35x at 16x16, 0.91x at 8x8;
F(2x2): 1.01-1.21x there, 1.54x at 16x16. On an AVX2 host, before the kernel transform was one product, m = 4
gave 1.7-2.1x at 64x64 and 32x32 and m = 2 1.3-1.6x. Below 16x16, or with fewer than 128 channels, the
transforms' memory traffic outweighs the saved multiplies (docs/BENCHMARKS.md, docs/experiments/conv_layers.py).
The saved input tiles take (m+2)^2/m^2 times the input's memory (4x, 2.25x) until the backward pass.
`conv_general_dilated` is a drop-in for lax.conv_general_dilated (nnx.Conv takes it as an argument) that takes
this form only where it paid (MIN_CHANNELS, MIN_PIXELS), and only in programs lowered for CPU
(lax.platform_dependent: an AOT compile for TPU on a CPU host gets XLA's convolution, which the MXU runs directly).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# Where the transform pays on XLA:CPU (measured per layer, docs/BENCHMARKS.md).
MIN_CHANNELS = 128
MIN_PIXELS = 16 * 16

# Per output tile size m: B^T (a x a), G (a x 3), A^T (m x a) for input tiles of a = m + 2 (Lavin & Gray, 2016),
# in f32 (the compute dtype: F(4x4)'s 1/6, 1/12, 1/24 round here once).
TRANSFORMS = {
    2: (np.array(((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)), np.float32),
        np.array(((1, 0, 0), (.5, .5, .5), (.5, -.5, .5), (0, 0, 1)), np.float32),
        np.array(((1, 1, 1, 0), (0, 1, -1, -1)), np.float32)),
    4: (np.array(((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                  (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)), np.float32),
        np.array(((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                  (1 / 24, -1 / 12, 1 / 6), (0, 0, 1)), np.float32),
        np.array(((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)), np.float32)),
}
# G (x) G: row (a, b), column (r, s) holds G[a, r] G[b, s], so that G g G^T = _KRON @ g flattened (products in f64).
_KRON = {m: np.kron(G.astype(np.float64), G.astype(np.float64)).astype(np.float32)
         for m, (_, G, _) in TRANSFORMS.items()}


def _combine(coefs, parts):
  """sum_i coefs[i] * parts[i], skipping zeros (the transforms are sparse: XLA fuses the few adds)."""
  out = None
  for c, p in zip(coefs, parts):
    if c:
      term = p if c == 1 else -p if c == -1 else p * c
      out = term if out is None else out + term
  return out


def _input_tiles(x, m):
  """(N, H, W, C) -> (a*a, N * H/m * W/m, C): B^T d B of every a x a tile at stride m of x zero-padded by 1.

  Separable (rows, then columns), each stage one fusion over strided slices: ~2x faster on XLA:CPU than a*a
  sums of 2-D strided slices."""
  BT, a = TRANSFORMS[m][0], m + 2
  N, H, W, C = x.shape
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  rows = [xp[:, r:r + H:m] for r in range(a)]                                      # (N, H/m, W+2, C)
  t = jnp.stack([_combine(BT[i], rows) for i in range(a)])
  cols = [t[:, :, :, c:c + W:m] for c in range(a)]                                 # (a, N, H/m, W/m, C)
  return jnp.stack([_combine(BT[j], cols) for j in range(a)], 1).reshape(a * a, -1, C)


def _output_tiles(y, shape, m):
  """(a*a, tiles, O) -> (N, H, W, O): A^T y A of every tile, its m x m outputs interleaved into the image."""
  AT, a = TRANSFORMS[m][2], m + 2
  N, H, W = shape
  y = y.reshape(a, a, N, H // m, W // m, -1)
  t = [_combine(AT[i], [y[p] for p in range(a)]) for i in range(m)]              # (a, N, H/m, W/m, O) each
  out = [[_combine(AT[j], [ti[q] for q in range(a)]) for j in range(m)] for ti in t]
  return jnp.stack([jnp.stack(row, 3) for row in out], 2).reshape(N, H, W, -1)


def _output_tiles_transposed(dy, m):
  """The transpose of _output_tiles: (N, H, W, O) -> (a*a, tiles, O)."""
  AT, a = TRANSFORMS[m][2], m + 2
  rows = [dy[:, i::m] for i in range(m)]
  t = jnp.stack([_combine(AT[:, p], rows) for p in range(a)])                      # (a, N, H/m, W, O)
  cols = [t[:, :, :, j::m] for j in range(m)]
  return jnp.stack([_combine(AT[:, q], cols) for q in range(a)], 1).reshape(a * a, -1, dy.shape[-1])


def _overlap_add(parts, m, axis):
  """The transpose of taking the a = m + 2 slices parts[c] = x_padded[c::m] of an axis zero-padded by 1: parts[c]
  (n tiles on `axis`) lands at padded position m*u + c, where tiles overlap by 2; returns positions 1..m*n."""
  n = parts[0].shape[axis]
  pad = lambda p, lo, hi: jnp.pad(p, [(lo, hi) if d == axis else (0, 0) for d in range(p.ndim)])
  phases = [pad(parts[c], 0, 1) + pad(parts[c + m], 1, 0) if c + m < len(parts) else pad(parts[c], 0, 1)
            for c in range(m)]                                                  # padded position m*u + c, u <= n
  full = jnp.stack(phases, axis + 1)
  full = full.reshape(*full.shape[:axis], (n + 1) * m, *full.shape[axis + 2:])
  return jax.lax.slice_in_dim(full, 1, m * n + 1, axis=axis)


def _input_tiles_transposed(t, shape, m):
  """The transpose of _input_tiles: (a*a, tiles, C) -> (N, H, W, C), each tile's B d B^T overlap-added."""
  BT, a = TRANSFORMS[m][0], m + 2
  N, H, W = shape
  t = t.reshape(a, a, N, H // m, W // m, -1)
  cols = _overlap_add([_combine(BT[:, c], [t[:, j] for j in range(a)]) for c in range(a)], m, 3)  # (a, N, H/m, W, C)
  return _overlap_add([_combine(BT[:, r], [cols[i] for i in range(a)]) for r in range(a)], m, 1)


def _kernel_tiles(w, m):
  """(3, 3, I, O) -> (a*a, I, O): G g G^T, as one (a*a, 9) @ (9, I*O) product (_KRON).

  Written as an einsum over G twice, XLA:CPU ran it as dots of inner size 3 behind transposes of the whole
  kernel: at F(4x4) the kernel transforms took as long as the convolutions' own products."""
  return jnp.dot(_KRON[m], w.reshape(9, -1)).reshape(-1, *w.shape[2:])


def _kernel_tiles_transposed(du, m):
  """The transpose of _kernel_tiles: (a*a, I, O) -> (3, 3, I, O)."""
  return jnp.dot(_KRON[m].T, du.reshape(du.shape[0], -1)).reshape(3, 3, *du.shape[1:])


def conv3x3(x, w, tile: int = 2):
  """3x3, stride 1, zero padding 1 convolution of x (N, H, W, I) with w (3, 3, I, O), by F(tile x tile, 3x3);
  H and W multiples of tile (2 or 4)."""
  return _conv3x3(x, w, tile)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv3x3(x, w, m):
  return _conv3x3_fwd(x, w, m)[0]


def _conv3x3_fwd(x, w, m):
  tiles = _input_tiles(x, m)
  y = jnp.einsum("sti,sio->sto", tiles, _kernel_tiles(w, m))
  return _output_tiles(y, x.shape[:3], m), (tiles, w)


def _conv3x3_bwd(m, res, dy):
  tiles, w = res
  # Both gradients start from dy's transposed output transform (A dy A^T per tile): dx is the forward pass
  # transposed step by step (products against the transformed kernel over its output channels, then the input
  # transform's transpose, an overlap-add), so dy is transformed once. w's transform is the forward pass's,
  # recomputed (one small product) rather than saved at (m+2)^2 / 9 times the kernel's memory.
  dyt = _output_tiles_transposed(dy, m)
  dx = _input_tiles_transposed(jnp.einsum("sto,sio->sti", dyt, _kernel_tiles(w, m)), dy.shape[:3], m)
  du = jnp.einsum("sti,sto->sio", tiles, dyt)
  return dx, _kernel_tiles_transposed(du, m)


_conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


def applies(lhs_shape, rhs_shape, dtype, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count=1, tile: int = 2) -> bool:
  """Whether conv_general_dilated takes the Winograd form for this convolution."""
  if len(lhs_shape) != 4 or tuple(rhs_shape[:2]) != (3, 3) or jnp.dtype(dtype) != jnp.float32:
    return False
  dn = jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, dimension_numbers)
  N, H, W, C = lhs_shape
  ones = lambda v: v is None or tuple(v) == (1, 1)
  return (dn == jax.lax.conv_dimension_numbers(lhs_shape, rhs_shape, ("NHWC", "HWIO", "NHWC"))
          and ones(window_strides) and ones(lhs_dilation) and ones(rhs_dilation)
          and not isinstance(padding, str) and tuple(map(tuple, padding)) == ((1, 1), (1, 1))
          and feature_group_count == 1 and batch_group_count == 1 and H % tile == 0 and W % tile == 0
          and H * W >= MIN_PIXELS and min(C, rhs_shape[3]) >= MIN_CHANNELS)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None, tile: int = 2, **kwargs):
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
                     dimension_numbers, feature_group_count, batch_group_count, tile)):
    return direct(lhs, rhs)
  return jax.lax.platform_dependent(lhs, rhs, cpu=functools.partial(conv3x3, tile=tile), default=direct)
