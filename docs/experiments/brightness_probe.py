"""Where do the generated images' too-bright backgrounds come from? Pure-noise starts against the data's own.

  # a trained model (e.g. the `cpu` preset's), sampled from pure noise and from the terminal marginal's mean:
  python docs/experiments/brightness_probe.py --data /tmp/exp_cpu/data/busbra/1.0.0 --workdir /tmp/brightness \
      --checkpoint /tmp/exp_cpu/diffusion/checkpoints [--starts noise,data] [--images 64]
  # or repositories already generated (e.g. the recipe study's guidance variants), measured as they are:
  python docs/experiments/brightness_probe.py --data /tmp/exp_cpu/data/busbra/1.0.0 --workdir /tmp/brightness \
      --datasets "guidance 1.5=/tmp/study/guidance/guidance_1.5/generated/data/generated/1.0.0,..."
  # or short pretrainings with and without offset noise at equal steps:
  python docs/experiments/brightness_probe.py --data /tmp/exp_cpu/data/busbra/1.0.0 --workdir /tmp/brightness \
      [--steps 400] [--offsets 0,0.1] [--starts noise,data] [--images 64]
  # or short pretrainings with other objectives (`diffusion.objective` overrides, one recipe per ";"), sampled
  # from the data start, with the brightness spread and how each model reads the noise's mean:
  python docs/experiments/brightness_probe.py --data /tmp/exp_cpu/data/busbra/1.0.0 --workdir /tmp/brightness_dc \
      --steps 400 --recipes "prediction=eps;mean_weight=1;prediction=v" --starts data --images 96

Each model (the given checkpoint, or the `cpu` preset's diffusion model trained for `--steps` steps on the
dataset's training split with `diffusion.objective.offset_noise` at each value) generates about `--images` images
per pathology (spread over the devices) with the preset's sampler and the training split's box prior, once per
`sampler.start`: "noise" (pure noise, the official start) and "data" (x_T carries the training images' mean grey
level, as the forward process does; samplers.sample_from_keys). The table gives the mean grey level (0-255) inside
and outside the lesion boxes through the model's own view (the evaluation pipeline at the model's image size),
against the real training images'. A second table gives, per device, the spread (sd over images) of the images'
mean grey level, real against generated, and for each model how its x0 prediction at the noisiest steps follows the
noise's own mean (`dc_response`). It measures brightness only, not which recipe classifies best (the recipe
study's and the preset's job).
"""

import argparse
import json
import sys
from pathlib import Path

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported
sys.path.insert(0, str(Path(__file__).resolve().parent))

import ml_collections  # noqa: E402

from adapt_diagnosis import lesion_grey  # noqa: E402  (this folder's diagnosis script)
from busgen_jax import config_files, generate  # noqa: E402
from busgen_jax.data import box_prior, reader  # noqa: E402
from busgen_jax.train import diffusion  # noqa: E402

CLASSES = ["benign", "malignant"]
ROOT = Path(__file__).resolve().parents[2]


def cpu_preset() -> ml_collections.ConfigDict:
  return config_files.load(f"{config_files.CONFIGS / 'experiment.py'}:cpu")


def grey(path: str, split: str, size: int) -> dict:
  g = lesion_grey(path, split, "pathology", CLASSES, size)
  return {c: (round(v["inside"], 1), round(v["outside"], 1)) for c, v in g.items()}


def spread(path: str, split: str, size: int) -> dict:
  """Per device: the sd over images of their mean grey level (0-255) through the model's view (the per-image means
  a model card's start statistics come from, here over the evaluation pipeline's centre crops)."""
  import numpy as np

  from busgen_jax.data import pipeline
  pipe = pipeline.build_eval(path, split, image_size=size, batch_size=64, process_index=0, process_count=1)
  stats = pipeline.image_means(pipe, len(reader.open_dataset(path).records(split)))  # the padded rows left out
  grey, devices = (stats["means"] + 1) * 127.5, stats["devices"]
  return {d: round(float(np.std(grey[devices == d])), 1) for d in sorted(set(devices)) if (devices == d).sum() > 1}


def dc_response(checkpoint: str, data: str, ts=(499, 450, 400), n: int = 128) -> dict:
  """How a model's x0 prediction follows the noise's mean at step t, on `n` training images: the sd of its
  prediction's image-mean error (grey levels) and the slope of that error on the noise's mean (in x0 units,
  sigma_t / alpha_t times it), against the best any predictor can do from the image mean of x_t alone (a Gaussian
  posterior from the data's sd of image means). Slope 1: the noise's mean is taken for the image's brightness."""
  import jax
  import numpy as np
  from flax import nnx

  from busgen_jax.data import pipeline
  from busgen_jax.diffusion import objectives, schedule
  from busgen_jax.models import card, unet
  model = card.load(checkpoint)
  train = model.train_config
  sched = schedule.Schedule.from_config(ml_collections.ConfigDict(train["schedule"]))
  prediction = train["objective"]["prediction"]
  pipe = pipeline.build_eval(data, "train", image_size=model.image_size, batch_size=n, process_index=0,
                             process_count=1, device_vocab=tuple(model.vocab.get("device", ())))
  b = pipe.batches[0]
  x0 = b["image"][b["valid"]]
  cond = {k: b[k][b["valid"]] for k in model.cfg.conditions}
  net = nnx.merge(nnx.graphdef(unet.abstract(model.cfg)), model.params)

  @jax.jit
  def predicted_eps(xt, tt, cond):
    return objectives.eps_from_prediction(net(xt, tt, cond), xt, tt, sched, prediction)

  data_sd = float(x0.mean(axis=(1, 2, 3)).std())
  out = {}
  for t in ts:
    a, s = float(sched.sqrt_ab[t]), float(sched.sqrt_1m_ab[t])
    eps = np.asarray(jax.random.normal(jax.random.key(t), x0.shape))
    xt = a * x0 + s * eps
    x0_hat = (xt - s * np.asarray(predicted_eps(xt, np.full((len(x0),), t), cond))) / a
    err = x0_hat.mean(axis=(1, 2, 3)) - x0.mean(axis=(1, 2, 3))
    noise = eps.mean(axis=(1, 2, 3)) * s / a       # the noise's mean, in x0 units
    n_sd = float(noise.std())
    out[t] = {"error_sd": round(float(err.std()) * 127.5, 1), "slope": round(float(np.polyfit(noise, err, 1)[0]), 3),
              "best_error_sd": round(float(data_sd * n_sd / np.hypot(data_sd, n_sd)) * 127.5, 1),
              "best_slope": round(data_sd ** 2 / (data_sd ** 2 + n_sd ** 2), 3)}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True, help="a converted dataset with a train split (e.g. an experiment's)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--offsets", default="0,0.1")
  p.add_argument("--recipes", default="", help="diffusion.objective overrides, one recipe per ';' (key=value,...), "
                 "instead of --offsets")
  p.add_argument("--checkpoint", default="", help="a trained model's checkpoints (no training)")
  p.add_argument("--starts", default="noise,data", help="sampler.start values")
  p.add_argument("--images", type=int, default=64, help="generated images per pathology")
  p.add_argument("--datasets", default="", help="NAME=DIR,...: generated datasets to measure as they are "
                 "(their train split), instead of generating")
  a = p.parse_args()
  work = Path(a.workdir)
  preset = cpu_preset()
  size = preset.diffusion.data.image_size
  work.mkdir(parents=True, exist_ok=True)
  rows = {"real (training split)": grey(a.data, "train", size)}
  spreads, responses = {"real (training split)": spread(a.data, "train", size)}, {}
  if a.datasets:   # measured as they are: no box prior, no generation
    for item in a.datasets.split(","):
      name, _, path = item.partition("=")
      rows[name], spreads[name] = grey(path, "train", size), spread(path, "train", size)
    return report(a, rows, spreads, responses, f"--datasets '{a.datasets}'")
  prior = box_prior.fit_datasets([a.data], "train", **preset.box_prior.to_dict()).save(work / "box_prior.json")
  devices = [d for d in reader.open_dataset(a.data).vocab("device") if d != "unknown"]
  models = {"trained model": (Path(a.checkpoint), work / "checkpoint")} if a.checkpoint else {}
  recipes = [r for r in a.recipes.split(";") if r] or [f"offset_noise={x}" for x in a.offsets.split(",")]
  for recipe in ([] if a.checkpoint else recipes):
    out = work / recipe.replace("=", "_").replace(",", "__")
    d = ml_collections.ConfigDict(preset.diffusion.to_dict())
    d.data.sources.real.update(path=a.data, split="train")
    d.update(seed=preset.seed, num_steps=a.steps, checkpoint_every=a.steps)
    for item in recipe.split(","):
      key, _, value = item.partition("=")
      d.objective[key] = type(d.objective[key])(value)
    diffusion.train(d, out / "diffusion")
    name = f"offset noise {recipe.partition('=')[2]}" if not a.recipes else recipe.replace(",", ", ")
    models[f"{name}, {a.steps} steps"] = (out / "diffusion" / "checkpoints", out)
  for name, (checkpoint, out) in models.items():
    responses[name] = dc_response(str(checkpoint), a.data)
    for start in a.starts.split(","):
      g = generate.default_config()
      g.update(checkpoint=str(checkpoint), box_prior=str(prior), pathology=tuple(CLASSES), device=("all",),
               num_per_condition=max(1, a.images // len(devices)), per_device_batch=preset.generate.per_device_batch,
               local_devices=preset.generate.local_devices)
      g.sampler.update(preset.generate.sampler.to_dict())
      g.sampler.start = start
      ds = generate.generate(g, out / f"generated_{start}")
      rows[f"{name}, start from {start}"] = grey(str(ds), "train", size)
      spreads[f"{name}, start from {start}"] = spread(str(ds), "train", size)
  given = f"--checkpoint {a.checkpoint}" if a.checkpoint else f"--steps {a.steps} " + (
      f"--recipes \"{a.recipes}\"" if a.recipes else f"--offsets {a.offsets}")
  report(a, rows, spreads, responses, f"{given} --starts {a.starts} --images {a.images}")


def report(a, rows: dict, spreads: dict, responses: dict, given: str) -> None:
  work = Path(a.workdir)
  lines = [f"Command: `python docs/experiments/brightness_probe.py --data {a.data} --workdir {a.workdir} "
           f"{given}`", "",
           "| images | benign inside / outside | malignant inside / outside |", "|---|---|---|"]
  for name, g in rows.items():
    lines.append(f"| {name} | {g['benign'][0]} / {g['benign'][1]} | {g['malignant'][0]} / {g['malignant'][1]} |")
  devices = sorted(spreads["real (training split)"])
  lines += ["", "Spread of the images' mean grey level (sd over images, 0-255) per device:", "",
            "| images | " + " | ".join(devices) + " |", "|---" * (len(devices) + 1) + "|"]
  for name, per in spreads.items():
    lines.append(f"| {name} | " + " | ".join(str(per.get(d, "–")) for d in devices) + " |")
  if responses:
    ts = sorted(next(iter(responses.values())), reverse=True)
    lines += ["", "The x0 prediction's image-mean error on training images at step t: sd (grey levels) and slope "
              "on the noise's mean (best possible from x_t's mean alone in brackets):", "",
              "| model | " + " | ".join(f"t = {t}" for t in ts) + " |", "|---" * (len(ts) + 1) + "|"]
    for name, r in responses.items():
      lines.append(f"| {name} | " + " | ".join(
          f"{r[t]['error_sd']} ({r[t]['best_error_sd']}), slope {r[t]['slope']} ({r[t]['best_slope']})"
          for t in ts) + " |")
  text = "\n".join(lines)
  (work / "probe.json").write_text(json.dumps({"grey": rows, "spread": spreads,
                                               "dc_response": {k: {str(t): v for t, v in r.items()}
                                                               for k, r in responses.items()}}, indent=1))
  print(text)


if __name__ == "__main__":
  main()
