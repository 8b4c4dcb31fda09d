"""LoRA: zero-initialised adapters leave the model unchanged, merging equals the unmerged model, training
touches adapters only (frozen base bit-for-bit, adapter-only optimizer state), new label rows leave old
labels alone, and adapters round-trip through a small file."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from busgen_jax.models import lora, unet


def tiny():
  c = unet.default_config()
  c.update(ch=16, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, attn_levels=(1,), num_pathology=3,
           num_devices=3, dropout=0.0)
  return c


def inputs(B=2, S=16, pathology=(1, 2), device=(1, 2)):
  rng = np.random.default_rng(0)
  return (jnp.asarray(rng.normal(size=(B, S, S, 3)), jnp.float32), jnp.array([3, 400]),
          {"pathology": jnp.array(pathology), "device": jnp.array(device),
           "box": jnp.zeros((B, S, S, 1))})


def _randomise_b(model):
  """Non-zero B matrices, as after some training."""
  rng = np.random.default_rng(1)
  for _, m in model.iter_modules():
    if isinstance(m, (lora.LoRADense, lora.LoRAConv)):
      m.lora_b.value = jnp.asarray(rng.normal(0, 0.05, m.lora_b.value.shape), jnp.float32)


def test_zero_init_then_merge_equals_unmerged():
  model = unet.create(tiny(), 0)
  x, t, c = inputs()
  before = model(x, t, c)
  wrapped = lora.inject(model, lora.default_config())
  # dense layers, 3x3 convs, the stride-2 3x3 and 5x5 downsampling convs and the 1x1 attention projections
  assert {"time_1", "head", "down/0/conv1", "down/1/c1", "down/1/c2", "down/2/attn/proj_q"} <= set(wrapped)
  np.testing.assert_array_equal(np.asarray(model(x, t, c)), np.asarray(before))   # B = 0: unchanged
  _randomise_b(model)
  adapted = np.asarray(model(x, t, c))
  assert np.abs(adapted - np.asarray(before)).max() > 1e-3
  lora.merge(model)
  assert lora.num_adapter_params(model) == 0
  np.testing.assert_allclose(np.asarray(model(x, t, c)), adapted, atol=2e-5)


def test_training_moves_adapters_only():
  model = unet.create(tiny(), 0)
  cfg = lora.default_config()
  cfg.rank = 4
  cfg.targets = (r".*attn/proj.*", r".*/conv\d", r"time_\d", r"cond_\d")
  cfg.exclude = (r"up/.*",)
  wrapped = lora.inject(model, cfg)
  assert "down/0/conv1" in wrapped and "time_1" in wrapped and "head" not in wrapped
  assert not any(p.startswith("up/") for p in wrapped)
  first_new = lora.extend_labels(model, "device", 2)
  assert first_new == 3
  graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)
  base_before = jax.tree.map(np.asarray, nnx.to_pure_dict(frozen))
  tx = optax.adam(1e-2)
  opt = tx.init(adapters)
  n_adapt = sum(x.size for x in jax.tree.leaves(adapters))
  n_base = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) - n_adapt
  assert sum(x.size for x in jax.tree.leaves(opt)) == 2 * n_adapt + 1   # mu, nu (+ count): adapters only
  assert n_adapt < 0.25 * n_base
  x, t, c = inputs(device=(3, 4))   # the new device rows

  @jax.jit
  def step(adapters, frozen, opt):
    def loss(a):
      return jnp.mean(nnx.merge(graphdef, a, frozen)(x, t, c) ** 2)
    l, g = jax.value_and_grad(loss)(adapters)
    upd, opt = tx.update(g, opt, adapters)
    return optax.apply_updates(adapters, upd), opt, l

  losses = []
  for _ in range(5):
    adapters, opt, l = step(adapters, frozen, opt)
    losses.append(float(l))
  assert losses[-1] < losses[0]
  jax.tree.map(np.testing.assert_array_equal, base_before, jax.tree.map(np.asarray, nnx.to_pure_dict(frozen)))
  moved = nnx.to_pure_dict(adapters)
  assert any(np.abs(np.asarray(v)).max() > 0 for v in jax.tree.leaves(moved))


def test_new_label_rows_leave_old_labels_unchanged():
  model = unet.create(tiny(), 0)
  x, t, c = inputs(pathology=(1, 2), device=(1, 2))
  before = np.asarray(model(x, t, c))
  lora.extend_labels(model, "pathology", 3)
  lora.extend_labels(model, "device", 1)
  np.testing.assert_array_equal(np.asarray(model(x, t, c)), before)
  _, _, c_new = inputs(pathology=(3, 5), device=(3, 0))
  assert np.isfinite(np.asarray(model(x, t, c_new))).all()
  with pytest.raises(ValueError, match="already"):
    lora.extend_labels(model, "device", 1)


def test_adapters_round_trip_and_targets_are_checked(tmp_path):
  model = unet.create(tiny(), 0)
  lora.inject(model, lora.default_config())
  lora.extend_labels(model, "device", 2)
  _randomise_b(model)
  lora.save_adapters(tmp_path / "adapters", model, lora.default_config())
  from busgen_jax.train import checkpoint
  saved = checkpoint.load_params(tmp_path / "adapters", which="params")   # adapters and new rows, no base
  assert sum(x.size for x in jax.tree.leaves(saved)) == lora.num_adapter_params(model)
  other = unet.create(tiny(), 0)
  lora.inject(other, lora.default_config())
  with pytest.raises(ValueError, match="do not fit"):
    lora.load_adapters(tmp_path / "adapters", other)       # the device table was not extended
  lora.extend_labels(other, "device", 2)
  lora.load_adapters(tmp_path / "adapters", other)
  x, t, c = inputs()
  np.testing.assert_array_equal(np.asarray(other(x, t, c)), np.asarray(model(x, t, c)))
  bad = lora.default_config()
  bad.targets = ("nothing_matches",)
  with pytest.raises(ValueError, match="match no"):
    lora.inject(unet.create(tiny(), 0), bad)

