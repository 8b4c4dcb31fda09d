"""The `cpu` preset's recipe study (docs/EXPERIMENTS.md): generation and classifier settings on one trained model.

  busgen-jax experiment --config configs/experiment.py:cpu --workdir /tmp/exp_cpu        # the base run, once
  python docs/experiments/recipe_study.py --base /tmp/exp_cpu --workdir /tmp/study --docs docs/EXPERIMENTS.md

Each variant is the base run's config with `--config.pretrained=BASE` (the base run's data, diffusion model and
box prior; its repository and real-only classifier too where they would come out the same) and the variant's
overrides. A family varies one thing and names the arm it aims at; its variants are compared on that arm's
**validation** AUC (the selected checkpoint's, on the real validation fold). The test fold is shown once per
family, for the variant the validation fold selected; the other variants' test figures are not reported.
Families:
  guidance    guidance scale of the sampler (1x repositories; the base's own at 1x is its nested subset)
  steps       sampler steps: fewer steps, more images per CPU minute (1x repositories)
  classifier  the classifier recipe on generated images (the base's 2x repository)
  mixing      the real + generated arm: the generated share of one stream, or the generated-only classifier
              fine-tuned on the real images (the base's 2x repository)
  pretraining the diffusion model itself: the objective (v prediction, alone and with min-SNR weighting,
              against the eps network's brightness error; offset noise); each
              variant trains its own model on the base run's converted data (about 27 minutes here) and
              generates a 1x repository
  schedule    steps vs batch, learning rate and EMA of pretraining (each its own model, as pretraining)
  architecture width, attention placement and image size (each its own model, trained for the base's
              training FLOPs: steps x the model's FLOPs per image, unet.flops_per_image, held equal)
`--families` runs some of them (finished variants are reused); `--variants` reruns some and keeps the rows
study.json holds for the others; `--docs` rewrites only their tables. `--seeds N` runs every variant, the base
too, at N seeds and selects on the mean: one repository's validation AUC moves by about 0.02 with the seed alone
(docs/EXPERIMENTS.md, Schedule), more than most variants differ. In the classifier and mixing families, which
train on the base's repository, the other seeds are the classifiers' (`classifier_seed`) and the repository stays.
"""

import argparse
import copy
import json
import shutil
from pathlib import Path

import numpy as np

from busgen_jax import console, xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported

from busgen_jax.stages import experiment  # noqa: E402
from busgen_jax.evaluate import report  # noqa: E402

def markers(family: str) -> tuple[str, str]:
  """Each family's table has its own block in the docs: a run of some families rewrites only theirs."""
  return f"<!-- recipe-study-{family}:begin -->", f"<!-- recipe-study-{family}:end -->"

# Families on the base's own repository: their other seeds are the classifiers' alone (the repository stays).
CLASSIFIER_ONLY = ("classifier", "mixing")
SAME_FLOPS = "the base's training FLOPs"   # a num_steps value: as many steps as the base's FLOPs buy
# family -> (arm whose validation AUC selects, the base's arm at the same repository size, variants)
# variant: (name, {config key: value}); "base" rows are the base run itself.
_OWN_MODEL = "1x repositories, each from its own diffusion model; the base row is its nested 1x subset"
SIZES = {"guidance": "1x repositories; the base row is its nested 1x subset",
         "steps": "1x repositories; the base row is its nested 1x subset",
         "classifier": "the base's 2x repository", "mixing": "the base's 2x repository, real + generated",
         "pretraining": _OWN_MODEL, "schedule": _OWN_MODEL, "architecture": _OWN_MODEL}
FAMILIES = {
    "guidance": ("generated", "generated x1", [
        ("guidance 1.5", {"generate.sampler.guidance_scale": 1.5, "generate.multiples": (1.0,)}),
        ("guidance 2.0", {"generate.sampler.guidance_scale": 2.0, "generate.multiples": (1.0,)}),
        ("guidance 2.8 (base)", None),
        ("guidance 4.0", {"generate.sampler.guidance_scale": 4.0, "generate.multiples": (1.0,)}),
    ]),
    "steps": ("generated", "generated x1", [
        ("DPM-Solver++ 2M, 6 steps", {"generate.sampler.steps": 6, "generate.multiples": (1.0,)}),
        ("DPM-Solver++ 2M, 10 steps (base)", None),
    ]),
    "classifier": ("generated", "generated", [
        ("base recipe (1500 steps, gain/speckle/depth augmentations)", None),
        ("no ultrasound augmentations", {"generated_overrides": ("data.ultrasound_augment=()",)}),
        ("750 steps", {"generated_overrides": ("num_steps=750",)}),
        ("3000 steps", {"generated_overrides": ("num_steps=3000",)}),
        ("label smoothing 0.1", {"generated_overrides": ("label_smoothing=0.1",)}),
    ]),
    "mixing": ("mixed", "mixed", [
        ("generated share 0.2", {"mixed_weight_generated": 0.2}),
        ("generated share 0.35", {"mixed_weight_generated": 0.35}),
        ("generated share 0.5 (base)", None),
        # Pretrain on generated, then fine-tune on real: the synthetic images as an initialisation rather than
        # as data in the same stream (the real arm's recipe, then a shorter, gentler one).
        ("fine-tune the generated classifier on real", {"mixed": "finetune"}),
        ("fine-tune on real, 750 steps at lr 1e-3", {"mixed": "finetune",
                                                     "finetune_overrides": ("num_steps=750", "optim.lr=1e-3")}),
    ]),
    "pretraining": ("generated", "generated x1", [
        ("eps prediction, 1400 steps x batch 16 (base)", None),
        ("v prediction, uniform weighting", {"diffusion.objective.prediction": "v", "generate.multiples": (1.0,)}),
        ("v prediction, min-SNR weighting (gamma 5)", {"diffusion.objective.prediction": "v",
                                                       "diffusion.objective.weighting": "min_snr",
                                                       "generate.multiples": (1.0,)}),
        ("eps prediction, offset noise 0.1", {"diffusion.objective.offset_noise": 0.1,
                                              "generate.multiples": (1.0,)}),
    ]),
    # The optimisation at about the base's CPU minutes: more, smaller steps; a higher learning rate; a shorter EMA.
    "schedule": ("generated", "generated x1", [
        ("1400 steps x batch 16, lr 1e-3, EMA 0.995 (base)", None),
        ("2800 steps x batch 8", {"diffusion.num_steps": 2800, "diffusion.data.batch_size": 8,
                                  "generate.multiples": (1.0,)}),
        ("learning rate 2e-3", {"diffusion.optim.lr": 2e-3, "generate.multiples": (1.0,)}),
        # Not 0.999: the EMA's warm-up caps the decay at (1 + s) / (10 + s), 0.9936 by the base's last step, so
        # any ema_decay above that trains the base's model bit for bit (measured: see docs/EXPERIMENTS.md).
        ("EMA 0.99", {"diffusion.optim.ema_decay": 0.99, "generate.multiples": (1.0,)}),
    ]),
    # The network at the base's training FLOPs: a variant whose step costs more takes fewer steps.
    "architecture": ("generated", "generated x1", [
        ("64 px, 32 channels, attention at 16 px (base)", None),
        ("48 channels", {"diffusion.model.ch": 48, "diffusion.num_steps": SAME_FLOPS,
                         "generate.multiples": (1.0,)}),
        ("attention at 32 and 16 px", {"diffusion.model.attn_levels": (1, 2), "diffusion.num_steps": SAME_FLOPS,
                                       "generate.multiples": (1.0,)}),
        ("96 px", {"diffusion.data.image_size": 96, "diffusion.num_steps": SAME_FLOPS,
                   "generate.multiples": (1.0,)}),
    ]),
}


def equal_flops_steps(base_cfg, cfg) -> int:
  """Steps of `cfg`'s model and image size that cost the base run's training FLOPs (its steps x batch x FLOPs
  per image)."""
  from busgen_jax.models import unet
  def cost(c):
    return unet.flops_per_image(c.diffusion.model, c.diffusion.data.image_size) * c.diffusion.data.batch_size
  return max(1, round(base_cfg.diffusion.num_steps * cost(base_cfg) / cost(cfg)))


def same_ema_only(base_cfg, cfg, overrides: dict) -> bool:
  """Whether a variant differs from the base only in EMA decays that its run never reaches (same model)."""
  from busgen_jax.train import state
  if {k for k in overrides if k.startswith("diffusion.")} != {"diffusion.optim.ema_decay"}:
    return False
  steps = np.arange(cfg.diffusion.num_steps)
  return bool(np.array_equal(state.ema_decay_at(base_cfg.diffusion.optim, steps, np),
                             state.ema_decay_at(cfg.diffusion.optim, steps, np)))


def base_config(base: Path):
  """The base run's own settings (its config.json), on today's defaults: variants differ from the base run by
  their overrides alone, whatever the `cpu` preset has become since."""
  cfg = experiment.default_config("cpu")

  def flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
      out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
  saved = json.loads((base / "config.json").read_text())
  saved.pop("external", None)
  cfg.update_from_flattened_dict({k: tuple(v) if isinstance(v, list) else v for k, v in flatten(saved).items()})
  return cfg


def variant_dir(work: Path, family: str, name: str) -> Path:
  return work / family / "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def run_variant(base: Path, work: Path, family: str, name: str, overrides: dict) -> dict:
  base_cfg = base_config(base)
  cfg = copy.deepcopy(base_cfg)
  cfg.update(skip=("quality", "audit"), docs="")
  cfg.generate.multiples = (2.0,)           # no scaling arms: the family's arm and real + mixed
  cfg.update_from_flattened_dict({k: v for k, v in overrides.items() if v != SAME_FLOPS})
  if overrides.get("diffusion.num_steps") == SAME_FLOPS:   # after the overrides that change the step's cost
    cfg.diffusion.num_steps = equal_flops_steps(base_cfg, cfg)
  if same_ema_only(base_cfg, cfg, overrides):
    raise SystemExit(f"{family} / {name}: its EMA decays equal the base's at every step (the warm-up's cap "
                     "(1 + s) / (10 + s) is below both ema_decay values): it would train the base's model")
  out = variant_dir(work, family, name)
  if any(k.startswith("diffusion.") for k in overrides):
    # A model of its own on the base run's converted data; the real-only classifier is the base's (same data,
    # same recipe), restored and only evaluated.
    cfg.data.dataset = json.loads((base / "stages" / "data.json").read_text())["result"]["dataset"]
    cfg.pretrained = ""   # a base that itself reused a model (its own `pretrained`) must not lend it here
    if not (out / "classify" / "real").exists():
      shutil.copytree(base / "classify" / "real", out / "classify" / "real",
                      ignore=shutil.ignore_patterns("eval", "events.*"))
  else:
    cfg.pretrained = str(base)
  return experiment.run(cfg, str(out))


def base_rerun(family: str, base_cfg) -> dict:
  """The base recipe as a variant (for its runs at other seeds): the same repository size as the family's
  variants, and for the own-model families a model of its own (any diffusion key makes one)."""
  ov = {"generate.multiples": (1.0,)} if FAMILIES[family][1] == "generated x1" else {}
  if SIZES[family] == _OWN_MODEL:
    ov["diffusion.num_steps"] = base_cfg.diffusion.num_steps
  return ov


def combine(runs: list[dict]) -> dict:
  """One variant's row from its runs at several seeds: the means (what selects), the spread, and every run."""
  if len(runs) == 1:
    return runs[0]
  mean = lambda k: float(np.mean([r[k] for r in runs]))
  sd = lambda k: float(np.std([r[k] for r in runs], ddof=1))
  return {**{k: mean(k) for k in ("val_auc", "test_auc", "tstr_over_trtr", "mixed_minus_real", "real_test_auc")},
          "val_sd": sd("val_auc"), "test_sd": sd("test_auc"), "test_ci": runs[0]["test_ci"], "runs": runs}


def row(summary: dict, arm: str) -> dict:
  t = summary["tests"][experiment.INTERNAL]
  a = t["arms"][arm]
  return {"val_auc": a["val_auc"], "test_auc": a["auc"], "test_ci": a["auc_ci95"],
          "tstr_over_trtr": t["tstr_over_trtr"], "mixed_minus_real": t["mixed_minus_real"],
          "real_test_auc": t["arms"]["real"]["auc"]}


def markdown(family: str, rows: list[dict]) -> str:
  arm = FAMILIES[family][0]
  best = max(rows, key=lambda r: r["val_auc"])
  seeds = max(len(r.get("runs", ())) or 1 for r in rows)
  what = ("the classifiers' (the base's repository)" if family in CLASSIFIER_ONLY else
          "repositories, classifiers and own models")
  over = (f", mean ± sd over {seeds} seeds: {what}; the base's other seeds are runs of their own"
          if seeds > 1 else "")
  lines = [f"**{family}** ({SIZES[family]}; selected on the `{arm}` arm's validation AUC{over})", "",
           f"| variant | validation AUC | test AUC {'(mean ± sd)' if seeds > 1 else '[95% CI]'} |", "|---|---|---|"]
  spread = lambda r, k: f" ± {r[k]:.3f}" if k in r else ""
  for r in rows:
    test = "–"
    if r is best:
      test = (f"{r['test_auc']:.3f}{spread(r, 'test_sd')}" if "test_sd" in r else
              f"{r['test_auc']:.3f} [{r['test_ci'][0]:.3f}, {r['test_ci'][1]:.3f}]")
    lines.append(f"| {'**' + r['variant'] + '**' if r is best else r['variant']} | "
                 f"{r['val_auc']:.3f}{spread(r, 'val_sd')} | {test} |")
  lines += ["", f"Selected: {best['variant']}; on the test fold TSTR/TRTR {best['tstr_over_trtr']:.3f}, real + "
            f"generated − real {best['mixed_minus_real']:+.3f} (real only {best['real_test_auc']:.3f}).", ""]
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="a finished `busgen-jax experiment --config ...:cpu` workdir")
  p.add_argument("--workdir", required=True)
  p.add_argument("--families", default=",".join(FAMILIES))
  p.add_argument("--variants", default="", help="run only the variants whose names contain one of these "
                 "|-separated strings (default: all); the family's table then holds these and the base")
  p.add_argument("--docs", default="", help="a Markdown file whose recipe-study section to rewrite")
  p.add_argument("--seeds", type=int, default=1, help="runs per variant, the base included, at seeds base + 0, "
                 "1, ...: a new repository and classifiers (and model, in the own-model families) each; rows are "
                 "means and selection is on the mean (one repository's validation AUC moves by ~0.02)")
  a = p.parse_args()
  base, work = Path(a.base).expanduser(), Path(a.workdir).expanduser()
  base_summary = json.loads((base / "report.json").read_text())
  console.setup(str(work), "recipe_study")   # progress bars on the console, library INFO into work/logs
  base_cfg = base_config(base)
  results_file = work / "study.json"
  results = json.loads(results_file.read_text()) if results_file.exists() else {}
  for family in a.families.split(","):
    arm, base_arm, variants = FAMILIES[family]
    # Rows recorded by an earlier run and not requested now are kept: a variant's run directory may have been
    # cleared to free disk once its row was written.
    recorded = {r["variant"]: r for r in results.get(family, ())}
    rows = []
    for name, overrides in variants:
      if a.variants and overrides is not None and not any(v in name for v in a.variants.split("|")):
        if name in recorded:
          rows.append(recorded[name])
        continue
      runs = []
      for r in range(a.seeds):
        if overrides is None and r == 0:   # the base run itself
          runs.append(row(base_summary, base_arm))
          continue
        ov = {**(base_rerun(family, base_cfg) if overrides is None else overrides)}
        if r:
          ov["classifier_seed" if family in CLASSIFIER_ONLY else "seed"] = base_cfg.seed + r
        runs.append(row(run_variant(base, work, family, name + (f" seed {r}" if r else ""), ov), arm))
      rows.append({"variant": name, **combine(runs)})
      print(f"RESULT {family} | {name} | validation AUC {rows[-1]['val_auc']:.4f}", flush=True)
    results[family] = rows
    work.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1))
  md = {family: markdown(family, rows) for family, rows in results.items()}
  (work / "study.md").write_text("\n".join(md.values()))
  print("\n".join(md.values()))
  for family in a.families.split(",") if a.docs else ():
    report.write_section(Path(a.docs), md[family], *markers(family), f"Recipe study: {family}")


if __name__ == "__main__":
  main()
