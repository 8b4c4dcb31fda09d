"""The few-shot arm's adaptation recipe (docs/EXPERIMENTS.md): LoRA settings chosen on the site's validation images.

  busgen-jax experiment --config configs/experiment.py:fewshot --workdir /tmp/fs6 ...   # the base run, once
  python docs/experiments/adapt_study.py --base /tmp/fs6 --workdir /tmp/adapt_study --families lr \
      --docs docs/EXPERIMENTS.md

Each variant adapts the base run's pretrained model to every draw of the base run (its site, shots and validation
images: the same seeds give the same draws) with the base run's `fewshot.adapt` and the variant's overrides
(keys under fewshot.adapt: optim.lr, lora.rank, num_steps, prior.weight). Adaptation alone, about 4.5 minutes a
draw at 200 steps here (the adapters folded into the kernels); no repositories, no classifiers. The criterion is the one that selects each adapter's checkpoint: the denoising loss on the site's validation images
at fixed (t, noise) draws, here its mean over the draws, lowest wins. The base row is the base run's own
adaptation, not repeated.

A variant's adapters land where the whole arm looks for them, so the selected variant's classifiers follow with
  busgen-jax experiment --config configs/experiment.py:fewshot --workdir <its directory> \
      --config.pretrained=<the run that trained BASE's model> --config.fewshot.adapt.<key>=<value> ...
which reuses the adaptation and adds the repositories and classifiers (the command is printed with the table).
Finished variants are read from WORKDIR/adapt_study.json; `--variants` runs only some of the others.
"""

import argparse
import json
import shlex
from pathlib import Path

import numpy as np

from busgen_jax import console, xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported

from busgen_jax.evaluate import report  # noqa: E402
from busgen_jax.stages import experiment, fewshot  # noqa: E402
from busgen_jax.train import adapt  # noqa: E402

# family -> variants: (name, {fewshot.adapt key: value}). The base run is a row of every family, under its own
# values; a variant with the base's values is that row, not run again.
FAMILIES = {
    "lr": [("lr 1e-3", {"optim.lr": 1e-3}), ("lr 3e-3", {"optim.lr": 3e-3}), ("lr 1e-2", {"optim.lr": 1e-2})],
    "rank": [("rank 4", {"lora.rank": 4, "lora.alpha": 4.0}), ("rank 8", {"lora.rank": 8, "lora.alpha": 8.0}),
             ("rank 32", {"lora.rank": 32, "lora.alpha": 32.0})],
    "steps": [("200 steps", {"num_steps": 200, "checkpoint_every": 100}),
              ("400 steps", {"num_steps": 400, "checkpoint_every": 200})],
    # prior preservation: that share of each batch from the pretraining images (the site's device left out)
    "prior": [("prior 0", {"prior.weight": 0.0}), ("prior 0.25", {"prior.weight": 0.25}),
              ("prior 0.5", {"prior.weight": 0.5})],
    # Which layers carry adapters (the site's new device row is trained in every variant): the attention and the
    # paths the labels enter by (the condition MLP and each block's projection of it), which diffusion LoRA
    # recipes adapt first; or the decoder alone, where the image's texture is finished.
    "layers": [("attention and conditioning", {"lora.targets": (r".*attn/.*", r".*cond_proj", r"cond_\d")}),
               ("decoder", {"lora.targets": (r"up/.*", "tail_conv")})],
}


def _get(cfg, key: str):
  for part in key.split("."):
    cfg = cfg[part]
  return cfg


def _json(x):
  """`x` as it reads back from adapt_study.json (tuples become lists), so recorded overrides compare equal."""
  return json.loads(json.dumps(x))


def markers(family: str) -> tuple[str, str]:
  return f"<!-- adapt-study-{family}:begin -->", f"<!-- adapt-study-{family}:end -->"


def variant_dir(work: Path, family: str, name: str) -> Path:
  from recipe_study import variant_dir   # this script's neighbour (its folder is on sys.path when run)
  return variant_dir(work, family, name)


def run_variant(base: Path, work: Path, family: str, name: str, overrides: dict, keys: list[str]) -> dict:
  """Adaptation of every draw in `keys` with the overrides; per draw the validation losses, best step, minutes."""
  from recipe_study import base_config
  cfg = base_config(base)
  cfg.pretrained = cfg.pretrained or str(base)   # the run that trained the model (the base may have reused one)
  cfg.fewshot.adapt.update_from_flattened_dict(overrides)
  out = variant_dir(work, family, name)
  data = json.loads((base / "stages" / "data.json").read_text())["result"]
  # The site as the experiment records it, so `busgen-jax experiment --workdir <out>` takes these adapters up.
  site = experiment.Record(out).run("fewshot_site", fewshot.stage_site, cfg, out, data)
  draws = {}
  for key in keys:   # adapt resumes a stopped adaptation; a finished one keeps its summary and time
    s = adapt.adapt(fewshot.adapt_config(cfg, site, key, experiment._model_dir(cfg, out), data),
                    fewshot.draw_dir(out, key) / "adapt")
    draws[key] = {"val_loss_start": s["val_loss_start"], "val_loss_best": s["val_loss_best"],
                  "best_step": s["best_step"], "minutes": s["seconds"] / 60}
  return draws


def base_draws(base: Path, keys: list[str]) -> dict:
  """The base run's own adaptations; their minutes as the adaptation recorded them (the run's stage time is a
  rebuild's when it reused an adaptation)."""
  out = {}
  for key in keys:
    s = json.loads((fewshot.draw_dir(base, key) / "adapt" / adapt.SUMMARY).read_text())
    out[key] = {**{x: s[x] for x in ("val_loss_start", "val_loss_best", "best_step")}, "minutes": s["seconds"] / 60}
  return out


def row(name: str, overrides: dict | None, draws: dict) -> dict:
  best = np.array([d["val_loss_best"] for d in draws.values()])
  start = np.array([d["val_loss_start"] for d in draws.values()])
  return {"variant": name, "overrides": overrides or {}, "draws": draws, "val_loss": float(best.mean()),
          "gain": float(np.mean(1 - best / start)), "minutes": float(np.mean([d["minutes"] for d in draws.values()]))}


def markdown(family: str, rows: list[dict], base: Path, work: Path, model_run: str) -> str:
  best = min(rows, key=lambda r: r["val_loss"])
  n = len(best["draws"])
  lines = [f"**{family}** (adaptation alone, {n} draws of `{base}`; selected on the site's validation denoising "
           "loss, mean over draws; the base row is the base run's own adaptation, its minutes as that run measured "
           "them)", "",
           "| variant | validation loss | below the start | best step per draw | minutes per draw |",
           "|---|---|---|---|---|"]
  for r in rows:
    name = f"**{r['variant']}**" if r is best else r["variant"]
    steps = ", ".join(str(d["best_step"]) for d in r["draws"].values())
    lines.append(f"| {name} | {r['val_loss']:.5f} | {100 * r['gain']:.1f}% | {steps} | {r['minutes']:.1f} |")
  lines += ["", f"Selected: {best['variant']}."]
  if best["overrides"]:
    flags = " ".join(shlex.quote(f"--config.fewshot.adapt.{k}={tuple(v) if isinstance(v, list) else v}")
                     for k, v in best["overrides"].items())
    lines += [f"Its classifiers: `busgen-jax experiment --config configs/experiment.py:fewshot --workdir "
              f"{variant_dir(work, family, best['variant'])} --config.pretrained={model_run} {flags}` (the adaptation is "
              "reused)."]
  return "\n".join(lines + [""])


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="a finished `busgen-jax experiment --config ...:fewshot` workdir")
  p.add_argument("--workdir", required=True)
  p.add_argument("--families", default=",".join(FAMILIES))
  p.add_argument("--variants", default="", help="run only the variants whose names contain one of these "
                 "|-separated strings (default: all); rows recorded before are kept")
  p.add_argument("--draws", default="", help="comma-separated draw keys (default: every draw of the base run)")
  p.add_argument("--docs", default="", help="a Markdown file whose adaptation-study sections to rewrite")
  a = p.parse_args()
  base, work = Path(a.base).expanduser(), Path(a.workdir).expanduser()
  console.setup(str(work), "adapt_study")   # progress bars on the console, library INFO into work/logs
  done = sorted(f.stem.removeprefix("fewshot_") for f in (base / "stages").glob("fewshot_k*_d*.json"))
  keys = a.draws.split(",") if a.draws else done
  if not keys or set(keys) - set(done):
    raise SystemExit(f"--base {base}: draws {sorted(set(keys) - set(done)) or keys} are not finished there "
                     f"(finished: {done})")
  from recipe_study import base_config   # this script's neighbour (its folder is on sys.path when run)
  base_cfg = base_config(base)
  results_file = work / "adapt_study.json"
  results = json.loads(results_file.read_text()) if results_file.exists() else {}
  families = a.families.split(",")
  for family in families:
    if family not in FAMILIES:
      raise SystemExit(f"--families: {family!r} is not one of {sorted(FAMILIES)}")
    recorded = {r["variant"]: r for r in results.get(family, ())}
    own = {k: _get(base_cfg.fewshot.adapt, k) for _, ov in FAMILIES[family] for k in ov}
    rows = [row("base run (" + ", ".join(f"{k}={v}" for k, v in own.items()) + ")", None, base_draws(base, keys))]
    print(f"RESULT {family} | {rows[0]['variant']} | validation loss {rows[0]['val_loss']:.5f}", flush=True)
    for name, overrides in FAMILIES[family]:
      old = recorded.get(name)
      if all(own[k] == v for k, v in overrides.items()):
        continue   # the base run's own recipe: its row above
      elif old and old["overrides"] == _json(overrides) and sorted(old["draws"]) == sorted(keys):
        rows.append(old)   # finished: recorded with its times (the adapters stay where they are)
      elif not a.variants or any(v in name for v in a.variants.split("|")):
        rows.append(row(name, overrides, run_variant(base, work, family, name, overrides, keys)))
      elif old:
        rows.append(old)
      else:
        continue
      print(f"RESULT {family} | {name} | validation loss {rows[-1]['val_loss']:.5f}", flush=True)
    results[family] = rows
    work.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps(results, indent=1))
  md = {family: markdown(family, rows, base, work, base_cfg.pretrained or str(base)) for family, rows in results.items()}
  (work / "adapt_study.md").write_text("\n".join(md.values()))
  print("\n".join(md.values()))
  for family in families if a.docs else ():
    report.write_section(Path(a.docs), md[family], *markers(family), f"Adaptation study: {family}")


if __name__ == "__main__":
  main()
