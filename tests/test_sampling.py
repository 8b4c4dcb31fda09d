"""Samplers (official DPM-Solver parity, convergence on an analytic model, guidance, ancestral noise), lesion-box
priors, and sharded, resumable, device-count-independent generation into the record format."""

import hashlib
import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from busgen_jax import generate, sampling
from busgen_jax.data import convert, pipeline, reader, writer
from busgen_jax.data import box_prior
from busgen_jax.diffusion import plans, samplers
from busgen_jax.train import diffusion
from helpers import convert_config, run_two_processes, tiny_diffusion_config

BETAS = np.linspace(1e-4, 0.028, 500)
AB = np.cumprod(1 - BETAS)


def gaussian_eps(ab):
  """The exact eps of data N(c, 0.25): the reference README's analytic network without its tanh term."""
  def eps_fn(x, t, c):
    a = ab[t].reshape(-1, *([1] * (x.ndim - 1)))
    c = c.reshape(-1, *([1] * (x.ndim - 1)))
    return jnp.sqrt(1 - a) * (x - jnp.sqrt(a) * c) / (0.25 * a + 1 - a)
  return eps_fn


# ------------------------------------------------------------------------------------------------ samplers

def test_dpm_solver_matches_the_official_reference(shared_dir):
  ref = np.load(shared_dir / "reference" / "dpm_solver_reference.npz")
  runs = json.loads((shared_dir / "reference" / "dpm_solver_reference.json").read_text())["runs"]
  with jax.enable_x64(True):
    ab = jnp.asarray(AB)
    base = gaussian_eps(ab)
    eps_fn = lambda x, t, c: base(x, t, c) + 0.05 * jnp.tanh(x)
    x_T = jnp.asarray(ref["x_T"])
    assert x_T.dtype == jnp.float64
    for i, r in enumerate(runs):
      B = x_T.shape[0]
      out = sampling.sample_with_eps_fn(
          eps_fn, x_T, betas=BETAS, cond=jnp.full((B,), r["cond"]), uncond=jnp.full((B,), r["uncond"]),
          guidance_scale=r["guidance_scale"], algorithm=r["algorithm_type"], method=r["method"], order=r["order"],
          steps=r["steps"], skip_type=r["skip_type"])
      want = ref[f"x_0/{i}"]
      rel = np.abs(np.asarray(out) - want).max() / np.abs(want).max()
      assert rel <= 1e-6, (r, rel)


def test_every_dpm_solver_variant_converges_to_the_exact_ode_solution():
  """For Gaussian data the probability-flow ODE is solved exactly: x_t = sqrt(ab) c + sqrt(var_t) z."""
  ab = jnp.asarray(AB, jnp.float32)
  eps_fn = gaussian_eps(ab)
  z = jax.random.normal(jax.random.PRNGKey(0), (3, 64))
  c = jnp.array([0.3, -0.2, 0.5])
  var = lambda a: 0.25 * a + 1 - a
  x_T = np.sqrt(AB[-1]) * c[:, None] + np.sqrt(var(AB[-1])) * z
  exact = np.sqrt(AB[0]) * c[:, None] + np.sqrt(var(AB[0])) * z
  for alg, method, order, skip in itertools.product(("dpmsolver", "dpmsolver++"), ("singlestep", "multistep"),
                                                    (1, 2, 3), samplers.SKIP_TYPES):
    errs = {}
    for steps in (10, 40):
      plan = samplers.make_plan(BETAS, algorithm=alg, method=method, order=order, steps=steps, skip_type=skip)
      assert plan.num_evals == steps
      errs[steps] = float(np.abs(np.asarray(samplers.run(plan, eps_fn, x_T, cond=c)) - exact).max())
    # The official integer-time conversion (floor) leaves an O(1/N) bias (~0.005 here) that more steps
    # cannot remove; above it, more steps must help.
    assert errs[40] < 0.12 and errs[40] < max(errs[10], 0.01), (alg, method, order, skip, errs)


def test_plans_have_the_official_evaluation_counts_and_lower_orders():
  p = samplers.dpm_solver_plan(BETAS, steps=50, order=3, method="singlestep")
  assert p.num_evals == 50 and p.predict == "x0"
  assert plans._singlestep_orders(50, 3) == [3] * 16 + [2]
  assert plans._singlestep_orders(51, 3) == [3] * 16 + [2, 1]
  assert plans._singlestep_orders(7, 2) == [2, 2, 2, 1]
  p = samplers.dpm_solver_plan(BETAS, steps=20, order=2, method="multistep", algorithm="dpmsolver")
  assert p.num_evals == 20 and p.predict == "eps"
  assert samplers.dpm_solver_plan(BETAS, steps=5, order=3, method="multistep", denoise_to_zero=True).num_evals == 6
  # time indices: first evaluation at t=1 -> index N-1, all in range, decreasing
  assert p.t_index[0] == 499 and (np.diff(p.t_index) < 0).all() and p.t_index.min() >= 0
  for bad in ({"order": 4}, {"skip_type": "cosine"}, {"method": "adaptive"}, {"algorithm": "heun"}):
    with pytest.raises(ValueError):
      samplers.make_plan(BETAS, **{"steps": 6, **bad})
  with pytest.raises(ValueError, match="steps >= order"):
    samplers.dpm_solver_plan(BETAS, steps=2, order=3, method="multistep")


def test_lower_order_final_below_sets_where_multistep_plans_end_first_order():
  """The last multistep update reads one model output at first order, two at second. The official rule ends
  with lower orders below 10 steps only; lower_order_final_below moves that bound (the cpu preset: 15)."""
  def last_order(steps, **kw):
    p = samplers.make_plan(BETAS, method="multistep", order=2, steps=steps, **kw)
    return int(np.count_nonzero(p.out_m[-1]))
  assert (last_order(9), last_order(10), last_order(14)) == (1, 2, 2)          # official
  assert (last_order(10, lower_order_final_below=15), last_order(15, lower_order_final_below=15)) == (1, 2)
  assert last_order(9, lower_order_final=False) == 2
  c = samplers.default_config()
  c.update(method="multistep", order=2, steps=10, lower_order_final_below=15)
  assert np.count_nonzero(samplers.plan_from_config(BETAS, c).out_m[-1]) == 1


def test_ddim_and_ddpm():
  ab = jnp.asarray(AB, jnp.float32)
  eps_fn = gaussian_eps(ab)
  c = jnp.array([0.3, -0.2])
  z = jax.random.normal(jax.random.PRNGKey(0), (2, 64))
  var = lambda a: 0.25 * a + 1 - a
  x_T = np.sqrt(AB[-1]) * c[:, None] + np.sqrt(var(AB[-1])) * z
  exact = np.sqrt(AB[0]) * c[:, None] + np.sqrt(var(AB[0])) * z
  x = sampling.sample_with_eps_fn(eps_fn, x_T, betas=BETAS, cond=c, algorithm="ddim", steps=500)
  assert np.abs(np.asarray(x) - exact).max() < 2e-2
  with pytest.raises(ValueError, match="stochastic"):
    sampling.sample_with_eps_fn(eps_fn, x_T, betas=BETAS, cond=c, algorithm="ddpm", steps=10)
  # Ancestral DDPM over every timestep reproduces the data distribution N(c, 0.25).
  keys = jax.random.split(jax.random.PRNGKey(1), 2)
  x = sampling.sample_with_eps_fn(eps_fn, jax.random.normal(jax.random.PRNGKey(2), (2, 8192)), betas=BETAS, cond=c,
                                  algorithm="ddpm", keys=keys)
  np.testing.assert_allclose(np.asarray(x.mean(1)), np.asarray(c), atol=0.03)
  np.testing.assert_allclose(np.asarray(x.std(1)), 0.5, atol=0.03)
  # Its noise is per example: the same key gives the same sample whatever the batch around it.
  x1 = sampling.sample_with_eps_fn(eps_fn, jax.random.normal(jax.random.PRNGKey(2), (2, 8192))[:1], betas=BETAS,
                                   cond=c[:1], algorithm="ddpm", keys=keys[:1])
  np.testing.assert_allclose(np.asarray(x1[0]), np.asarray(x[0]), atol=1e-5)


def test_starting_from_the_terminal_marginal_keeps_the_data_mean_grey_level():
  """Images whose mean grey level varies (m ~ N(-0.3, 0.25) per image) with the exact denoiser: at T the schedule
  keeps sqrt(ab_T) = 0.029 of the image, which over a 64x64x3 image says much about its mean, so pure noise (mean
  0) is read as "mid-grey" and every image comes out too bright, the defect seen on BUS-BRA. Starting with the
  terminal marginal's mean (samplers.sample_from_keys' start) gives back the data's mean and spread."""
  mu, sd, tau, shape = -0.3, 0.25, 0.3, (64, 64, 3)
  D = float(np.prod(shape))
  ab = jnp.asarray(AB, jnp.float32)

  def eps_fn(x, t, c):   # exact: x0 = m 1 + tau n, split into the image-mean direction and the rest
    a = jnp.sqrt(ab[t]).reshape(-1, 1, 1, 1)
    s = jnp.sqrt(1 - ab[t]).reshape(-1, 1, 1, 1)
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    v = sd ** 2 * D + tau ** 2               # variance of x0 along the unit vector 1 / sqrt(D)
    x0_mean = mu + v * a / (a ** 2 * v + s ** 2) * (mean - a * mu)   # the Gaussian posterior mean, per pixel
    x0_rest = tau ** 2 * a / (a ** 2 * tau ** 2 + s ** 2) * (x - mean)
    return (x - a * (x0_mean + x0_rest)) / s

  plan = samplers.make_plan(BETAS, algorithm="dpmsolver++", method="multistep", order=2, steps=20)
  keys = jax.random.split(jax.random.PRNGKey(0), 256)
  cond = jnp.zeros((256,))
  run = lambda start: np.asarray(samplers.sample_from_keys(plan, eps_fn, keys, shape, cond=cond, guidance_scale=1.0,
                                                           start=start)).mean(axis=(1, 2, 3))
  pure = run(None)
  np.testing.assert_array_equal(pure, run(jnp.zeros((256, 2))))        # zeros: exactly the official start
  assert pure.mean() - mu > 0.1, pure.mean()                          # too bright by >12 grey levels
  m = run(jnp.tile(jnp.array([[mu, sd]]), (256, 1)))
  assert abs(m.mean() - mu) < 0.05 and abs(m.std() - sd) < 0.06, (m.mean(), m.std())


def test_guidance_is_one_batched_call_and_the_official_combination():
  calls = []

  def eps_fn(x, t, cond):
    calls.append(x.shape[0])
    return x * 0 + cond[:, None]

  x = jnp.zeros((3, 4))
  g = samplers.guided(eps_fn, jnp.full((3,), 2.0), jnp.full((3,), 0.5), 2.8)
  out = g(x, jnp.zeros((3,), jnp.int32))
  assert calls == [6]
  np.testing.assert_allclose(np.asarray(out), 0.5 + 2.8 * (2.0 - 0.5))
  samplers.guided(eps_fn, jnp.ones((3,)), jnp.zeros((3,)), 1.0)(x, jnp.zeros((3,), jnp.int32))
  assert calls[-1] == 3   # scale 1: the conditional pass only



def test_guidance_in_a_limited_interval_of_noise_levels():
  """Guidance only where low < sigma/alpha <= high (Kynkäänniemi et al. 2024): those steps combine the two
  predictions, the rest take the conditional one from the single batch, and the count of network evaluations
  says so. Checked against the plan run with a per-timestep guidance scale in one scan."""
  batches = []

  def eps_fn(x, t, cond):   # depends on x, t and the condition, so every combination shows in the result
    batches.append(x.shape[0])
    return jnp.tanh(x * (1 + t[:, None] / 500.0) + cond[:, None])

  plan = samplers.make_plan(BETAS, algorithm="dpmsolver++", method="multistep", order=2, steps=12)
  level = plan.sigma / plan.alpha
  interval = (float(np.sort(level)[3]), float(np.sort(level)[8]))          # the 5 middle steps of 12
  rows = samplers.guided_rows(plan, interval)
  assert rows.sum() == 5 and not rows[0] and not rows[-1]                    # neither the noisiest nor the last
  assert samplers.network_evals(plan, 2.8, interval) == 12 + 5
  assert samplers.network_evals(plan, 2.8) == 24 and samplers.network_evals(plan, 1.0, interval) == 12
  x_T = jax.random.normal(jax.random.PRNGKey(0), (3, 16))
  cond, uncond = jnp.array([0.5, -1.0, 2.0]), jnp.zeros(3)
  out = samplers.run(plan, eps_fn, x_T, cond=cond, uncond=uncond, guidance_scale=2.8, guidance_interval=interval)
  assert sorted(set(batches)) == [3, 6]   # unguided segments on the single batch, guided on the doubled one

  scale_at = jnp.ones(500).at[jnp.asarray(plan.t_index[rows])].set(2.8)

  def per_step(x, t, c):    # the reference: both predictions at every step, mixed by the step's own scale
    ec, eu = eps_fn(x, t, cond), eps_fn(x, t, uncond)
    return eu + scale_at[t][:, None] * (ec - eu)

  ref = samplers.run(plan, per_step, x_T, cond=cond)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)
  assert not np.allclose(np.asarray(out), np.asarray(samplers.run(plan, eps_fn, x_T, cond=cond, uncond=uncond,
                                                                 guidance_scale=2.8)), atol=1e-3)
  # An interval holding every level is the official sampler, to the bit.
  everywhere = (0.0, float(level.max()) + 1)
  np.testing.assert_array_equal(
      np.asarray(samplers.run(plan, eps_fn, x_T, cond=cond, uncond=uncond, guidance_scale=2.8,
                              guidance_interval=everywhere)),
      np.asarray(samplers.run(plan, eps_fn, x_T, cond=cond, uncond=uncond, guidance_scale=2.8)))
  with pytest.raises(ValueError, match="low < high"):
    samplers.guided_rows(plan, (2.0, 1.0))
  # Reports name the interval with the solver (samplers.describe).
  c = samplers.default_config()
  c.update(method="multistep", order=2, steps=8, guidance_interval=(0.3, 3.0))
  assert samplers.describe(c) == "DPM-Solver++ multistep order 2, 8 steps, guidance 2.8 where 0.3 < sigma/alpha <= 3"
  c.update(algorithm="ddim", guidance_scale=1.0)
  assert samplers.describe(c) == "DDIM, 8 steps, unguided"

# ------------------------------------------------------------------------------------------------ box prior

def test_box_prior_fit_sample_and_storage(tmp_path):
  rng = np.random.default_rng(0)
  def boxes(n, cx, cy, w, h):
    c = np.stack([rng.normal(cx, 0.05, n), rng.normal(cy, 0.05, n)], 1)
    wh = np.stack([rng.normal(w, 0.02, n), rng.normal(h, 0.02, n)], 1)
    return [np.concatenate([ci - whi / 2, ci + whi / 2])[None] for ci, whi in zip(c, wh)]
  benign, malignant = boxes(300, 0.3, 0.4, 0.2, 0.1), boxes(300, 0.6, 0.5, 0.3, 0.3)
  devices = ["a"] * 150 + ["b"] * 150 + ["a"] * 298 + ["c"] * 2
  prior = box_prior.fit(benign + malignant + [np.zeros((0, 4))], ["benign"] * 300 + ["malignant"] * 300 + ["normal"],
                        devices + ["a"], by_device=True, min_group_size=5)
  assert set(prior.groups) == {"benign", "malignant", "benign|a", "benign|b", "malignant|a"}  # "malignant|c": 2 < 5
  s = prior.sample("benign", 4000, np.random.default_rng(1))
  f = box_prior.box_features(s)
  np.testing.assert_allclose(f[:, :2].mean(0), [0.3, 0.4], atol=0.01)
  np.testing.assert_allclose(f[:, 3].mean(), 0.02, rtol=0.1)           # area w*h
  np.testing.assert_allclose(np.median(f[:, 2]), 0.5, rtol=0.1)        # aspect h/w
  m = prior.sample("malignant", 4000, np.random.default_rng(1), device="c")   # falls back to the pathology
  np.testing.assert_allclose(box_prior.box_features(m)[:, :2].mean(0), [0.6, 0.5], atol=0.01)
  assert (s >= 0).all() and (s <= 1).all() and (s[:, 2:] > s[:, :2]).all()
  # boxes near the border are shifted inside, keeping their size
  inside = box_prior.features_to_boxes(np.array([[0.99, 0.02, 1.0, 0.04]]))[0]
  assert inside[2] <= 1 and inside[1] >= 0
  np.testing.assert_allclose(inside[2] - inside[0], 0.2, atol=1e-6)
  np.testing.assert_array_equal(prior.sample("benign", 5, np.random.default_rng(7)),
                                prior.sample("benign", 5, np.random.default_rng(7)))
  for name in ("p.json", "p.npz"):
    back = box_prior.BoxPrior.load(prior.save(tmp_path / name))
    assert back.bandwidth == 0.001 and set(back.groups) == set(prior.groups)
    np.testing.assert_allclose(back.groups["benign|b"], prior.groups["benign|b"])
  (tmp_path / "bad.json").write_text('{"format": "something"}')
  with pytest.raises(ValueError, match="bad.json"):
    box_prior.BoxPrior.load(tmp_path / "bad.json")
  with pytest.raises(KeyError, match="no boxes for 'normal'"):
    prior.sample("normal", 1, rng)


# ------------------------------------------------------------------------------------------------ generation

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A 2-step `busgen-jax train` run on phantom data (its checkpoint carries the model config and vocab)
  and a box prior fitted on the same data."""
  root = tmp_path_factory.mktemp("gen")
  data = convert.convert(convert_config("phantom", "", root / "data", **{
      "phantom.num_examples": 60, "phantom.size": 32}))
  cfg = tiny_diffusion_config(data, 2, conditions=("pathology", "device", "box", "mask"))
  diffusion.train(cfg, root / "run")
  prior = box_prior.fit_datasets([str(data)]).save(root / "prior.json")
  return {"data": data, "checkpoint": root / "run" / "checkpoints", "prior": prior, "root": root}


def test_box_prior_can_leave_out_devices(trained):
  """A few-shot site's repositories may take the pretraining corpus's boxes (fewshot.box_prior=pretraining): the
  site's own device stays out of that prior, and its source says so."""
  ds = reader.open_dataset(trained["data"])
  left_out = ds.vocab("device")[1]
  full = box_prior.fit_datasets([str(trained["data"])], by_device=True, min_group_size=1)
  part = box_prior.fit_datasets([str(trained["data"])], exclude_devices=(left_out,), by_device=True, min_group_size=1)
  assert any(k.endswith(f"|{left_out}") for k in full.groups)
  assert not any(k.endswith(f"|{left_out}") for k in part.groups)
  kept = sum(len(v) for k, v in full.groups.items() if "|" in k and not k.endswith(f"|{left_out}"))
  assert sum(len(v) for k, v in part.groups.items() if "|" not in k) == kept > 0
  assert part.source["excluded_devices"] == [left_out] and "excluded_devices" not in full.source


def gen_config(trained, **kw):
  c = generate.default_config()
  c.checkpoint = str(trained["checkpoint"])
  c.box_prior = str(trained["prior"])
  c.pathology = ("benign", "malignant")
  c.device = ("all",)
  c.num_per_condition = 3
  c.sampler.update(method="multistep", order=2, steps=3)
  c.per_device_batch = 1
  c.examples_per_shard = 4
  c.update_from_flattened_dict(kw)
  return c


def _records(ds_dir):
  ds = reader.open_dataset(ds_dir)
  recs = ds.records("train")
  return [ds.decode(recs[i]) for i in range(len(recs))]


def test_generation_on_8_devices_then_through_the_grain_pipeline(trained, tmp_path):
  cfg = gen_config(trained)
  ds_dir = generate.generate(cfg, tmp_path)
  ds = reader.open_dataset(ds_dir)
  devices = ds.vocab("device")[1:]
  n = 2 * len(devices) * 3
  report = ds.report
  assert report["format"] == "generated" and report["inputs"] == report["converted"] == n and report["accounted"]
  exs = _records(ds_dir)
  idx = sorted(json.loads(e["gen_conditions"])["index"] for e in exs)
  assert idx == list(range(n))                                # no duplicated or missing index
  first = exs[0]
  gen = json.loads(first["gen_conditions"])
  assert gen["pathology"] == "benign" and gen["device"] == devices[0] and gen["sampler"].startswith("dpmsolver++")
  assert gen["guidance_interval"] == []                        # every step guided (the official sampler)
  assert first["gen_seed"] == 0 and first["gen_step"] == 2 and first["gen_model"] == "run/checkpoints"
  assert first["source_file"] == "" and first["image"].shape == (16, 16, 1)
  for e in exs:                                                # every lesion image got a box from the prior
    assert len(e["boxes"]) == 1 and ds.vocab("pathology")[e["pathology"]] in ("benign", "malignant")
  assert len(list((ds_dir / generate.SHEETS).glob("*.png"))) == 2 * len(devices)
  assert json.loads((ds_dir / "generation.json").read_text())["num_examples"] == n
  # Nothing in the repository names the producer's file system or a training patient (record_paths=False).
  train = reader.open_dataset(trained["data"])
  cases = {train.decode(r, skip=("image", "mask"))["case_id"] for r in train.records("train")}
  for f in ds_dir.rglob("*"):
    if f.is_file():
      text = f.read_bytes().decode("latin-1")
      assert str(trained["root"]) not in text and str(tmp_path) not in text, f
      assert not any(c in text for c in cases), f
  import tensorflow_datasets as tfds                          # TFDS reads it as it reads converted data
  via_tfds = tfds.builder_from_directory(str(ds_dir)).as_data_source("train")
  assert len(via_tfds) == n
  np.testing.assert_array_equal(via_tfds[0]["image"], first["image"])

  # The generated dataset feeds the same Grain pipeline; labels map back to the requested names.
  pcfg = pipeline.default_config()
  pcfg.sources.real.path = str(ds_dir)
  pcfg.update(image_size=16, batch_size=4, shuffle=False, flip=False, crop="center")
  p = pipeline.build(pcfg)
  it = iter(p)
  batch = next(it)
  it.close()
  assert p.vocab["device"][batch["device"][0]] == devices[0]
  assert p.vocab["pathology"][batch["pathology"][0]] == "benign"
  np.testing.assert_allclose(batch["image"][0, ..., 0], first["image"][..., 0] / 127.5 - 1, atol=1e-6)


def test_same_images_on_1_and_8_devices_and_resume_after_interruption(trained, tmp_path):
  cfg = gen_config(trained, pathology=("malignant",), device=("unknown",), num_per_condition=10)
  full = generate.generate(cfg, tmp_path / "eight")
  one = gen_config(trained, pathology=("malignant",), device=("unknown",), num_per_condition=10, local_devices=1)
  with pytest.raises(generate.SimulatedCrash):
    generate.generate(one, tmp_path / "one", stop_after_shards=1)
  ds = tmp_path / "one" / "data" / "generated" / "1.0.0"
  first = ds / writer.shard_filename("generated", "train", 0, 3)
  stamp = first.stat().st_mtime_ns
  assert not (ds / "dataset_info.json").exists()              # not merged: shards missing
  generate.generate(one, tmp_path / "one")                    # resumes: shard 0 is not redone
  assert first.stat().st_mtime_ns == stamp
  sha = lambda d: [e["sha256"] for e in _records(d)]
  assert sha(full) == sha(ds)

  # Privacy-protected sampling through `sample`: with a radius that covers everything every image moves away
  # from the training bank; the provenance says so. (Bit-identity where it does not engage: test_protect.py.)
  from busgen_jax.diffusion import protect
  guarded = gen_config(trained, pathology=("malignant",), device=("unknown",), num_per_condition=10,
                       **{"protect.bank": str(trained["data"]), "protect.radius": 2.0, "protect.scale": 0.5})
  pd = generate.generate(guarded, tmp_path / "guarded")
  assert all(a != b for a, b in zip(sha(full), sha(pd))) and len(sha(pd)) == 10
  assert json.loads((pd / "generation.json").read_text())["provenance"]["protect"]["radius_used"] == 2.0
  bank, _ = generate.protect_bank(guarded.protect)
  near = lambda d: np.asarray(protect.nearest(
      jnp.asarray(np.stack([e["image"][..., 0] for e in _records(d)]), jnp.float32), bank, 16))
  assert near(pd).mean() > near(full).mean()

  # The default radius is calibrated on held-out patients: about 10% of the test split lie inside it.
  cal = gen_config(trained, **{"protect.bank": str(trained["data"])}).protect
  bank, radius = generate.protect_bank(cal)
  held = reader.read_images(trained["data"], "test")["images"]
  d = np.asarray(protect.nearest(jnp.asarray(np.stack(
      [reader.resize(reader.centre_square(im), 16, 16) for im in held]), jnp.float32), bank, 16))
  assert 0 < radius < np.median(d) and np.mean(d < radius) <= cal.holdout_quantile + 1 / len(d)
  with pytest.raises(ValueError, match="holdout_split"):
    generate.protect_bank(gen_config(trained, **{"protect.bank": str(trained["data"]),
                                             "protect.holdout_split": "val_missing"}).protect)


def test_two_processes_generate_one_dataset_in_slice_scope(trained, tmp_path):
  """2 CPU processes x 2 devices (jax.distributed), one sampling program over all 4 (scope=slice, as v5e
  slices need): the hosts take alternate shards, the one with fewer calls keeps step, and the merged dataset
  equals a 1-process run image for image."""
  ref = generate.generate(gen_config(trained), tmp_path / "one")
  cfg = gen_config(trained, scope="slice")
  out = run_two_processes("generate", cfg.to_json(), tmp_path / "two", tmp_path)
  ds = out[0]["dataset"]
  got, want = _records(ds), _records(ref)
  assert [e["sha256"] for e in got] == [e["sha256"] for e in want]
  reports = sorted((Path(ds) / "shard_reports").glob("shard-*.json"))
  assert len(reports) % 2 == 1   # an odd shard count: process 0 makes one more sampling call than process 1


def test_mask_conditioned_generation_from_a_folder_of_masks(trained, tmp_path):
  masks = tmp_path / "masks"
  masks.mkdir()
  for i in range(3):
    m = np.zeros((40, 40), np.uint8)
    m[8 + i:20 + 2 * i, 10:25] = 255
    Image.fromarray(m).save(masks / f"m{i}.png")
  cfg = gen_config(trained, pathology=("benign",), device=("unknown",), num_per_condition=4, **{
      "mask.source": str(masks)})
  exs = _records(generate.generate(cfg, tmp_path))
  assert len(exs) == 4
  for e in exs:
    m = e["mask"][..., 0] > 0
    assert e["has_mask"] and m.any()
    ys, xs = np.nonzero(m)
    np.testing.assert_allclose(e["boxes"][0], [xs.min() / 16, ys.min() / 16, (xs.max() + 1) / 16,
                                               (ys.max() + 1) / 16], atol=1e-6)
  assert len({hashlib.sha256(e["mask"].tobytes()).hexdigest() for e in exs}) > 1   # deformed per example
  bad = gen_config(trained, **{"condition_file": str(tmp_path / "c.json")})
  (tmp_path / "c.json").write_text('[{"pathology": "benign", "colour": "red"}]')
  with pytest.raises(ValueError, match="unknown keys"):
    generate.generate(bad, tmp_path / "bad")


def test_generation_from_an_imported_official_checkpoint(shared_dir, tmp_path):
  from busgen_jax import official
  cfg = official.model_config(ch=32, ch_mult=(1, 2), num_res_blocks=1, num_groups=8, T=500, dev_num=4)
  ckpt = official.import_checkpoint(shared_dir / "reference" / "busgen_unet_tiny.npz", tmp_path / "imported", cfg)
  c = generate.default_config()
  c.update(checkpoint=str(ckpt), image_size=16, device_names=("GE", "Mindray", "Siemens"), device=("Mindray",),
           pathology=("malignant",), box="none", num_per_condition=2, per_device_batch=1)
  c.sampler.update(method="multistep", order=1, steps=2)
  exs = _records(generate.generate(c, tmp_path / "gen"))
  assert len(exs) == 2 and exs[0]["gen_model"] == "imported" and exs[0]["image"].shape == (16, 16, 1)
  gen = json.loads(exs[0]["gen_conditions"])
  assert gen["device"] == "Mindray" and gen["pathology"] == "malignant" and gen["boxes"] == []
