"""LoRA: zero-initialised adapters leave the model unchanged, merging equals the unmerged model, training
touches adapters only (frozen base bit-for-bit, adapter-only optimizer state), new label rows leave old
labels alone, and adapters round-trip through a small file. `busgen-jax adapt`: k-shot case-level subsets,
validation loss goes down, sharded adaptation on 8 devices, resume, generation from the adapted model."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from busgen_jax.models import card, lora, strided, unet


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
  with strided.apart():     # wrapped, the downsampler's two convolutions run apart: the same sums, bit for bit
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


def test_folded_kernel_equals_branch():
  """fold="kernel" (one conv with W + delta: the CPU default) and fold="branch" (the rank-r path beside the base)
  give the same outputs and adapter gradients; adapter dropout always takes the branch. "auto" stages out both and
  lowering picks: on this CPU it is the folded kernel."""
  x, t, c = inputs()
  forms, staged = {}, {}
  for fold in ("kernel", "branch", "auto"):
    model = unet.create(tiny(), 0)
    cfg = lora.default_config()
    cfg.update(rank=4, fold=fold, dropout=0.5)
    lora.inject(model, cfg)
    _randomise_b(model)
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    loss = lambda a: jnp.mean(nnx.merge(graphdef, a, rest)(x, t, c) ** 2)
    grads = jax.grad(loss)(adapters)
    staged[fold] = "platform_index" in str(jax.make_jaxpr(loss)(adapters))

    def dropped(a):
      with lora.dropout(jax.random.PRNGKey(3)):
        return nnx.merge(graphdef, a, rest)(x, t, c)

    forms[fold] = (model(x, t, c), nnx.to_pure_dict(grads), jax.jit(dropped)(adapters))
  (y_k, g_k, d_k), (y_b, g_b, d_b), (y_a, g_a, _) = forms["kernel"], forms["branch"], forms["auto"]
  assert staged == {"kernel": False, "branch": False, "auto": True}
  np.testing.assert_allclose(np.asarray(y_a), np.asarray(y_k), rtol=1e-6, atol=1e-7)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-9), g_a, g_k)
  np.testing.assert_allclose(np.asarray(y_k), np.asarray(y_b), atol=2e-5)
  scale = max(float(np.abs(np.asarray(g)).max()) for g in jax.tree.leaves(g_b))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4 * scale), g_k, g_b)
  np.testing.assert_array_equal(np.asarray(d_k), np.asarray(d_b))
  assert np.abs(np.asarray(d_k) - np.asarray(y_b)).max() > 1e-3          # dropout was on
  bad = lora.default_config()
  bad.fold = "merged"
  with pytest.raises(ValueError, match="lora.fold"):
    lora.inject(unet.create(tiny(), 0), bad)


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
  from busgen_jax import checkpoint
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



def test_dropout_only_inside_the_training_context_and_merge_of_extended_tables():
  model = unet.create(tiny(), 0)
  x, t, c = inputs()
  cfg = lora.default_config()
  cfg.dropout = 0.5
  lora.inject(model, cfg)
  lora.extend_labels(model, "pathology", 2)
  _randomise_b(model)
  plain = np.asarray(model(x, t, c))
  with lora.dropout(jax.random.PRNGKey(0)):
    dropped = np.asarray(model(x, t, c))
    again = np.asarray(model(x, t, c))
  with lora.dropout(jax.random.PRNGKey(1)):
    other = np.asarray(model(x, t, c))
  np.testing.assert_array_equal(dropped, again)               # the key decides the mask
  assert np.abs(dropped - plain).max() > 1e-4 and np.abs(other - dropped).max() > 1e-4
  np.testing.assert_array_equal(np.asarray(model(x, t, c)), plain)   # outside the context: no dropout
  _, _, c_new = inputs(pathology=(3, 4))
  before_new = np.asarray(model(x, t, c_new))
  assert lora.table_rows(model) == {"num_pathology": 5, "num_devices": 3}
  lora.merge(model)                                           # a plain UNet with a 5-row pathology table
  assert isinstance(model.pathology_table, unet.Embedding) and lora.num_adapter_params(model) == 0
  merged_cfg = tiny()
  merged_cfg.num_pathology = 5
  fresh = unet.create(merged_cfg, 1)
  nnx.update(fresh, nnx.state(model, nnx.Param))
  np.testing.assert_allclose(np.asarray(fresh(x, t, c_new)), before_new, atol=2e-5)
  np.testing.assert_allclose(np.asarray(fresh(x, t, c)), plain, atol=2e-5)


# ------------------------------------------------------------------------------------------------ busgen-jax adapt

@pytest.fixture(scope="module")
def adapted(tmp_path_factory):
  """A tiny BUSGen pretrained on phantom pathology labels from two devices, then adapted to histology (cyst vs
  fibroadenoma, classes it never saw) with 8 shots per class from all three devices (the third gets a new device
  row), on 8 simulated devices with the frozen base sharded over fsdp=4."""
  from helpers import convert_config, tiny_diffusion_config
  from busgen_jax.data import convert
  from busgen_jax.train import adapt, diffusion
  root = tmp_path_factory.mktemp("adapt")
  data = convert.convert(convert_config("phantom", "", root / "data", **{
      "phantom.num_examples": 240, "phantom.size": 32}))
  d = tiny_diffusion_config(data, 30)
  d.data.sources.real.filters.device = ["Phantom-L14", "Phantom-L9"]   # the third device stays new
  d.data.device_vocab = ("Phantom-L14", "Phantom-L9")
  d.optim.update(lr=2e-3, warmup_steps=5, ema_decay=0.9)
  d.update(sample_every=15, num_samples=4)            # sample grids in TensorBoard (read back below)
  d.sampler.update(method="multistep", order=2, steps=3)
  diffusion.train(d, root / "base")
  a = adapt_config(root / "base" / "checkpoints", data)
  summary = adapt.adapt(a, root / "adapt")
  return {"root": root, "data": data, "config": a, "summary": summary, "work": root / "adapt"}


def adapt_config(base, data):
  from busgen_jax.train import adapt
  a = adapt.default_config()
  a.base, a.data.path = str(base), str(data)
  a.data.shots, a.data.val_per_class, a.data.batch_size = 8, 8, 8
  a.num_steps, a.eval_every, a.log_every, a.checkpoint_every = 24, 12, 12, 12
  a.update(sample_every=12, num_samples=4)            # the adapted model's sample grids in TensorBoard
  a.sampler.update(method="multistep", order=2, steps=3)
  a.lora.update(rank=4, dropout=0.1)
  a.task.pathology = (("cyst", "benign"), ("fibroadenoma", "benign"))
  a.mesh = {"data": 2, "fsdp": 4}
  return a


def test_prior_preservation_mixes_the_bases_images_at_its_weight(adapted, tmp_path):
  """prior.weight of every batch comes from the base's training data (its devices only), the rest from the shots;
  the settings that cannot work are refused before anything runs."""
  from busgen_jax.data import pipeline, reader
  from busgen_jax.train import adapt
  ds = reader.open_dataset(adapted["data"])
  labels, names = pipeline.scan_labels(ds, "train"), ds.vocab("device")
  known = ("Phantom-L14", "Phantom-L9")                  # the base's devices; the shots come from another
  site = [d for d in names if d.startswith("Phantom") and d not in known][0]
  a = adapt_config(adapted["root"] / "base" / "checkpoints", adapted["data"])
  a.task.update(field="pathology", classes=("benign", "malignant"), rows="existing", pathology=())
  a.data.shot_indices = tuple(int(i) for p in (1, 2) for i in np.flatnonzero(
      (labels["device"] == names.index(site)) & (labels["pathology"] == p))[:4])
  a.prior.update(path=str(adapted["data"]), split="train", weight=0.5, devices=known)
  a.update(num_steps=2, eval_every=2, checkpoint_every=2, sample_every=0)
  pipe = pipeline.build(adapt.data_config(a, adapt.Setup(a)))
  seen = np.concatenate([pipe.batches[i]["device"] for i in range(16)])
  from_site = np.mean([pipe.vocab["device"][d] == site for d in seen])
  assert 0.3 < from_site < 0.7, from_site
  assert {pipe.vocab["device"][d] for d in seen} == {site, *known}
  s = adapt.adapt(a, tmp_path / "prior")
  assert np.isfinite(s["val_loss_best"])
  for bad, match in (({"prior.weight": 1.0}, r"\[0, 1\)"), ({"prior.path": ""}, "prior.path"),
                     ({"task.rows": "new"}, "task.rows=existing")):
    b = ml_collections.ConfigDict(a.to_dict())
    b.update_from_flattened_dict(bad)
    with pytest.raises(ValueError, match=match):
      adapt.Setup(b)


def test_adaptation_lowers_validation_loss_with_a_frozen_sharded_base(adapted):
  from busgen_jax.data import reader
  from busgen_jax import checkpoint
  from busgen_jax.train import adapt
  s, work = adapted["summary"], adapted["work"]
  assert s["val_loss_best"] < s["val_loss_start"]             # held-out images, fixed (t, noise)
  assert s["new_rows"] == {"pathology": 2, "device": 1} and s["adapter_params"] < 0.25 * s["frozen_params"]
  history = json.loads((work / "val_history.json").read_text())
  assert [h["step"] for h in history] == [0, 12, 24] and all("val_loss/cyst" in h for h in history)

  # k per class from whole cases, validation from other cases, reproducible from the seed.
  _, meta = checkpoint.load_meta(work / adapt.ADAPTERS)
  ds = reader.open_dataset(adapted["data"])
  shots = meta["data"]["shots"]
  assert {k: len(v) for k, v in shots.items()} == {"cyst": 8, "fibroadenoma": 8}
  train_cases = ds.case_ids("train")
  shot_cases = {train_cases[i] for v in shots.values() for i in v}
  val_cases = {ds.case_ids("val")[i] for v in meta["data"]["val"].values() for i in v}
  assert not shot_cases & val_cases
  again = adapt.select(ds, "train", "histology", ["cyst", "fibroadenoma"], 8, 0)
  assert {k: v.tolist() for k, v in again.items()} == shots
  # whole_cases: every view of a case before the next case, so the shots use up as few cases as they can
  whole = adapt.select(ds, "train", "histology", ["cyst", "fibroadenoma"], 8, 0, whole_cases=True)
  for c, v in whole.items():
    used = {train_cases[i] for i in v}
    views = {case: int((train_cases == case).sum()) for case in used}
    assert len(used) <= len({train_cases[i] for i in shots[c]})
    assert sum(views.values()) - len(v) < max(views.values())   # only the last case may be cut short
  histology = ds.vocab("histology")
  labels = adapt.pipeline.scan_labels(ds, "train")["histology"]
  assert all(histology[labels[i]] == k for k, v in shots.items() for i in v)

  # Only adapters (and the new rows) are in the train state: optimizer state = 2 x adapters (+ counters).
  step, state = _restore_state(work, adapted["config"])
  n_adapt = sum(x.size for x in jax.tree.leaves(state["params"]))
  assert n_adapt == s["adapter_params"]
  assert 2 * n_adapt <= sum(x.size for x in jax.tree.leaves(state["opt_state"])) <= 2 * n_adapt + 8

  # The merged model: the base's untouched parameters (norms, biases, old label rows) equal it bit for bit.
  base = checkpoint.load_params(adapted["root"] / "base" / "checkpoints")
  merged = checkpoint.load_params(work / adapt.MERGED)
  flat_base = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(base)}
  flat_merged = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(merged)}
  assert set(flat_base) == set(flat_merged)
  same = [k for k in flat_base if not k.endswith("['kernel']") and "table" not in k]
  assert len(same) > 20
  for k in same:
    np.testing.assert_array_equal(flat_merged[k], flat_base[k], err_msg=k)
  table = "['pathology_table']['embedding']"
  np.testing.assert_array_equal(flat_merged[table][:4], flat_base[table])
  assert flat_merged[table].shape[0] == 6
  devices = "['device_table']['embedding']"
  np.testing.assert_array_equal(flat_merged[devices][:7], flat_base[devices])
  vocab = card.Card.from_meta(meta).vocab
  assert flat_merged[devices].shape[0] == 8 and vocab["device"][7] == "Phantom-L12-SRI"
  assert vocab["pathology"][4:] == ["cyst", "fibroadenoma"]


def _restore_state(work, cfg):
  from busgen_jax import checkpoint
  from busgen_jax.train import adapt
  setup = adapt.Setup(cfg)
  ck = checkpoint.Checkpointer(work / "checkpoints", async_save=False)
  step = ck.latest_step()
  state, _ = ck.restore(step, setup.abstract_state)
  ck.close()
  frozen_sharded = [x for x in jax.tree.leaves(setup.frozen) if not x.sharding.is_fully_replicated]
  assert frozen_sharded                                       # fsdp=4 shards the frozen base
  return step, state


def test_tensorboard_holds_the_scalars_and_sample_grids(adapted):
  from helpers import tensorboard
  scalars, images = tensorboard(adapted["root"] / "base")            # pretraining
  for tag in ("loss", "lr", "grad_norm", "images_per_sec", "steps_per_sec"):
    assert tag in scalars and all(np.isfinite(v) for _, v in scalars[tag]), tag
  assert [s for s, _ in scalars["loss"]] == list(range(d := scalars["loss"][0][0], 31, d))
  lrs = [v for _, v in scalars["lr"]]                                # the schedule: warmup to 2e-3, then decay
  assert 1e-3 < max(lrs) <= 2e-3 * (1 + 1e-6) and lrs[-1] < max(lrs)
  assert [s for s, _, _ in images["samples"]] == [15, 30]
  assert images["samples"][0][1:] == (32, 32)                        # a 2 x 2 grid of 16 px samples
  scalars, images = tensorboard(adapted["work"])                     # adaptation
  for tag in ("loss", "lr", "grad_norm", "images_per_sec", "val_loss", "val_loss/cyst"):
    assert tag in scalars, tag
  assert [s for s, _ in scalars["val_loss"]] == [0, 12, 24]          # from the starting point on
  assert [s for s, _, _ in images["samples"]] == [12, 24] and images["samples"][0][1:] == (32, 32)


# adapt runs train/loop.py's resume, which CI checks bit-exact in test_train (crash) and in test_distill.
@pytest.mark.slow
def test_adaptation_resumes_to_the_same_adapters(adapted, tmp_path):
  from busgen_jax import checkpoint
  from busgen_jax.train import adapt, loop
  cfg = adapted["config"]
  with pytest.raises(loop.SimulatedCrash):
    adapt.adapt(cfg, tmp_path, stop_after=13)                 # dies after the step-12 checkpoint
  adapt.adapt(cfg, tmp_path)
  a = checkpoint.load_params(tmp_path / "checkpoints", which="params")
  b = checkpoint.load_params(adapted["work"] / "checkpoints", which="params")
  jax.tree.map(np.testing.assert_array_equal, a, b)
  assert json.loads((tmp_path / "val_history.json").read_text()) == \
      json.loads((adapted["work"] / "val_history.json").read_text())
  took = json.loads((tmp_path / adapt.SUMMARY).read_text())["seconds"]
  assert took > 0 and adapt.adapt(cfg, tmp_path)["seconds"] == took   # a rerun of a finished one keeps its time


def test_generation_from_adapters_and_from_the_merged_checkpoint(adapted, tmp_path):
  import hashlib
  from busgen_jax import generate
  from busgen_jax.data import reader
  from busgen_jax.train import adapt
  work = adapted["work"]
  images = {}
  for kind in ("merged", "adapters"):
    g = generate.default_config()
    if kind == "merged":
      g.checkpoint = str(work / adapt.MERGED)
    else:
      g.adapters = str(work / adapt.ADAPTERS)                 # merged in memory onto the recorded base
    g.box_prior = str(work / adapt.BOX_PRIOR)
    g.device = ("Phantom-L12-SRI",)                          # the device the base never saw
    g.num_per_condition = 2
    g.sampler.update(method="multistep", order=2, steps=3)
    g.per_device_batch = 1
    ds_dir = generate.generate(g, tmp_path / kind)
    ds = reader.open_dataset(ds_dir)
    recs = ds.records("train")
    exs = [ds.decode(recs[i]) for i in range(len(recs))]
    images[kind] = [hashlib.sha256(e["image"].tobytes()).hexdigest() for e in exs]
    # The default grid is the task's classes; records carry them in their field and the mapped pathology.
    assert [ds.vocab("histology")[e["histology"]] for e in exs] == ["cyst"] * 2 + ["fibroadenoma"] * 2
    assert all(ds.vocab("pathology")[e["pathology"]] == "benign" and len(e["boxes"]) == 1 for e in exs)
    assert all(ds.vocab("device")[e["device"]] == "Phantom-L12-SRI" for e in exs)
  assert images["merged"] == images["adapters"]


def test_devices_held_out_of_training_count_as_new():
  from busgen_jax.models.card import untrained_devices
  filt = lambda *devices: {"filters": {"device": list(devices)}}
  vocab = ["unknown", "GE", "Toshiba"]
  assert untrained_devices({"data": {"sources": {"real": filt("unknown", "GE")}}}, vocab) == {"Toshiba"}
  assert untrained_devices({"data": {"sources": {"real": filt()}}}, vocab) == set()   # no filter: all seen
  assert untrained_devices({}, vocab) == set()                                         # imported models
  assert untrained_devices({"data": {"sources": {"a": filt("GE"), "b": filt("Toshiba")}}}, vocab) == set()

