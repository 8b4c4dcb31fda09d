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

Each model (the given checkpoint, or the `cpu` preset's diffusion model trained for `--steps` steps on the
dataset's training split with `diffusion.objective.offset_noise` at each value) generates about `--images` images
per pathology (spread over the devices) with the preset's sampler and the training split's box prior, once per
`sampler.start`: "noise" (pure noise, the official start) and "data" (x_T carries the training images' mean grey
level, as the forward process does; samplers.sample_from_keys). The table gives the mean grey level (0-255) inside
and outside the lesion boxes through the model's own view (the evaluation pipeline at the model's image size),
against the real training images'. It measures brightness only, not which recipe classifies best (the recipe
study's and the preset's job).
"""

import argparse
import json
import sys
from pathlib import Path

from busgen_jax import xla_env  # noqa: E402

xla_env.apply()   # as the CLI does, before jax is first imported

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
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


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True, help="a converted dataset with a train split (e.g. an experiment's)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=400)
  p.add_argument("--offsets", default="0,0.1")
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
  if a.datasets:   # measured as they are: no box prior, no generation
    for item in a.datasets.split(","):
      name, _, path = item.partition("=")
      rows[name] = grey(path, "train", size)
    return report(a, rows, f"--datasets '{a.datasets}'")
  prior = box_prior.fit_datasets([a.data], "train", **preset.box_prior.to_dict()).save(work / "box_prior.json")
  devices = [d for d in reader.open_dataset(a.data).vocab("device") if d != "unknown"]
  models = {"trained model": (Path(a.checkpoint), work / "checkpoint")} if a.checkpoint else {}
  for offset in ([] if a.checkpoint else [float(x) for x in a.offsets.split(",")]):
    out = work / f"offset_{offset}"
    d = ml_collections.ConfigDict(preset.diffusion.to_dict())
    d.data.sources.real.update(path=a.data, split="train")
    d.update(seed=preset.seed, num_steps=a.steps, checkpoint_every=a.steps)
    d.objective.offset_noise = offset
    diffusion.train(d, out / "diffusion")
    models[f"offset noise {offset}, {a.steps} steps"] = (out / "diffusion" / "checkpoints", out)
  for name, (checkpoint, out) in models.items():
    for start in a.starts.split(","):
      g = generate.default_config()
      g.update(checkpoint=str(checkpoint), box_prior=str(prior), pathology=tuple(CLASSES), device=("all",),
               num_per_condition=max(1, a.images // len(devices)), per_device_batch=preset.generate.per_device_batch,
               local_devices=preset.generate.local_devices)
      g.sampler.update(preset.generate.sampler.to_dict())
      g.sampler.start = start
      ds = generate.generate(g, out / f"generated_{start}")
      rows[f"{name}, start from {start}"] = grey(str(ds), "train", size)
  given = f"--checkpoint {a.checkpoint}" if a.checkpoint else f"--steps {a.steps} --offsets {a.offsets}"
  report(a, rows, f"{given} --starts {a.starts} --images {a.images}")


def report(a, rows: dict, given: str) -> None:
  work = Path(a.workdir)
  lines = [f"Command: `python docs/experiments/brightness_probe.py --data {a.data} --workdir {a.workdir} "
           f"{given}`", "",
           "| images | benign inside / outside | malignant inside / outside |", "|---|---|---|"]
  for name, g in rows.items():
    lines.append(f"| {name} | {g['benign'][0]} / {g['benign'][1]} | {g['malignant'][0]} / {g['malignant'][1]} |")
  text = "\n".join(lines)
  (work / "probe.json").write_text(json.dumps(rows, indent=1))
  print(text)


if __name__ == "__main__":
  main()
