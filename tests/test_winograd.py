"""Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions (models/winograd.py): values and both gradients against XLA's
convolution, where conv_general_dilated takes the form, and a UNet with model.conv=winograd(4) against the direct
one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from busgen_jax.models import unet, winograd

DN = ("NHWC", "HWIO", "NHWC")


def _direct(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


@pytest.mark.parametrize("tile,shape", [(2, (2, 6, 8, 5, 7)), (2, (1, 2, 2, 3, 1)), (4, (2, 8, 12, 5, 7)),
                                        (4, (1, 4, 4, 3, 1))])
def test_conv3x3_and_its_gradients_equal_xla(tile, shape):
  N, H, W, I, O = shape
  rng = np.random.default_rng(0)
  x, dy = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in ((N, H, W, I), (N, H, W, O)))
  w = jnp.asarray(rng.standard_normal((3, 3, I, O)), jnp.float32)
  y, vjp = jax.vjp(lambda x, w: winograd.conv3x3(x, w, tile), x, w)
  want, want_vjp = jax.vjp(_direct, x, w)
  # F(4x4)'s coefficients (4, 5, 8, 1/6, 1/24) round to ~1e-5 of the largest value; F(2x2)'s to ~1e-6.
  scaled = {2: 0, 4: 3e-5}[tile]
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=max(1e-5, scaled * float(jnp.max(jnp.abs(want)))))
  for got, ref in zip(vjp(dy), want_vjp(dy)):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=max(1e-4, scaled * float(jnp.max(jnp.abs(ref)))))


@pytest.mark.parametrize("tile", [2, 4])
def test_transposed_transforms_are_the_transforms_transposes(tile):
  """The backward pass's overlap-add and dy transform are the linear transposes of the forward's two transforms."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 8, 12, 3)), jnp.float32)
  tiles = winograd._input_tiles(x, tile)
  t = jnp.asarray(rng.standard_normal(tiles.shape), jnp.float32)
  want, = jax.linear_transpose(lambda x: winograd._input_tiles(x, tile), x)(t)
  np.testing.assert_allclose(winograd._input_tiles_transposed(t, x.shape[:3], tile), want, rtol=1e-6, atol=1e-5)
  want, = jax.linear_transpose(lambda t: winograd._output_tiles(t, x.shape[:3], tile), t)(x)
  np.testing.assert_allclose(winograd._output_tiles_transposed(x, tile), want, rtol=1e-6, atol=1e-5)


def _applies(lhs=(2, 32, 32, 128), rhs=(3, 3, 128, 128), dtype=jnp.float32, strides=(1, 1),
             padding=((1, 1), (1, 1)), dilation=None, groups=1, dn=DN, tile=2):
  return winograd.applies(lhs, rhs, dtype, strides, padding, None, dilation, dn, groups, tile=tile)


def test_applies_only_where_the_form_pays():
  assert _applies()
  assert _applies(lhs=(1, 64, 32, 256), rhs=(3, 3, 256, 512))
  assert _applies(lhs=(2, 16, 16, 128)) and not _applies(lhs=(2, 8, 8, 128))   # MIN_PIXELS
  assert not _applies(lhs=(2, 32, 32, 64), rhs=(3, 3, 64, 128))     # below MIN_CHANNELS
  assert not _applies(rhs=(3, 3, 128, 3))
  assert not _applies(lhs=(2, 33, 32, 128))                         # odd height
  assert _applies(lhs=(2, 36, 32, 128), tile=4) and not _applies(lhs=(2, 34, 32, 128), tile=4)
  assert not _applies(rhs=(5, 5, 128, 128))
  assert not _applies(strides=(2, 2))
  assert not _applies(padding=((0, 0), (0, 0))) and not _applies(padding="SAME")
  assert not _applies(dilation=(2, 2))
  assert not _applies(dtype=jnp.bfloat16)
  assert not _applies(dn=("NCHW", "OIHW", "NCHW"), lhs=(2, 128, 32, 32), rhs=(128, 128, 3, 3))


def test_conv_general_dilated_is_winograd_on_cpu_only_where_it_applies():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, 32, 32, 128)), jnp.float32) * 0.1
  w = jnp.asarray(np.random.default_rng(1).standard_normal((3, 3, 128, 128)), jnp.float32) * 0.03
  conv = lambda x, w: winograd.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)
  # Both forms are staged out and lowering picks Winograd's for CPU only (an AOT compile for TPU gets XLA's).
  jaxpr = jax.make_jaxpr(conv)(x, w)
  (switch,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "cond"]
  assert "platform_index" in str(jaxpr)
  assert sorted("custom_vjp_call" in str(b) for b in switch.params["branches"]) == [False, True]
  assert "cond" not in str(jax.make_jaxpr(conv)(x[:, :8, :8], w))
  loss = lambda f: jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(f(x, w) ** 2), argnums=(0, 1)))
  (got, got_grads), (want, want_grads) = loss(conv)(x, w), loss(_direct)(x, w)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for a, b in zip(got_grads, want_grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  compiled = lambda f: jax.jit(f).lower(x, w).compile().as_text()       # resolved when lowered for this CPU
  assert " convolution(" in compiled(_direct) and " convolution(" not in compiled(conv)


@pytest.mark.parametrize("conv", ["winograd", "winograd4"])
def test_unet_with_winograd_convolutions_equals_direct(conv):
  """A UNet whose 128-channel convolutions at 32x32 and 16x16 (res blocks, upsampler) take the Winograd form: the same
  parameters, output and gradients within f32 rounding."""
  cfg = unet.default_config()
  cfg.update(ch=128, ch_mult=(1, 1), num_res_blocks=1, attn_levels=(), mid_attn=False, dropout=0.0,
             num_devices=4)
  B, S = 1, 32
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((B, S, S, 3)), jnp.float32)
  cond = {"pathology": jnp.asarray([1]), "device": jnp.asarray([2]), "box": jnp.zeros((B, S, S, 1))}
  out = {}
  for mode in ("direct", conv):
    cfg.conv = mode
    graphdef, params, rest = nnx.split(unet.UNet(cfg, seed=0), nnx.Param, ...)
    f = lambda p: jnp.mean(nnx.merge(graphdef, p, rest)(x, jnp.asarray([7]), cond) ** 2)
    out[mode] = (params, *jax.jit(jax.value_and_grad(f))(params))
  (p0, l0, g0), (p1, l1, g1) = out["direct"], out[conv]
  jax.tree.map(np.testing.assert_array_equal, p0, p1)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g0))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4 * scale), g0, g1)
  # bench's model FLOPs stay the model's, not the 2.25x fewer multiplies of Winograd's form.
  winograd_flops = unet.flops_per_image(cfg, S)
  cfg.conv = "direct"
  assert winograd_flops == unet.flops_per_image(cfg, S)


def test_unknown_conv_is_a_config_error():
  cfg = unet.default_config()
  cfg.conv = "fft"
  with pytest.raises(ValueError, match="model.conv must be one of direct, winograd"):
    unet.check_config(cfg)
