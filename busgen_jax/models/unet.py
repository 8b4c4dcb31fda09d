"""The BUSGen conditional UNet in Flax NNX (NHWC), configurable from test-tiny to the official sizes.

Follows the official model rule by rule (../shared/reference/README.md): a learnable time table initialised
with interleaved sinusoids -> linear, swish, linear; pathology and device embeddings (row 0 = null),
concatenated -> linear, swish, linear; res blocks GroupNorm-swish-conv (+ per-channel time and condition
projections) GroupNorm-swish-dropout-conv (+ 1x1 shortcut); self-attention after every down-path res block
and the first middle block; downsample = 3x3/s2 conv + 5x5/s2 conv; upsample = 5x5/s2 transposed conv
(padding 2, output padding 1) then 3x3 conv. The lesion box (and optionally the lesion mask) enter as extra
input channels of the first conv.

Parameters carry logical axis names (metadata "axes") that parallel.Rules maps onto the mesh.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from busgen_jax.models import strided, winograd

CONV_AXES = (None, None, "conv_in", "channels")
DENSE_AXES = ("embed", "channels")
VECTOR_AXES = ("vector",)


def default_config() -> ml_collections.ConfigDict:
  """The official full model (ch 128, ch_mult 1,2,2,2, 2 res blocks, 32 groups, T 500, 19 devices + null)."""
  c = ml_collections.ConfigDict()
  c.ch = 128
  c.ch_mult = (1, 2, 2, 2)
  c.num_res_blocks = 2
  c.num_groups = 32
  c.T = 500
  c.dropout = 0.1
  c.attn_levels = (-1,)        # down-path levels with attention after each res block; (-1,) = all (official)
  c.mid_attn = True            # attention after the first middle block (official)
  c.num_pathology = 3          # rows of the pathology table: null, benign, malignant (official)
  c.num_devices = 20           # rows of the device table: null + 19 devices (official full model)
  c.conditions = ("pathology", "device", "box")  # any of these, plus "mask" (lesion-mask channel)
  c.dtype = "float32"          # compute dtype ("bfloat16": bf16 activations, f32 parameters)
  c.remat = False              # rematerialise each res block in the backward pass
  c.attention = "auto"         # "dense" | "chunked" | "blocked" (memory-efficient) | "cudnn" (GPU) | "auto"
  c.attention_chunk = 1024     # query rows (and keys) per chunk for chunked and blocked attention
  # "winograd": 3x3 convolutions with >= 128 channels at >= 16x16 pixels by Winograd's F(2x2, 3x3) in programs
  # lowered for CPU (models/winograd.py; f32 results within ~1e-6); "winograd4": by F(4x4, 3x3) (fewer multiplies,
  # within ~1e-5); "direct": XLA's convolution everywhere.
  c.conv = "direct"
  # A guidance-distilled student (busgen-jax distill): the guidance scale is an input ("guidance" in cond, (B,)
  # floats), embedded like the time and added to it (Meng et al. 2023), so one evaluation replaces the
  # conditional + unconditional pair. Zero-initialised: a fresh student is its teacher's conditional model.
  c.guidance_embed = False
  return c


# ------------------------------------------------------------------------------------------------ layers

CONVS = {"direct": jax.lax.conv_general_dilated, "winograd": winograd.conv_general_dilated,
         "winograd4": functools.partial(winograd.conv_general_dilated, tile=4)}


def _conv_fn(cfg):
  return CONVS[cfg.get("conv", "direct")]   # model cards written before the option lack the key


def _conv(cin, cout, k, rng, stride=1, padding=None, dtype=None, conv=jax.lax.conv_general_dilated):
  p = (k - 1) // 2 if padding is None else padding
  return nnx.Conv(cin, cout, (k, k), strides=stride, padding=((p, p), (p, p)), dtype=dtype, rngs=nnx.Rngs(0),
                  conv_general_dilated=conv,
                  kernel_init=_torch_uniform(rng, cin * k * k), bias_init=_torch_uniform(rng, cin * k * k),
                  kernel_metadata={"axes": CONV_AXES}, bias_metadata={"axes": ("channels",)})


def _dense(cin, cout, rng, dtype=None):
  return nnx.Linear(cin, cout, dtype=dtype, rngs=nnx.Rngs(0), kernel_init=_torch_uniform(rng, cin),
                    bias_init=_torch_uniform(rng, cin),
                    kernel_metadata={"axes": DENSE_AXES}, bias_metadata={"axes": ("channels",)})


def _norm(c, groups, dtype):
  return nnx.GroupNorm(c, num_groups=groups, epsilon=1e-5, dtype=dtype, rngs=nnx.Rngs(0),
                       scale_metadata={"axes": VECTOR_AXES}, bias_metadata={"axes": VECTOR_AXES})


# Initial values are drawn on the host with NumPy, in construction order from the model's seed: jitted
# jax.random initialisers take ~20 s to compile even for the tiny model on CPU; NumPy takes milliseconds
# and nothing large is ever built on one device (the trainer places the values straight onto their shardings).


def _torch_uniform(rng: np.random.Generator, fan_in: int):
  """PyTorch's default conv/linear init (kaiming-uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jnp.asarray(rng.uniform(-bound, bound, shape), dtype)


GUIDANCE_SCALE = 100.0   # guidance scales (about 1-8) times this span the sinusoids' periods as timesteps do


def sinusoids(positions, d: int, xp=np):
  """(n,) positions -> (n, d) rows [sin(p f0), cos(p f0), sin(p f1), cos(p f1), ...], f_i = 10000^(-2i/d), in
  NumPy (xp=np) or jax.numpy."""
  freqs = xp.exp(-xp.arange(0, d, 2) / d * math.log(10000.0))
  ang = positions[:, None] * freqs[None, :]
  return xp.stack([xp.sin(ang), xp.cos(ang)], -1).reshape(positions.shape[0], d)


def guidance_features(w: jax.Array, d: int) -> jax.Array:
  """(B,) guidance scales -> (B, d): the time table's initial rows at t = 100 w."""
  return sinusoids(GUIDANCE_SCALE * w.astype(jnp.float32), d, jnp)


def sinusoid_table(T: int, d: int) -> np.ndarray:
  """The time table's initial rows t = 0 .. T-1 (official init), computed in float64."""
  return sinusoids(np.arange(T), d).astype(np.float32)


class Embedding(nnx.Module):
  def __init__(self, rows: int, dim: int, init: np.ndarray | None, rng: np.random.Generator):
    value = jnp.asarray(init if init is not None else rng.standard_normal((rows, dim)), jnp.float32)
    self.embedding = nnx.Param(value, axes=("vocab", "embed"))

  def __call__(self, idx):
    return jnp.take(self.embedding.value, idx, axis=0)


# From this many keys on, attention's backward pass is written out (_softmax_attention) in programs lowered for CPU:
# at the official model's 4,096 positions one layer's forward + backward runs 1.15x faster on XLA:CPU than
# autodiff's, the whole 64 px train step 1.19x (AVX2 host; one layer 1.14x on an AVX-512 host with dV and dK
# computed transposed); at 256-1,024 keys the two are level or autodiff is ahead
# (docs/BENCHMARKS.md). Elsewhere autodiff's stays (lax.platform_dependent, resolved when the program is lowered,
# so an AOT compile for TPU on a CPU host gets it): on a v5p-64 the official train step at batch 8192 took 76.9 GiB
# per chip with the form of then, which materialised two (L, L) transposes, against 67.5 without (`busgen-jax aot`);
# today's form transposes only (L, C) arrays and has not been compiled for TPU.
SOFTMAX_VJP_MIN_KEYS = 2048


@jax.custom_vjp
def _softmax_attention(q, k, v):
  """softmax(q k^T / sqrt(C)) v with the standard backward pass (as flash attention's): dS = P * (dP - rowsum(dO * O)).

  Autodiff of the softmax multiplies (L, L) cotangents by materialised (L, L) broadcasts of the scale and the
  row sums; here one elementwise pass makes dS. The two products that contract over the query axis would read
  their (L, L) operand transposed (dV = P^T dO, dK = dS^T Q), which XLA:CPU's dot kernels run at about half the
  rate of the untransposed form; computed transposed, dV^T = dO^T P and dK^T = Q^T dS read P and dS as stored, and
  only (L, C) arrays are transposed (dO and Q materialised behind an optimization barrier, which XLA would
  otherwise fold back into the dot)."""
  return _softmax_attention_fwd(q, k, v)[0]


def _probabilities(q, k, dtype):
  """softmax(q k^T / sqrt(C)) in `dtype`: the forward pass of both backward forms."""
  w = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (1.0 / math.sqrt(q.shape[-1]))
  return jax.nn.softmax(w, axis=-1).astype(dtype)


def _softmax_attention_fwd(q, k, v):
  p = _probabilities(q, k, v.dtype)
  o = jnp.einsum("bqk,bkc->bqc", p, v)
  return o, (q, k, v, p, o)


def _softmax_attention_bwd(res, g):
  q, k, v, p, o = res
  scale = 1.0 / math.sqrt(q.shape[-1])
  transposed = lambda a: jax.lax.optimization_barrier(a.swapaxes(1, 2))
  dvt = jnp.einsum("bcq,bqk->bck", transposed(g.astype(p.dtype)), p)       # dV^T = dO^T P
  dp = jnp.einsum("bqc,bkc->bqk", g, v, preferred_element_type=jnp.float32)
  d = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)   # = rowsum(P * dP)
  ds = (p.astype(jnp.float32) * (dp - d) * scale).astype(q.dtype)
  dq = jnp.einsum("bqk,bkc->bqc", ds, k)
  dkt = jnp.einsum("bcq,bqk->bck", transposed(q), ds)                      # dK^T = Q^T dS
  return dq, dkt.swapaxes(1, 2).astype(k.dtype), dvt.swapaxes(1, 2).astype(v.dtype)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


def _blocked_forward(q, k, v, block):
  """o = softmax(q k^T / sqrt(C)) v a block of query rows at a time, and each row's log-sum-exp (B, L)."""
  k = k * (1.0 / math.sqrt(q.shape[-1]))   # the scale on the (L, C) operand rather than the (block, L) logits

  def rows(_, qb):                      # qb (B, block, C)
    s = jnp.einsum("bqc,bkc->bqk", qb, k, preferred_element_type=jnp.float32)
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - m)
    l = jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("bqk,bkc->bqc", p.astype(v.dtype), v, preferred_element_type=jnp.float32) / l
    return None, (o.astype(v.dtype), (m + jnp.log(l))[..., 0])

  _, (o, lse) = jax.lax.scan(rows, None, _blocks(q, block))
  return _unblock(o), _unblock(lse)


def _blocks(x, block):                  # (B, L, ...) -> (L // block, B, block, ...)
  return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]).swapaxes(0, 1)


def _unblock(x):                        # the inverse of _blocks
  return x.swapaxes(0, 1).reshape(x.shape[1], x.shape[0] * x.shape[2], *x.shape[3:])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_attention(q, k, v, block):
  """softmax(q k^T / sqrt(C)) v with no (L, L) array: flash attention's scheme (Dao et al. 2022) as XLA loops.

  The forward pass takes `block` query rows at a time and keeps each row's log-sum-exp; the backward pass takes
  `block` keys at a time, recomputes their probabilities transposed, P^T = exp(k q^T / sqrt(C) - lse), and forms
  dV = P^T dO, dS^T = P^T * (V dO^T - rowsum(dO * O)), dK = dS^T Q and dQ += dS K. Seven (L, L, C) products
  instead of six, but no (B, L, L) array (256 MB at the official model's 4,096 positions, batch 4): the
  elementwise passes run over (B, block, L) blocks, and only dQ's product needs a transposed copy of one.
  On XLA:CPU, with 512-row blocks, it made the official 64 px train step faster than _softmax_attention's
  materialised form (docs/BENCHMARKS.md); on accelerators it is a memory-efficient form with one recomputed
  product where "chunked" recomputes the whole forward pass."""
  return _blocked_forward(q, k, v, block)[0]


def _blocked_attention_fwd(q, k, v, block):
  o, lse = _blocked_forward(q, k, v, block)
  return o, (q, k, v, o, lse)


def _blocked_attention_bwd(block, res, g):
  q, k, v, o, lse = res
  scale = 1.0 / math.sqrt(q.shape[-1])
  d = jnp.sum(g.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)[:, None, :]   # rowsum(P * dP), (B, 1, L)
  qs = q * scale
  lse = lse[:, None, :]

  def keys(dq, kv):                     # kb, vb (B, block, C)
    kb, vb = kv
    pt = jnp.exp(jnp.einsum("bkc,bqc->bkq", kb, qs, preferred_element_type=jnp.float32) - lse)
    dv = jnp.einsum("bkq,bqc->bkc", pt.astype(g.dtype), g, preferred_element_type=jnp.float32)
    dpt = jnp.einsum("bkc,bqc->bkq", vb, g, preferred_element_type=jnp.float32)
    dst = (pt * (dpt - d)).astype(q.dtype)
    dk = jnp.einsum("bkq,bqc->bkc", dst, qs, preferred_element_type=jnp.float32)
    ds = jax.lax.optimization_barrier(dst.swapaxes(1, 2))    # XLA would fold the transpose back into the dot
    dq = dq + jnp.einsum("bqk,bkc->bqc", ds, kb, preferred_element_type=jnp.float32)
    return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

  dq, (dk, dv) = jax.lax.scan(keys, jnp.zeros(q.shape, jnp.float32), (_blocks(k, block), _blocks(v, block)))
  return (dq * scale).astype(q.dtype), _unblock(dk), _unblock(dv)


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)


def attention(q, k, v, *, impl: str, chunk: int):
  """Single-head softmax(q k^T / sqrt(C)) v over all pixels; q, k, v (B, L, C).

  "dense": the whole (L, L) logits at once, as two matmuls XLA fuses around the softmax; "cudnn":
  jax.nn.dot_product_attention's fused GPU kernel (bf16); "chunked": `chunk` query rows at a time under
  jax.checkpoint, so neither pass holds more than chunk x L logits (160 px full-resolution attention has
  L = 25,600: 2.6 GB of f32 logits per image when materialised); "auto": dense up to `chunk` pixels (or while
  L <= 4096), chunked above; "blocked": flash attention's scheme (_blocked_attention), `chunk` query rows at a
  time forward and `chunk` keys at a time backward, no (L, L) array in either pass and one recomputed product
  instead of chunked's whole recomputed forward pass."""
  L = q.shape[1]
  if impl == "auto":
    impl = "dense" if L <= max(chunk, 4096) or L % chunk else "chunked"
  if impl == "cudnn":
    return jax.nn.dot_product_attention(q[:, :, None], k[:, :, None], v[:, :, None],
                                        implementation="cudnn")[:, :, 0]

  def rows(qc):  # (B, n, C) queries against every key
    autodiff = lambda qc, k, v: jnp.einsum("bqk,bkc->bqc", _probabilities(qc, k, v.dtype), v)
    if L >= SOFTMAX_VJP_MIN_KEYS:   # the written-out backward in programs lowered for CPU only
      return jax.lax.platform_dependent(qc, k, v, cpu=_softmax_attention, default=autodiff)
    return autodiff(qc, k, v)

  if impl == "dense":
    return rows(q)
  if impl not in ("chunked", "blocked"):
    raise ValueError(f"model.attention must be dense, chunked, blocked, cudnn or auto, got {impl!r}")
  if L <= chunk:     # one chunk: the dense form is the same computation
    return rows(q)
  if L % chunk:
    raise ValueError(f"{impl} attention: {L} pixels are not divisible by attention_chunk={chunk}")
  if impl == "blocked":
    return _blocked_attention(q, k, v, chunk)
  return _unblock(jax.lax.map(jax.checkpoint(rows), _blocks(q, chunk)))


class AttnBlock(nnx.Module):
  def __init__(self, c, groups, cfg, rng, dtype):
    self.group_norm = _norm(c, groups, dtype)
    self.proj_q = _conv(c, c, 1, rng, dtype=dtype)
    self.proj_k = _conv(c, c, 1, rng, dtype=dtype)
    self.proj_v = _conv(c, c, 1, rng, dtype=dtype)
    self.proj = _conv(c, c, 1, rng, dtype=dtype)
    self.impl, self.chunk = cfg.attention, cfg.attention_chunk

  def __call__(self, x):
    B, H, W, C = x.shape
    h = self.group_norm(x)
    q, k, v = (p(h).reshape(B, H * W, C) for p in (self.proj_q, self.proj_k, self.proj_v))
    h = attention(q, k, v, impl=self.impl, chunk=self.chunk).reshape(B, H, W, C)
    return x + self.proj(h)


class ResBlock(nnx.Module):
  def __init__(self, cin, cout, tdim, attn, cfg, rng, dtype):
    g = cfg.num_groups
    conv = _conv_fn(cfg)
    self.norm1, self.conv1 = _norm(cin, g, dtype), _conv(cin, cout, 3, rng, dtype=dtype, conv=conv)
    self.temb_proj = _dense(tdim, cout, rng, dtype)
    self.cond_proj = _dense(tdim, cout, rng, dtype)
    self.norm2, self.conv2 = _norm(cout, g, dtype), _conv(cout, cout, 3, rng, dtype=dtype, conv=conv)
    self.dropout = nnx.Dropout(cfg.dropout)
    self.shortcut = _conv(cin, cout, 1, rng, dtype=dtype) if cin != cout else None
    self.attn = AttnBlock(cout, g, cfg, rng, dtype) if attn else None

  def __call__(self, x, temb, cemb, rngs=None, deterministic=True):
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = h + self.temb_proj(nnx.swish(temb))[:, None, None, :] + self.cond_proj(nnx.swish(cemb))[:, None, None, :]
    h = nnx.swish(self.norm2(h))
    h = self.conv2(self.dropout(h, deterministic=deterministic, rngs=rngs))
    h = h + (self.shortcut(x) if self.shortcut is not None else x)
    return self.attn(h) if self.attn is not None else h


class DownSample(nnx.Module):
  def __init__(self, c, rng, dtype):
    self.c1 = _conv(c, c, 3, rng, stride=2, padding=1, dtype=dtype)
    self.c2 = _conv(c, c, 5, rng, stride=2, padding=2, dtype=dtype)

  def __call__(self, x):   # c1(x) + c2(x), as one 5x5 convolution where it can (strided.downsample)
    return strided.downsample(self.c1, self.c2, x)


class TransposedConv(nnx.Module):
  """PyTorch ConvTranspose2d(5x5, stride 2, padding 2, output_padding 1), computed as a sub-pixel convolution
  (strided.transposed_conv5x5_s2). The kernel is stored as the equivalent forward conv over the zero-dilated input,
  (kh, kw, in, out) = torch's (in, out, kh, kw) spatially flipped (the importer converts); the input-dilated
  form's kernel gradient runs ~25x slower on XLA:CPU."""

  def __init__(self, c, k, rng, dtype, padding=2, conv=jax.lax.conv_general_dilated):
    if (k, padding) != (5, 2):
      raise ValueError("TransposedConv implements the official 5x5 / padding 2 / output padding 1 upsampler")
    self.kernel = nnx.Param(_torch_uniform(rng, c * k * k)(None, (k, k, c, c)), axes=CONV_AXES)
    self.bias = nnx.Param(_torch_uniform(rng, c * k * k)(None, (c,)), axes=("channels",))
    self.dtype, self.conv = dtype, conv

  def __call__(self, x):
    dt = self.dtype or x.dtype
    y = strided.transposed_conv5x5_s2(x.astype(dt), self.kernel.value.astype(dt), self.conv)
    return y + self.bias.value.astype(dt)


class UpSample(nnx.Module):
  def __init__(self, c, rng, dtype, conv=jax.lax.conv_general_dilated):
    self.t = TransposedConv(c, 5, rng, dtype, conv=conv)
    self.c = _conv(c, c, 3, rng, dtype=dtype, conv=conv)

  def __call__(self, x):
    return self.c(self.t(x))


# ------------------------------------------------------------------------------------------------ the UNet

def check_config(cfg: ml_collections.ConfigDict) -> None:
  """Clear errors for model settings of the wrong type or out of range (an override like --config.model.
  ch_mult=abc would otherwise fail deep inside initialisation)."""
  def positive_int(name, v):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
      raise ValueError(f"model.{name} must be a positive integer, got {v!r}")
  for name in ("ch", "num_res_blocks", "num_groups", "T", "num_pathology", "num_devices", "attention_chunk"):
    positive_int(name, cfg[name])
  if isinstance(cfg.ch_mult, str) or not hasattr(cfg.ch_mult, "__len__") or not len(cfg.ch_mult):
    raise ValueError(f"model.ch_mult must be a tuple of positive integers, e.g. (1, 2, 2, 2), got {cfg.ch_mult!r}")
  for m in cfg.ch_mult:
    positive_int("ch_mult entries", m)
  for m in (1, *cfg.ch_mult):
    if (cfg.ch * m) % cfg.num_groups:
      raise ValueError(f"model.num_groups={cfg.num_groups} does not divide the {cfg.ch * m} channels of a level "
                       f"(ch={cfg.ch}, ch_mult={tuple(cfg.ch_mult)})")
  levels = len(cfg.ch_mult)
  bad = [a for a in cfg.attn_levels if not isinstance(a, (int, np.integer)) or not -levels <= a < levels]
  if isinstance(cfg.attn_levels, str) or bad:
    raise ValueError(f"model.attn_levels: {cfg.attn_levels!r} must be level indices in [-{levels}, {levels})")
  if not 0 <= float(cfg.dropout) < 1:
    raise ValueError(f"model.dropout must be in [0, 1), got {cfg.dropout!r}")
  if cfg.get("conv", "direct") not in CONVS:
    raise ValueError(f"model.conv must be one of {', '.join(CONVS)}, got {cfg.conv!r}")
  unknown = set(cfg.conditions) - {"pathology", "device", "box", "mask"}
  if isinstance(cfg.conditions, str) or unknown:
    raise ValueError(f"model.conditions: unknown {sorted(unknown) or cfg.conditions!r} (pathology, device, box, mask)")


class UNet(nnx.Module):
  def __init__(self, cfg: ml_collections.ConfigDict, *, seed: int = 0):
    check_config(cfg)
    self.cfg = cfg = ml_collections.FrozenConfigDict(cfg)  # static (hashable) in the graph definition
    dtype = None if cfg.dtype == "float32" else jnp.dtype(cfg.dtype)
    rng = np.random.default_rng(seed)
    ch, tdim = cfg.ch, cfg.ch * 4
    # Time: learnable table initialised with sinusoids, then linear-swish-linear.
    self.time_table = Embedding(cfg.T, ch, sinusoid_table(cfg.T, ch), rng)
    self.time_1, self.time_2 = _dense(ch, tdim, rng, dtype), _dense(tdim, tdim, rng, dtype)
    # Conditions: pathology and device tables (row 0 = null), concatenated, then linear-swish-linear.
    self.pathology_table = Embedding(cfg.num_pathology, ch, None, rng)
    self.device_table = Embedding(cfg.num_devices, ch, None, rng)
    self.cond_1, self.cond_2 = _dense(2 * ch, tdim, rng, dtype), _dense(tdim, tdim, rng, dtype)
    if cfg.get("guidance_embed", False):   # cards written before the option lack the key
      self.guidance_1 = _dense(ch, tdim, rng, dtype)
      zeros = nnx.initializers.zeros_init()
      self.guidance_2 = nnx.Linear(tdim, tdim, dtype=dtype, rngs=nnx.Rngs(0), kernel_init=zeros, bias_init=zeros,
                                   kernel_metadata={"axes": DENSE_AXES}, bias_metadata={"axes": ("channels",)})
    self.in_channels = 3 + ("box" in cfg.conditions) + ("mask" in cfg.conditions)
    self.head = _conv(self.in_channels, ch, 3, rng, dtype=dtype)

    levels = len(cfg.ch_mult)
    attn_levels = set(range(levels)) if tuple(cfg.attn_levels) == (-1,) else set(cfg.attn_levels)
    down, chs, now = [], [ch], ch
    for i, mult in enumerate(cfg.ch_mult):
      for _ in range(cfg.num_res_blocks):
        down.append(ResBlock(now, ch * mult, tdim, i in attn_levels, cfg, rng, dtype))
        now = ch * mult
        chs.append(now)
      if i != levels - 1:
        down.append(DownSample(now, rng, dtype))
        chs.append(now)
    self.down = nnx.List(down)
    self.middle = nnx.List([ResBlock(now, now, tdim, cfg.mid_attn, cfg, rng, dtype),
                            ResBlock(now, now, tdim, False, cfg, rng, dtype)])
    up = []
    for i, mult in reversed(list(enumerate(cfg.ch_mult))):
      for _ in range(cfg.num_res_blocks + 1):
        up.append(ResBlock(chs.pop() + now, ch * mult, tdim, False, cfg, rng, dtype))
        now = ch * mult
      if i != 0:
        up.append(UpSample(now, rng, dtype, conv=_conv_fn(cfg)))
    self.up = nnx.List(up)
    self.tail_norm = _norm(now, cfg.num_groups, dtype)
    self.tail_conv = _conv(now, 3, 3, rng, dtype=dtype)

  def condition_channels(self, cond: Mapping[str, Any], like: jax.Array) -> list[jax.Array]:
    return [cond[k].astype(like.dtype) for k in ("box", "mask") if k in self.cfg.conditions]

  def __call__(self, x, t, cond: Mapping[str, Any], *, rngs: nnx.Rngs | None = None, train: bool = False):
    """x (B,H,W,3) in [-1,1]-ish, t (B,) integer steps in [0,T), cond: "pathology"/"device" (B,) ints (0 = null),
    "box"/"mask" (B,H,W,1) channels (all zero = unconditional), and for a guidance-distilled student "guidance"
    (B,) scales. Returns the noise prediction (B,H,W,3)."""
    cfg = self.cfg
    dtype = x.dtype if cfg.dtype == "float32" else jnp.dtype(cfg.dtype)
    B = x.shape[0]
    temb = self.time_2(nnx.swish(self.time_1(self.time_table(t))))
    if cfg.get("guidance_embed", False):
      if "guidance" not in cond:
        raise ValueError("this model is a guidance-distilled student: cond needs 'guidance' (B,) scales")
      g = guidance_features(cond["guidance"], cfg.ch)
      temb = temb + self.guidance_2(nnx.swish(self.guidance_1(g)))
    zeros = jnp.zeros((B,), jnp.int32)
    pathology = cond["pathology"] if "pathology" in cfg.conditions else zeros
    device = cond["device"] if "device" in cfg.conditions else zeros
    cemb = jnp.concatenate([self.pathology_table(pathology), self.device_table(device)], axis=-1)
    cemb = self.cond_2(nnx.swish(self.cond_1(cemb)))

    h = self.head(jnp.concatenate([x, *self.condition_channels(cond, x)], axis=-1).astype(dtype))
    hs = [h]
    deterministic = not train or cfg.dropout == 0
    # Rematerialisation only pays where there is a backward pass; in sampling (inside lax.scan) nnx.remat would
    # also cross trace levels.
    remat = bool(cfg.remat and train)
    for layer in self.down:
      h = self._res(layer, h, temb, cemb, rngs, deterministic, remat) if isinstance(layer, ResBlock) else layer(h)
      hs.append(h)
    for layer in self.middle:
      h = self._res(layer, h, temb, cemb, rngs, deterministic, remat)
    for layer in self.up:
      if isinstance(layer, ResBlock):
        h = self._res(layer, jnp.concatenate([h, hs.pop()], axis=-1), temb, cemb, rngs, deterministic, remat)
      else:
        h = layer(h)
    return self.tail_conv(nnx.swish(self.tail_norm(h))).astype(jnp.float32)

  @staticmethod
  def _res(block, h, temb, cemb, rngs, deterministic, remat):
    if remat:
      return nnx.remat(lambda b, h, t, c, r: b(h, t, c, r, deterministic))(block, h, temb, cemb, rngs)
    return block(h, temb, cemb, rngs, deterministic)


def create(cfg: ml_collections.ConfigDict, seed: int = 0) -> UNet:
  """A UNet with initialised parameters (drawn from `seed` on the host)."""
  return UNet(cfg, seed=seed)


def abstract(cfg: ml_collections.ConfigDict) -> UNet:
  """The model with ShapeDtypeStruct parameters (no memory, no compute): for shapes, shardings, restoring.
  A fresh module each call, built from one trace per config: tracing the constructor takes 0.4 s for a tiny
  model and 4 s for the official one, and a run asks for the same model many times (restore, sample, audit)."""
  key = cfg.to_json(sort_keys=True)
  if key not in _ABSTRACT:
    if len(_ABSTRACT) >= 8:
      _ABSTRACT.pop(next(iter(_ABSTRACT)))
    own = cfg.copy_and_resolve_references()   # the cached module keeps its own config, not the caller's
    _ABSTRACT[key] = nnx.split(nnx.eval_shape(lambda: UNet(own)))
  return nnx.merge(*_ABSTRACT[key])


_ABSTRACT: dict[str, tuple] = {}   # config JSON -> (graphdef, abstract state), oldest first


def param_axes(model: nnx.Module, which=nnx.Param) -> dict:
  """Pure-dict tree (like nnx.to_pure_dict of the params) of each parameter's logical axis names; `which` is an
  nnx filter (e.g. the frozen, non-LoRA parameters)."""
  state = nnx.state(model, which)
  axes = jax.tree.map(lambda v: tuple(v.get_metadata().get("axes") or (None,) * v.value.ndim), state,
                      is_leaf=lambda v: isinstance(v, nnx.Variable))
  return nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes


def num_params(tree) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


def flops_per_image(cfg: ml_collections.ConfigDict, size: int, *, backward: bool = True) -> float:
  """Model FLOPs per image (forward, or forward + backward = 3x forward) from XLA's cost analysis."""
  cfg = ml_collections.ConfigDict(cfg.to_dict())
  cfg.attention = "dense"  # the chunked form's loop body would be counted once
  cfg.conv = "direct"      # the model's FLOPs, not those of Winograd's form of its convolutions (2.25x fewer)
  graphdef, params = nnx.split(abstract(cfg))
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.int32)
  cond = {"pathology": t, "device": t, "box": jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32),
          "mask": jax.ShapeDtypeStruct((1, size, size, 1), jnp.float32), "guidance": jax.ShapeDtypeStruct((1,), jnp.float32)}
  fwd = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c))
  with strided.apart():    # the model's FLOPs: its downsamplers' two convolutions, not their merged form's
    cost = fwd.lower(params, x, t, cond).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"]) * (3.0 if backward else 1.0)
