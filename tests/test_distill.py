"""`busgen-jax distill`: the guidance input, the distillation targets, and students that sample as any model does."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from busgen_jax import generate
from busgen_jax.data import box_prior, convert, reader
from busgen_jax.diffusion import distill as distill_lib, plans, schedule
from busgen_jax.models import card, unet
from busgen_jax.train import diffusion, distill
from helpers import convert_config, tiny_diffusion_config


def _tiny(**kw):
  c = unet.default_config()
  c.update(ch=8, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, attn_levels=(1,), T=50, dropout=0.0,
           num_pathology=3, num_devices=3, conditions=("pathology", "device"), **kw)
  return c


def test_a_fresh_student_is_its_teachers_conditional_model_and_then_reads_the_scale():
  teacher = unet.create(_tiny(), seed=1)
  student = unet.create(_tiny(guidance_embed=True), seed=2)
  t_params = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
  s_state = nnx.state(student, nnx.Param)
  s_params = nnx.to_pure_dict(s_state)
  assert set(s_params) - set(t_params) == {"guidance_1", "guidance_2"}
  s_params.update(t_params)
  nnx.replace_by_pure_dict(s_state, s_params)
  nnx.update(student, s_state)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 3))
  t = jnp.array([3, 40])
  cond = {"pathology": jnp.array([1, 2]), "device": jnp.array([2, 1])}
  want = teacher(x, t, cond)
  for w in (1.0, 4.0):
    got = student(x, t, {**cond, "guidance": jnp.full((2,), w)})
    np.testing.assert_allclose(got, want, atol=1e-6)
  with pytest.raises(ValueError, match="guidance"):
    student(x, t, cond)
  student.guidance_2.kernel.value = 0.1 * jnp.ones_like(student.guidance_2.kernel.value)
  a = student(x, t, {**cond, "guidance": jnp.full((2,), 1.0)})
  b = student(x, t, {**cond, "guidance": jnp.full((2,), 4.0)})
  assert float(jnp.abs(a - b).max()) > 1e-3


def _fake_teacher(z, t, cond):
  """A nonlinear eps(z, t, cond) whose conditional and unconditional halves differ."""
  scale = 1.0 + cond["pathology"].astype(jnp.float32).reshape(-1, 1, 1, 1)
  return jnp.tanh(scale * z) * (0.5 + t.reshape(-1, 1, 1, 1) / 100.0)


def test_guidance_loss_is_zero_only_for_the_teachers_guided_prediction():
  sched = schedule.Schedule(np.linspace(1e-4, 0.05, 50))
  x0 = jax.random.normal(jax.random.PRNGKey(1), (6, 4, 4, 3))
  cond = {"pathology": jnp.array([1, 2, 1, 2, 1, 2])}
  teacher = distill_lib.guided_teacher(_fake_teacher, takes_guidance=False)

  def exact(z, t, c):   # eps_u + w (eps_c - eps_u), written out
    w = c["guidance"].reshape(-1, 1, 1, 1)
    eu = _fake_teacher(z, t, {"pathology": jnp.zeros_like(c["pathology"])})
    return eu + w * (_fake_teacher(z, t, {"pathology": c["pathology"]}) - eu)

  key = jax.random.PRNGKey(2)
  loss = lambda student: float(distill_lib.guidance_loss(student, teacher, x0, cond, key, sched, (1.0, 4.0)))
  assert loss(exact) < 1e-12
  assert loss(lambda z, t, c: _fake_teacher(z, t, {"pathology": c["pathology"]})) > 1e-3   # ignores the scale


def test_progressive_target_lands_where_two_teacher_ddim_steps_do():
  sched = schedule.Schedule(np.linspace(1e-4, 0.05, 50))
  grid = plans.ddim_grid(50, 8)
  np.testing.assert_array_equal(distill_lib.student_grid(grid), grid[0::2])
  with pytest.raises(ValueError, match="even number"):
    distill_lib.student_grid(plans.ddim_grid(50, 5))
  teacher = distill_lib.guided_teacher(_fake_teacher, takes_guidance=False)
  a = np.concatenate([sched.sqrt_ab, [1.0]])
  s = np.concatenate([sched.sqrt_1m_ab, [0.0]])
  z = np.random.default_rng(0).standard_normal((2, 4, 4, 3))
  cond = {"pathology": jnp.array([1, 2])}
  w = jnp.array([2.0, 3.0])
  for i in (0, 3):   # a middle step, and the last (t_next = the data itself)
    tab = np.array([[grid[2 * i], grid[2 * i + 1], grid[2 * i + 2] if 2 * i + 2 < 8 else -1]] * 2)
    A = [a[tab[0, k]] for k in range(3)]
    S = [s[tab[0, k]] for k in range(3)]
    target = np.asarray(distill_lib.two_step_target(teacher, jnp.asarray(z, jnp.float32), jnp.asarray(tab), cond, w,
                                                    [jnp.float32(v) for v in A], [jnp.float32(v) for v in S]))
    # float64 by hand: two teacher DDIM steps, then one step with x0 = target must land on the same point.
    zz = z
    for k in (0, 1):
      e = np.asarray(teacher(jnp.asarray(zz, jnp.float32), jnp.asarray(tab[:, k]), cond, w), np.float64)
      zz = A[k + 1] * (zz - S[k] * e) / A[k] + S[k + 1] * e
    one = A[2] * target + S[2] * (z - A[0] * target) / S[0]
    np.testing.assert_allclose(one, zz, atol=2e-4, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ end to end

@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  root = tmp_path_factory.mktemp("distill")
  data = convert.convert(convert_config("phantom", "", root / "data", **{"phantom.num_examples": 40,
                                                                           "phantom.size": 32}))
  cfg = tiny_diffusion_config(data, 2)
  diffusion.train(cfg, root / "teacher")
  prior = box_prior.fit_datasets([str(data)]).save(root / "prior.json")
  return {"root": root, "data": data, "checkpoint": root / "teacher" / "checkpoints", "prior": prior}


def _distill_config(teacher_dir, **kw):
  c = distill.default_config()
  c.teacher = str(teacher_dir)
  c.num_steps, c.log_every, c.checkpoint_every = 3, 1, 1
  c.data.batch_size = 8
  c.update_from_flattened_dict(kw)
  return c


def _gen(teacher, checkpoint_dir, **kw):
  c = generate.default_config()
  c.update(checkpoint=str(checkpoint_dir), box_prior=str(teacher["prior"]), pathology=("benign", "malignant"),
           device=("all",), num_per_condition=2, per_device_batch=1, examples_per_shard=64)
  c.sampler.update(method="multistep", order=2, steps=3)
  c.update_from_flattened_dict(kw)
  return c


def test_distil_resume_progressive_round_and_sample_with_the_students_own_plan(teacher, tmp_path):
  # Guidance distillation on the 8 simulated devices, crashed after one step and resumed.
  with pytest.raises(Exception, match="stop_after"):
    distill.distill(_distill_config(teacher["checkpoint"]), tmp_path / "g", stop_after=1)
  s = distill.distill(_distill_config(teacher["checkpoint"]), tmp_path / "g")
  assert s["complete"] and s["step"] == 3 and np.isfinite(s["last"]["loss"])
  student = card.load(str(tmp_path / "g" / "checkpoints"))
  assert student.cfg.guidance_embed and student.card.student["kind"] == "guidance"
  assert student.card.student["teacher"] == "teacher/checkpoints" and student.card.student["network_evals"] == 8
  assert student.vocab == card.load(str(teacher["checkpoint"])).vocab
  with pytest.raises(ValueError, match="already a guidance student"):
    distill.distill(_distill_config(tmp_path / "g" / "checkpoints"), tmp_path / "bad")

  # A progressive round: the student's 4-step DDIM teacher grid -> 2 steps.
  p = distill.distill(_distill_config(tmp_path / "g" / "checkpoints", kind="progressive", teacher_steps=4),
                      tmp_path / "p")
  grid = p["student"]["sampler"]["grid"]
  assert grid == plans.ddim_grid(500, 4)[0::2].tolist() and p["student"]["network_evals"] == 2
  assert [x["kind"] for x in p["student"]["lineage"]] == ["guidance", "progressive"]

  # `sample` needs nothing but the checkpoint: the card's plan, one evaluation per step.
  ds = generate.generate(_gen(teacher, tmp_path / "p" / "checkpoints"), tmp_path / "gen")
  info = json.loads((ds / "generation.json").read_text())
  assert info["network_evals_per_image"] == 2
  assert info["provenance"]["sampler"]["algorithm"] == "ddim" and info["provenance"]["sampler"]["grid"] == grid
  assert [x["checkpoint"] for x in info["provenance"]["student"]["lineage"]] == ["teacher/checkpoints",
                                                                                   "g/checkpoints"]
  assert reader.open_dataset(ds).report["converted"] == 2 * 2 * (len(student.vocab["device"]) - 1)
  # With the config's plan instead (the sampler study): still one evaluation per step.
  ds2 = generate.generate(_gen(teacher, tmp_path / "g" / "checkpoints", **{"sampler.student_plan": "config"}),
                          tmp_path / "gen2")
  assert json.loads((ds2 / "generation.json").read_text())["network_evals_per_image"] == 3


def test_an_untrained_student_samples_the_teachers_conditional_images(teacher, tmp_path):
  # lr 0: the student is the teacher plus a guidance input that adds exactly zero, so at any guidance scale it
  # must draw the images the teacher draws with guidance off (scale 1: the conditional prediction alone).
  distill.distill(_distill_config(teacher["checkpoint"], num_steps=1, **{"optim.lr": 0.0}), tmp_path / "s")
  plan = {"sampler.student_plan": "config", "pathology": ("malignant",), "device": ("unknown",)}
  mine = generate.generate(_gen(teacher, tmp_path / "s" / "checkpoints", **plan, **{"sampler.guidance_scale": 3.0}),
                           tmp_path / "a")
  theirs = generate.generate(_gen(teacher, teacher["checkpoint"], **plan, **{"sampler.guidance_scale": 1.0}),
                             tmp_path / "b")
  read = lambda d: [reader.open_dataset(d).decode(r)["image"] for r in reader.open_dataset(d).records("train")]
  for x, y in zip(read(mine), read(theirs), strict=True):
    assert np.abs(x.astype(int) - y.astype(int)).max() <= 1


def test_distil_refuses_what_it_cannot_do(teacher, tmp_path):
  with pytest.raises(ValueError, match="--config.teacher is required"):
    distill.distill(_distill_config(""), tmp_path / "x")
  with pytest.raises(ValueError, match="kind must be one of"):
    distill.distill(_distill_config(teacher["checkpoint"], kind="consistency"), tmp_path / "x")
  with pytest.raises(ValueError, match="even number"):
    distill.distill(_distill_config(teacher["checkpoint"], kind="progressive", teacher_steps=5), tmp_path / "x")
