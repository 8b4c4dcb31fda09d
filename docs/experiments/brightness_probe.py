"""Does offset noise fix the generated images' brightness? Two short pretrainings compared at equal steps.

  python docs/experiments/brightness_probe.py --data /tmp/exp_cpu/data/busbra/1.0.0 --workdir /tmp/brightness \
      [--steps 400] [--offsets 0,0.1] [--images 64]

Each variant trains the `cpu` preset's diffusion model (configs/experiment.py:cpu, its seed) on the dataset's
training split for `--steps` steps, with `diffusion.objective.offset_noise` at that value, then generates
about `--images` images per pathology (spread over the devices) with the preset's sampler and the training split's box prior. The table gives the
mean grey level (0-255) inside and outside the lesion boxes through the model's own view (the evaluation pipeline
at the model's image size), against the real training images'. It measures brightness only, far short of the
full training: it says whether the mean-brightness error is the sampler's (offset noise fixes it at any length)
or the model's (it shrinks with training), not which recipe classifies best (the recipe study's job).
"""

import argparse
import json
import sys
from pathlib import Path

from absl import flags

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
  p.add_argument("--images", type=int, default=64, help="generated images per pathology")
  a = p.parse_args()
  work = Path(a.workdir)
  preset = cpu_preset()
  size = preset.diffusion.data.image_size
  work.mkdir(parents=True, exist_ok=True)
  prior = box_prior.fit_datasets([a.data], "train", **preset.box_prior.to_dict()).save(work / "box_prior.json")
  devices = [d for d in reader.open_dataset(a.data).vocab("device") if d != "unknown"]
  rows = {"real (training split)": grey(a.data, "train", size)}
  for offset in (float(x) for x in a.offsets.split(",")):
    out = work / f"offset_{offset}"
    d = ml_collections.ConfigDict(preset.diffusion.to_dict())
    d.data.sources.real.update(path=a.data, split="train")
    d.update(seed=preset.seed, num_steps=a.steps, checkpoint_every=a.steps)
    d.objective.offset_noise = offset
    diffusion.train(d, out / "diffusion")
    g = generate.default_config()
    g.update(checkpoint=str(out / "diffusion" / "checkpoints"), box_prior=str(prior), pathology=tuple(CLASSES),
             device=("all",), num_per_condition=max(1, a.images // len(devices)),
             per_device_batch=preset.generate.per_device_batch,
             local_devices=preset.generate.local_devices)
    g.sampler.update(preset.generate.sampler.to_dict())
    ds = generate.generate(g, out / "generated")
    rows[f"offset noise {offset}, {a.steps} steps"] = grey(str(ds), "train", size)
  lines = [f"Command: `python docs/experiments/brightness_probe.py --data {a.data} --workdir {a.workdir} "
           f"--steps {a.steps} --offsets {a.offsets} --images {a.images}`", "",
           "| images | benign inside / outside | malignant inside / outside |", "|---|---|---|"]
  for name, g in rows.items():
    lines.append(f"| {name} | {g['benign'][0]} / {g['benign'][1]} | {g['malignant'][0]} / {g['malignant'][1]} |")
  text = "\n".join(lines)
  (work / "probe.json").write_text(json.dumps(rows, indent=1))
  print(text)


if __name__ == "__main__":
  main()
