"""Does the audit see a model that memorises, and does protected sampling make its samples safe to share?

  python docs/experiments/memorisation.py --workdir /tmp/memo                      # train, sample, audit
  python docs/experiments/memorisation.py --workdir /tmp/memo --protect 0.1,1.0 0.05,0.5   # + protected runs

A 32-channel UNet at 32 px is trained for --steps (3,000) on 24 phantom images (the other 96 are held out),
120 images are generated (DPM-Solver++ multistep order 2, 20 steps, guidance 1.0) plainly and, for each
QUANTILE,SCALE given to --protect, with privacy protection (protect.holdout_quantile, protect.scale); each set
is audited (held-out calibration on the 96). Prints one RESULT line per set; docs/PRIVACY.md has the figures.
About 25 minutes on 2 CPU cores (training ~15 of them; a second run reuses the checkpoint).
"""

import argparse
import json
import time
from pathlib import Path

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported

from busgen_jax import generate  # noqa: E402
from busgen_jax.data import convert, reader  # noqa: E402
from busgen_jax.data import box_prior  # noqa: E402
from busgen_jax.evaluate import privacy  # noqa: E402
from busgen_jax.train import diffusion  # noqa: E402


def train(root: Path, steps: int) -> tuple[Path, Path]:
  c = convert.default_config()
  c.format, c.output, c.num_workers = "phantom", str(root / "data"), 0
  c.update_from_flattened_dict({"phantom.num_examples": 120, "phantom.size": 32,
                                "split.fractions": {"train": 0.2, "val": 0.0, "test": 0.8}})
  data = convert.convert(c)
  cfg = diffusion.default_config()
  cfg.num_steps, cfg.log_every, cfg.checkpoint_every = steps, 200, steps
  cfg.data.sources.real.path = str(data)
  cfg.data.image_size, cfg.data.batch_size = 32, 8
  cfg.model.update(ch=32, ch_mult=(1, 2), num_res_blocks=1, num_groups=4, attn_levels=(1,), num_pathology=4,
                   num_devices=7, dropout=0.0)
  cfg.optim.update(lr=1e-3, warmup_steps=50)
  diffusion.train(cfg, root / "dm")            # resumes (or returns at once) when already trained
  box_prior.fit_datasets([str(data)]).save(root / "prior.json")
  return data, root / "dm" / "checkpoints"


def sample_and_audit(root: Path, data: Path, ckpt: Path, name: str, protect: dict | None, mia: bool) -> dict:
  g = generate.default_config()
  g.update(checkpoint=str(ckpt), box_prior=str(root / "prior.json"), pathology=("benign", "malignant"),
           device=("all",), num_per_condition=20, per_device_batch=8, examples_per_shard=256, name=name)
  g.sampler.update(method="multistep", order=2, steps=20, guidance_scale=1.0)
  if protect:
    g.protect.update(bank=str(data), **protect)
  t = time.time()
  d = generate.generate(g, root / name)
  seconds = time.time() - t
  a = privacy.default_config()
  a.update(generated=str(d), train=str(data))
  if mia:
    a.mia.update(checkpoint=str(ckpt), max_per_group=256)
  rep = privacy.run(a, root / f"audit_{name}")
  prov = json.loads((d / "generation.json").read_text())["provenance"]["protect"]
  return {"generated": str(d), "radius": prov and prov["radius_used"], "seconds": seconds,
          "n": rep["n_generated"], "n_flagged": rep["n_flagged"], "dcr": rep["spaces"]["pixel"]["dcr"],
          "membership_inference": rep.get("membership_inference"), "safe": rep["verdict"]["safe_to_share"]}


def shas(d: str) -> list[str]:
  ds = reader.open_dataset(d)
  return [ds.decode(r, skip=("image", "mask"))["sha256"] for r in ds.records("train")]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--protect", nargs="*", default=[], help="QUANTILE,SCALE pairs")
  a = p.parse_args()
  root = Path(a.workdir)
  data, ckpt = train(root, a.steps)
  plain = sample_and_audit(root, data, ckpt, "plain", None, mia=True)
  print("RESULT plain", json.dumps(plain, default=float), flush=True)
  for spec in a.protect:
    q, scale = (float(v) for v in spec.split(","))
    res = sample_and_audit(root, data, ckpt, f"protect_q{q}_s{scale}".replace(".", "_"),
                           {"holdout_quantile": q, "scale": scale}, mia=False)
    res["changed"] = sum(x != y for x, y in zip(shas(res["generated"]), shas(plain["generated"])))
    print("RESULT", spec, json.dumps(res, default=float), flush=True)


if __name__ == "__main__":
  main()
