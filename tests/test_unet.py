"""The BUSGen UNet: official parity, the name mapping of the full model, the importer, shapes of every config,
exactness of the sub-pixel upsampler and of chunked attention."""

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx, traverse_util

from busgen_jax import config_files, official
from busgen_jax.models import unet

TINY = dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, num_groups=8, T=500, dev_num=4)
CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def tiny_ref(shared_dir):
  z = np.load(shared_dir / "reference" / "busgen_unet_tiny.npz")
  return shared_dir / "reference" / "busgen_unet_tiny.npz", {k: z[k] for k in z.files}


def _inputs(ref):
  return [ref[f"input/{k}"] for k in ("x_nchw", "t", "box", "pathology", "device")]


def test_official_parity(tiny_ref):
  path, ref = tiny_ref
  eps = official.load(path, **TINY)
  out = np.asarray(eps(*_inputs(ref)))
  assert np.abs(out - ref["output/eps_nchw"]).max() <= 1e-4


def test_full_model_maps_every_official_name(shared_dir):
  rows = (shared_dir / "reference" / "busgen_unet_full_state_dict.tsv").read_text().split("\n")[1:]
  want = {n: tuple(int(d) for d in s.strip("()").split(",") if d.strip()) for n, s in
          (r.split("\t") for r in rows if r.strip())}
  params = nnx.to_pure_dict(nnx.state(unet.abstract(official.model_config()), nnx.Param))
  flat = traverse_util.flatten_dict(params)
  ours = {official.official_name(p): v.shape for p, v in flat.items()}
  assert set(ours) == set(want)
  assert unet.num_params(params) == sum(int(np.prod(s)) for s in want.values()) == 47_768_835
  # Shapes agree after the layout conversion (zeros stand in for the weights).
  sd = {n: np.zeros(s, np.float32) for n, s in want.items()}
  converted = official.convert_state_dict(sd, official.model_config())
  assert jax.tree.map(np.shape, converted) == jax.tree.map(lambda v: tuple(v.shape), params)


def test_unknown_and_missing_names_are_errors(tiny_ref):
  _, ref = tiny_ref
  sd = {k[len("param/"):]: v for k, v in ref.items() if k.startswith("param/")}
  cfg = official.model_config(**{k: v for k, v in TINY.items()})
  extra = dict(sd, **{"downblocks.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="unknown.*downblocks.0.extra.weight"):
    official.convert_state_dict(extra, cfg)
  missing = {k: v for k, v in sd.items() if k != "head.bias"}
  with pytest.raises(ValueError, match="missing.*head.bias"):
    official.convert_state_dict(missing, cfg)
  with pytest.raises(ValueError, match="shape"):
    official.convert_state_dict(sd, official.model_config(**dict(TINY, dev_num=5)))


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch extra not installed")
def test_import_official_torch_checkpoint(tiny_ref, tmp_path):
  import torch
  _, ref = tiny_ref
  sd = {k[len("param/"):]: torch.from_numpy(v) for k, v in ref.items() if k.startswith("param/")}
  ckpt = tmp_path / "busgen.pt"
  torch.save({"ema_model": sd, "step": 7}, ckpt)
  out = tmp_path / "imported"
  args = [f"--config.{k}={','.join(map(str, v)) if isinstance(v, list) else v}" for k, v in TINY.items()]
  res = subprocess.run([sys.executable, "-m", "busgen_jax.cli", "import-official", "--checkpoint", str(ckpt),
                        "--output", str(out), *args], capture_output=True, text=True)
  assert res.returncode == 0, res.stderr[-3000:]
  eps = official.load(out, **TINY)
  assert np.abs(np.asarray(eps(*_inputs(ref))) - ref["output/eps_nchw"]).max() <= 1e-4
  with pytest.raises(ValueError, match="dev_num|num_devices"):
    official.load(out, **dict(TINY, dev_num=5))
  # Anything that is not plain tensors is refused by the weights-only loader.
  bad = tmp_path / "bad.pt"
  torch.save({"ema_model": sd, "obj": _Evil()}, bad)
  with pytest.raises(ValueError, match="weights-only"):
    official.read_state_dict(bad)


class _Evil:
  pass


def test_transposed_conv_equals_pytorch_semantics():
  """Sub-pixel form == ConvTranspose2d(5, stride 2, padding 2, output_padding 1) by its definition."""
  rng = np.random.default_rng(0)
  layer = unet.TransposedConv(6, 5, rng, None)
  x = jnp.asarray(rng.standard_normal((2, 5, 7, 6)), jnp.float32)
  w_torch = np.asarray(layer.kernel.value)[::-1, ::-1].transpose(2, 3, 0, 1)   # (in, out, kh, kw)
  y = np.zeros((2, 2 * 5 + 4 + 1, 2 * 7 + 4 + 1, 6))                              # full scatter, then crop
  xn = np.asarray(x)
  for i in range(5):
    for j in range(7):
      y[:, 2 * i:2 * i + 5, 2 * j:2 * j + 5] += np.einsum("bc,cokl->bklo", xn[:, i, j], w_torch)
  want = y[:, 2:2 + 10, 2:2 + 14] + np.asarray(layer.bias.value)
  np.testing.assert_allclose(np.asarray(layer(x)), want, atol=1e-5)


def test_downsampler_is_one_5x5_convolution_with_the_same_values_and_gradients(monkeypatch):
  """strided.downsample == c1(x) + c2(x), with the gradients of x and of both layers' parameters, in the phase
  form of the input gradient (up to MAX_CHANNELS, lowered for CPU) and above it; as one convolution in the program;
  LoRA-wrapped layers and `apart()` run the two; flops_per_image counts the two."""
  from busgen_jax.models import lora, strided
  rng = np.random.default_rng(0)
  layer = unet.DownSample(6, rng, None)
  graph, params = nnx.split(layer, nnx.Param)
  apart = lambda p, x: (lambda m: m.c1(x) + m.c2(x))(nnx.merge(graph, p))
  merged = lambda p, x: nnx.merge(graph, p)(x)
  for size, max_channels in [(8, 6), (8, 5), (7, 6)]:   # phase form; XLA's gradient; odd size: XLA's
    monkeypatch.setattr(strided, "MAX_CHANNELS", max_channels)
    x = jnp.asarray(rng.standard_normal((2, size, size + 2, 6)), jnp.float32)
    g = jnp.asarray(rng.standard_normal(apart(params, x).shape), jnp.float32)
    (y, vjp), (want, want_vjp) = jax.vjp(merged, params, x), jax.vjp(apart, params, x)
    np.testing.assert_allclose(y, want, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), vjp(g), want_vjp(g))
  convs = lambda: str(jax.make_jaxpr(lambda p, x: merged(p, x))(params, x)).count("conv_general_dilated")
  assert convs() == 1
  with strided.apart():   # read at trace time: a fresh function (make_jaxpr and jit cache traces)
    assert convs() == 2
  with pytest.raises(ValueError, match="5x5 kernel"):
    strided.conv5x5_s2(x, jnp.zeros((3, 3, 6, 6)))
  lora.inject(layer, lora.default_config())
  assert str(jax.make_jaxpr(lambda x: layer(x))(x)).count("conv_general_dilated") >= 2
  cfg = unet.default_config()
  cfg.update(ch=8, ch_mult=(1, 1), num_res_blocks=1, num_groups=4, attn_levels=(), mid_attn=False)
  with strided.apart():
    apart_flops = unet.flops_per_image(cfg, 8, backward=False)
  assert unet.flops_per_image(cfg, 8, backward=False) == apart_flops


@pytest.mark.parametrize("min_keys", [None, 0])   # autodiff's backward, the written-out one (checkpointed in chunks)
def test_chunked_attention_equals_dense_and_its_gradient(min_keys, monkeypatch):
  if min_keys is not None:
    monkeypatch.setattr(unet, "SOFTMAX_VJP_MIN_KEYS", min_keys)
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 256, 8)) for i in range(3))
  f = lambda impl: lambda q: unet.attention(q, k, v, impl=impl, chunk=64)
  np.testing.assert_allclose(f("chunked")(q), f("dense")(q), atol=1e-5)
  g = lambda impl: jax.grad(lambda q: jnp.sum(f(impl)(q) ** 2))(q)
  np.testing.assert_allclose(g("chunked"), g("dense"), atol=1e-4)


def test_blocked_attention_equals_dense_and_its_gradients():
  """Flash attention's scheme (blocks of queries forward, of keys backward, log-sum-exp saved) against the dense
  form, for q, k and v, with logits large enough that an unstabilised softmax would overflow."""
  q, k, v, g = (jax.random.normal(jax.random.key(i), (2, 256, 8)) * s for i, s in enumerate((4, 4, 1, 1)))
  f = lambda impl: lambda q, k, v: unet.attention(q, k, v, impl=impl, chunk=64)
  out, vjp = jax.vjp(f("blocked"), q, k, v)
  want, want_vjp = jax.vjp(f("dense"), q, k, v)
  np.testing.assert_allclose(out, want, atol=1e-5)
  for got, ref in zip(vjp(g), want_vjp(g)):
    np.testing.assert_allclose(got, ref, atol=1e-4 * float(jnp.max(jnp.abs(ref))))
  assert "scan" in str(jax.make_jaxpr(jax.grad(lambda q: jnp.sum(f("blocked")(q, k, v))))(q))
  with pytest.raises(ValueError, match="not divisible by attention_chunk=96"):
    unet.attention(q, k, v, impl="blocked", chunk=96)


def test_written_out_attention_backward_equals_autodiff():
  """The custom VJP (dS = P * (dP - rowsum(dO * O)), transposes behind barriers) against autodiff of the plain
  softmax form, for q, k and v; and `attention` takes it from SOFTMAX_VJP_MIN_KEYS keys on (on CPU)."""
  def plain(q, k, v):
    w = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) / math.sqrt(q.shape[-1]), axis=-1)
    return jnp.einsum("bqk,bkc->bqc", w, v)
  for L, f in [(96, unet._softmax_attention), (unet.SOFTMAX_VJP_MIN_KEYS, lambda q, k, v: unet.attention(
      q, k, v, impl="dense", chunk=64))]:
    q, k, v, g = (jax.random.normal(jax.random.key(i), (2, L, 8)) for i in range(4))
    out, vjp = jax.vjp(f, q, k, v)
    want, want_vjp = jax.vjp(plain, q, k, v)
    np.testing.assert_allclose(out, want, atol=1e-5)
    for got, ref in zip(vjp(g), want_vjp(g)):
      np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)
  jaxpr = lambda L: jax.make_jaxpr(lambda q: unet.attention(q, q, q, impl="dense", chunk=64))(jnp.zeros((1, L, 4)))
  assert "custom_vjp_call" not in str(jaxpr(unet.SOFTMAX_VJP_MIN_KEYS // 2))
  # From the threshold on both forms are staged out and lowering picks: the written-out one for CPU only.
  at_threshold = jaxpr(unet.SOFTMAX_VJP_MIN_KEYS)
  assert "platform_index" in str(at_threshold)
  (switch,) = [e for e in at_threshold.jaxpr.eqns if e.primitive.name == "cond"]
  assert sorted("custom_vjp_call" in str(b) for b in switch.params["branches"]) == [False, True]


@pytest.mark.parametrize("name", ["busgen_official", "busgen_toy_busi", "phantom_tiny", "busbra_pretrain"])
def test_config_shapes(name):
  cfg = config_files.load(CONFIGS / f"{name}.py")
  S, B = cfg.data.image_size, 2
  model = unet.abstract(cfg.model)
  x = jax.ShapeDtypeStruct((B, S, S, 3), jnp.float32)
  t = jax.ShapeDtypeStruct((B,), jnp.int32)
  cond = {"pathology": t, "device": t, "box": jax.ShapeDtypeStruct((B, S, S, 1), jnp.float32)}
  out = jax.eval_shape(lambda m, x, t, c: m(x, t, c), model, x, t, cond)
  assert out.shape == (B, S, S, 3) and out.dtype == jnp.float32


def test_mask_condition_adds_an_input_channel():
  cfg = official.model_config(**TINY)
  cfg.conditions = ("pathology", "device", "box", "mask")
  model = unet.create(cfg)
  assert model.head.kernel.value.shape[2] == 5
  x = jnp.zeros((1, 16, 16, 3))
  zero = jnp.zeros((1,), jnp.int32)
  base = {"pathology": zero, "device": zero, "box": jnp.zeros((1, 16, 16, 1))}
  a = model(x, zero, {**base, "mask": jnp.zeros((1, 16, 16, 1))})
  b = model(x, zero, {**base, "mask": jnp.ones((1, 16, 16, 1))})
  assert not np.allclose(a, b)
  with pytest.raises(ValueError, match="unknown"):
    cfg.conditions = ("segmentation",)
    unet.create(cfg)


def test_sinusoid_table_interleaves_sin_and_cos():
  tab = unet.sinusoid_table(500, 8)
  t = 123
  np.testing.assert_allclose(tab[t, 0::2], np.sin(t * np.exp(-np.arange(0, 8, 2) / 8 * np.log(1e4))), rtol=1e-5)
  np.testing.assert_allclose(tab[t, 1::2], np.cos(t * np.exp(-np.arange(0, 8, 2) / 8 * np.log(1e4))), rtol=1e-5)
