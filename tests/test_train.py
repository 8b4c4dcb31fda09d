"""Diffusion training: loss decreases, sharded == single device, crash + resume is exact (data iterator
included), restore onto another mesh, the non-finite guard, classifier-free dropout, and 2 processes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from busgen_jax import checkpoint, parallel
from busgen_jax.data import convert, pipeline
from busgen_jax.diffusion import objectives, schedule
from busgen_jax.train import diffusion, loop
from helpers import convert_config, run_two_processes


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
  out = tmp_path_factory.mktemp("train_data")
  return convert.convert(convert_config("phantom", "", out, **{"phantom.num_examples": 80, "phantom.size": 32}))


def tiny_config(data_path, **overrides):
  """The tests' model (one resolution: a third of the compile of two) on data 4 x fsdp 2. A constant learning rate
  after warm-up keeps num_steps out of the compiled step, so runs of different lengths share one program."""
  c = diffusion.default_config()
  c.num_steps, c.log_every, c.checkpoint_every = 6, 2, 2
  c.data.sources.real.path = str(data_path)
  c.data.image_size, c.data.batch_size = 16, 8
  c.model.update(ch=16, ch_mult=(1,), num_res_blocks=1, num_groups=4, attn_levels=(0,), num_pathology=4,
                 num_devices=7, dropout=0.0)
  c.optim.update(lr=2e-3, warmup_steps=2, ema_decay=0.9, schedule="constant")
  c.mesh = {"data": 4, "fsdp": 2}
  c.update_from_flattened_dict(overrides)
  return c


def _batch(setup, cfg, n=1):
  p = pipeline.build(cfg.data)
  it = iter(p)
  try:
    out = [parallel.global_batch({k: b[k] for k in setup.batch_keys}, setup.mesh, setup.rules)
           for b in (next(it) for _ in range(n))]
  finally:
    it.close()
  return out


def _steps(setup, state, batches):
  """Steps inside the mesh context, as loop.run does: the program diffusion.train compiles, and its cache entry
  (outside the context the same step lowers to another cache key)."""
  metrics = []
  with jax.set_mesh(setup.mesh):
    for batch in batches:
      state, m = setup.train_step(state, batch)
      metrics.append(m)
  return state, metrics


def test_loss_goes_down(phantom):
  cfg = tiny_config(phantom, num_steps=60)
  setup = diffusion.Setup(cfg)
  state = setup.init_state(0)
  _, metrics = _steps(setup, state, _batch(setup, cfg, 60))
  losses = [float(m["loss"]) for m in metrics]
  assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5]), losses


def test_sharded_step_equals_single_device(phantom):
  # Two resolutions: the down- and upsampling paths resharded too.
  cfg = tiny_config(phantom, **{"model.ch_mult": (1, 2), "model.attn_levels": (1,)})
  one = diffusion.Setup(cfg, mesh=parallel.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1]))
  eight = diffusion.Setup(cfg)
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(eight.state_shardings["params"]))
  results = []
  for setup in (one, eight):
    state, metrics = _steps(setup, setup.init_state(0), _batch(setup, cfg, 2))
    results.append((float(metrics[-1]["loss"]), jax.device_get(state["params"])))
  assert results[0][0] == pytest.approx(results[1][0], rel=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), results[0][1], results[1][1])


def reference_config(data_path, **overrides):
  """10 steps: the uninterrupted run that the crash and preemption tests compare with."""
  return tiny_config(data_path, num_steps=10, **overrides)


@pytest.fixture(scope="module")
def uninterrupted(phantom, tmp_path_factory):
  """One uninterrupted reference run, shared by the crash test and the two-process preemption test (both resume
  into the same compiled program)."""
  work = tmp_path_factory.mktemp("uninterrupted")
  diffusion.train(reference_config(phantom), work)
  return work / "checkpoints"


def test_crash_and_resume_equals_uninterrupted_run(phantom, uninterrupted, tmp_path):
  cfg = reference_config(phantom)
  with pytest.raises(loop.SimulatedCrash):
    diffusion.train(cfg, tmp_path / "b", stop_after=3)
  assert checkpoint.Checkpointer(tmp_path / "b" / "checkpoints").latest_step() == 2   # mid-epoch
  diffusion.train(cfg, tmp_path / "b")
  for which in ("params", "ema"):
    a = checkpoint.load_params(uninterrupted, which=which)
    b = checkpoint.load_params(tmp_path / "b" / "checkpoints", which=which)
    jax.tree.map(np.testing.assert_array_equal, a, b)

  # The same checkpoint restores onto a different mesh (data 2 x fsdp 4), sharded as that mesh asks.
  other = diffusion.Setup(cfg, mesh=parallel.make_mesh({"data": 2, "fsdp": 4}))
  ck = checkpoint.Checkpointer(uninterrupted)
  state, meta = ck.restore(10, other.abstract_state)
  ck.close()
  assert meta["card"]["vocab"]["pathology"][:3] == ["unknown", "benign", "malignant"]
  # The training images' mean grey level, where sampling starts: the pipeline's own first images.
  first = pipeline.image_means(pipeline.build(cfg.data), cfg.start_stats_images)
  assert meta["card"]["image_mean"]["all"] == pytest.approx(
      [first["means"].mean(), first["means"].std(), len(first["means"])])
  assert -1 < meta["card"]["image_mean"]["all"][0] < 1 and meta["card"]["image_mean"]["device"]
  kernel = state["params"]["down"][0]["conv1"]["kernel"]
  assert kernel.sharding.spec[-1] == "fsdp"
  a = checkpoint.load_params(uninterrupted, which="params")
  np.testing.assert_array_equal(np.asarray(kernel), a["down"][0]["conv1"]["kernel"])
  state, (m,) = _steps(other, state, _batch(other, cfg))
  assert int(state["step"]) == 11 and np.isfinite(float(m["loss"]))


def test_non_finite_stops_and_keeps_the_last_good_checkpoint(phantom, tmp_path):
  cfg = tiny_config(phantom, **{"checkpoint_every": 1, "optim.lr": 1e35, "optim.grad_clip": 0.0,
                                "optim.warmup_steps": 1})
  with pytest.raises(loop.NonFiniteError, match="last good checkpoint"):
    diffusion.train(cfg, tmp_path)
  ck = checkpoint.Checkpointer(tmp_path / "checkpoints")
  last = ck.latest_step()
  ck.close()
  assert last is not None and last < cfg.num_steps
  params = checkpoint.load_params(tmp_path / "checkpoints", which="params")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_classifier_free_dropout_modes():
  cond = {"pathology": jnp.arange(1, 65) % 3 + 1, "box": jnp.ones((64, 4, 4, 1))}
  for seed in range(20):
    out = objectives.drop_conditions(cond, jax.random.key(seed), 0.5, "batch")
    dropped = np.asarray(out["pathology"]) == 0
    assert dropped.all() or not dropped.any()            # the whole batch at once (official)
    assert (np.asarray(out["box"]).reshape(64, -1).max(1) == 0).tolist() == dropped.tolist()
  out = objectives.drop_conditions(cond, jax.random.key(0), 0.5, "example")
  frac = np.mean(np.asarray(out["pathology"]) == 0)
  assert 0.25 < frac < 0.75
  kept = np.asarray(out["pathology"]) != 0
  np.testing.assert_array_equal(np.asarray(out["pathology"])[kept], np.asarray(cond["pathology"])[kept])
  assert (np.asarray(out["box"])[~kept] == 0).all() and (np.asarray(out["box"])[kept] == 1).all()


def test_two_processes_train_then_sigterm_to_one_saves_the_same_step_and_resumes_on_one(phantom, uninterrupted,
                                                                                         tmp_path):
  """2 CPU processes x 2 devices with jax.distributed: a global batch from both processes' slices and sharded
  training steps, until a preemption notice reaches one host of the two: JAX's preemption sync has both save the
  same step (with each process's data-iterator state) and exit 0. One process on another mesh (data 4 x fsdp 2)
  then resumes it; the data goes on at the next global batch, so the run ends where an uninterrupted 1-process
  run does (to float tolerance: the two meshes reduce in different orders)."""
  cfg = tiny_config(phantom, num_steps=10, checkpoint_every=100, async_checkpoints=False)
  cfg.mesh = {"data": 2, "fsdp": 2}
  out = run_two_processes("train_preempted", cfg.to_json(), tmp_path / "run", tmp_path)
  assert all(o["global_shape"] == [8, 16, 16, 3] and o["local_rows"] == 4 for o in out)
  for o in out:  # each process holds its own rows of the global batch
    assert o["mine"] == o["local_pathology"]
  saved = {o["latest"] for o in out}
  assert len(saved) == 1, out
  step = saved.pop()
  assert 3 <= step < 10, out                                        # after the notice, before the end
  assert len(list((tmp_path / "run" / "checkpoints" / str(step) / "data").iterdir())) >= 2   # one per process

  one = reference_config(phantom, checkpoint_every=100)
  diffusion.train(one, tmp_path / "run")                            # resumed on one process
  assert checkpoint.load_meta(tmp_path / "run" / "checkpoints")[1]["data_offset"] == step   # where 2 processes stopped
  # Adam moves every weight by up to ~lr a step whatever its gradient's size, so where a gradient is near zero the
  # meshes' different reduction orders can tip an update by a few percent of lr (seen: 2.4e-5 at lr 2e-3); a
  # batch skipped or repeated on resume moves weights by ~lr. The tolerance sits between: lr / 20.
  for which in ("params", "ema"):
    a = checkpoint.load_params(tmp_path / "run" / "checkpoints", which=which)
    b = checkpoint.load_params(uninterrupted, which=which)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=one.optim.lr / 20), a, b)


def test_mean_weight_adds_the_weighted_error_of_each_images_mean_and_nothing_else():
  sched = schedule.Schedule.from_config(schedule.default_config())
  x0 = jax.random.normal(jax.random.key(0), (3, 8, 8, 3))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  t = jnp.array([0, 250, 499])
  offset = jnp.array([0.1, -0.2, 0.3])[:, None, None, None] * jnp.ones((1, 1, 1, 3))
  pattern = jnp.where(jnp.arange(8)[None, :, None, None] % 2 == 0, 0.05, -0.05) * jnp.ones((3, 1, 8, 3))
  c = objectives.default_config()

  def loss(mean_weight, error):   # an eps "network" that is exact but for `error`
    c.mean_weight = mean_weight
    return np.asarray(objectives.per_example_loss(lambda x, tt, cond: noise + error, x0, {}, t, noise, sched, c))

  # a DC error d adds mean_weight * H * W * d^2; a zero-mean error adds nothing
  np.testing.assert_allclose(loss(0.5, offset) - loss(0.0, offset), 0.5 * 64 * np.array([0.01, 0.04, 0.09]),
                             rtol=1e-5)
  np.testing.assert_allclose(loss(0.5, pattern), loss(0.0, pattern), rtol=1e-6)


def test_closing_a_run_calls_every_closer_and_raises_the_first_failure():
  calls = []

  def ok(name):
    return lambda: calls.append(name)

  def fail(name):
    def close():
      calls.append(name)
      raise OSError(name)
    return close

  with pytest.raises(OSError, match="^writer$"):
    loop._close(ok("bar"), fail("writer"), fail("checkpointer"), ok("iterator"))
  assert calls == ["bar", "writer", "checkpointer", "iterator"]   # the checkpointer still waits for its save
  calls.clear()
  loop._close(fail("writer"), ok("iterator"), after_error=True)    # after the run's error: logged, not raised
  assert calls == ["writer", "iterator"]


def test_ema_decay_is_capped_by_the_warm_up_so_a_short_run_ignores_a_larger_one():
  """min(ema_decay, (1 + s) / (10 + s)): two decays above a run's last cap average identically (the recipe study's
  "EMA 0.999" and the preset's 0.995 at 1,400 steps gave bit-identical models); a smaller one changes the EMA."""
  from busgen_jax.train import state as train_state
  c = train_state.default_config()
  assert float(train_state.ema_decay_at(c, 1399, np)) == pytest.approx(1400 / 1409)
  params = {"w": np.ones(3, np.float32)}
  def run(decay):
    c.ema_decay, ema = decay, {"w": np.zeros(3, np.float32)}
    for s in range(0, 1400, 50):   # a changing target
      ema = train_state.ema_update(ema, jax.tree.map(lambda p: p * s, params), np.int32(s), c)
    return np.asarray(ema["w"])
  np.testing.assert_array_equal(run(0.995), run(0.999))
  assert not np.array_equal(run(0.9), run(0.995))
  c.ema_warmup = False
  assert float(train_state.ema_decay_at(c, 10, np)) == pytest.approx(c.ema_decay)


def test_clipping_is_torchs_and_takes_the_train_steps_norm():
  """Every gradient times min(1, max / (norm + 1e-6)), as torch.nn.utils.clip_grad_norm_ (the official trainer's);
  the norm passed as grad_norm= is the one used (the step has it already); below the threshold nothing changes; the
  state is optax's EmptyState (checkpoints keep their structure); within 1e-6 of optax.clip_by_global_norm."""
  import optax
  from busgen_jax.train import state as train_state
  g = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.full((4,), -2.0)}
  clip = train_state.clip_by_global_norm(1.0)
  assert clip.init(g) == optax.EmptyState()
  norm = float(optax.global_norm(g))
  for given, used in [(None, norm), (jnp.float32(2 * norm), 2 * norm)]:
    out, _ = clip.update(g, clip.init(g), grad_norm=given)
    for k in g:
      np.testing.assert_allclose(out[k], g[k] * (1.0 / (used + 1e-6)), rtol=1e-6)
  want, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
  for k in g:
    np.testing.assert_allclose(clip.update(g, None)[0][k], want[k], rtol=1e-6)
  small = jax.tree.map(lambda x: x * 1e-3, g)
  for k in g:
    np.testing.assert_array_equal(clip.update(small, None)[0][k], small[k])
  c = train_state.default_config()
  tx = train_state.optimizer(c, 10)   # the chain passes grad_norm= through
  assert jax.tree.structure(tx.init(g)) == jax.tree.structure(optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(train_state.learning_rate(c, 10))).init(g))
  tx.update(g, tx.init(g), g, grad_norm=jnp.float32(norm))
