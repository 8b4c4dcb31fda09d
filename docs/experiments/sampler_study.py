"""The sampler study (docs/SAMPLING.md): quality and utility of generated images against network evaluations per image,
on the `cpu` experiment preset's model and its distilled students.

  busgen-jax experiment --config configs/experiment.py:cpu --workdir /tmp/exp_cpu                 # the base run
  busgen-jax distill --config configs/distill.py --workdir /tmp/student_g \
      --config.teacher=/tmp/exp_cpu/diffusion/checkpoints                                        # a guidance student
  python docs/experiments/sampler_study.py --base /tmp/exp_cpu --student /tmp/student_g/checkpoints \
      --workdir /tmp/sampler_study --docs docs/SAMPLING.md

Every variant generates a 1x repository (the real training split's pathology x device counts, the base run's box
prior, seed 0, guidance 2.8) and is scored on:
  FD / KID / precision / recall  against the real training images, on the base run's real-only classifier's
                                 features (the experiment's domain encoder), with bootstrap CIs;
  TSTR                           a classifier trained on the generated images alone, with the base run's recipe for
                                 generated data; its AUC on the real **validation** fold (which also selects its
                                 checkpoint) with a case-level bootstrap CI.
The reference row is the official sampler (DPM-Solver++ singlestep order 3, 50 steps, guided on a doubled batch: 100
evaluations per image). The cpu preset's row is its sampler, generated like every other row (not the base run's
own 2x repository). With --docs (the decision this study makes, among the rows run), the test fold is read once,
for the reference and the fewest-evaluation variant whose validation AUC and FD lie within the reference's CIs,
and for no other row. Finished variants are reused; --variants runs some besides the reference
and the preset (e.g. "guidance student|8 steps, guided").
"""

import argparse
import json
import time
from pathlib import Path

from busgen_jax import console, xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported

import ml_collections  # noqa: E402

from busgen_jax import generate  # noqa: E402
from busgen_jax.evaluate import fidelity, report  # noqa: E402
from busgen_jax.stages import classify, experiment  # noqa: E402

BEGIN, END = "<!-- sampler-study:begin -->", "<!-- sampler-study:end -->"
INTERVAL = (0.3, 3.0)   # guidance only where 0.3 < sigma/alpha <= 3 (Kynkaanniemi et al. 2024's range for EDM2)

# name -> (model: "teacher" | "student", overrides of the base run's sampler).
# The reference is the official sampler (its solver and 50 steps; the start every row has, sampler.start="data").
REFERENCE = "official sampler: DPM-Solver++ 3S, 50 steps, guided"
TEN_STEPS = "DPM-Solver++ 2M, 10 steps, guided, last step first order"
PRESET = "DPM-Solver++ 2M, 8 steps, guidance interval (the cpu preset)"
OFFICIAL_RULE = "DPM-Solver++ 2M, 10 steps, guided, last step second order (the official rule)"
VARIANTS = {
    REFERENCE: ("teacher", {"method": "singlestep", "order": 3, "steps": 50}),
    TEN_STEPS: ("teacher", {"lower_order_final_below": 15}),
    OFFICIAL_RULE: ("teacher", {"lower_order_final_below": 10}),
    "DPM-Solver++ 2M, 8 steps, guided": ("teacher", {"steps": 8}),
    PRESET: ("teacher", {"steps": 8, "guidance_interval": INTERVAL}),
    "guidance student, DPM-Solver++ 2M, 8 steps": ("student", {}),
    "guidance student, DPM-Solver++ 2M, 4 steps": ("student", {"steps": 4, "student_plan": "config"}),
}


def slug(name: str) -> str:
  return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def conditions_1x(base: Path) -> list[dict]:
  data = json.loads((base / "stages" / "data.json").read_text())["result"]
  cfg = json.loads((base / "config.json").read_text())
  pathology = cfg["generate"]["pathology"]
  n_real = sum(n for p in pathology for n in data["counts"].get(p, {}).values())
  return generate.proportional_conditions(data["counts"], pathology, n_real, cfg["generate"]["proportions"])


def run_generate(base: Path, out: Path, checkpoint: str, overrides: dict) -> dict:
  cfg = json.loads((base / "config.json").read_text())
  cond_file = out / "conditions.json"
  cond_file.write_text(json.dumps(conditions_1x(base), indent=1))
  g = generate.default_config()
  g.update(checkpoint=checkpoint, box_prior=str(base / "box_prior.json"), condition_file=str(cond_file),
           per_device_batch=cfg["generate"]["per_device_batch"], local_devices=cfg["generate"]["local_devices"],
           examples_per_shard=512, name="generated", seed=cfg["seed"])
  g.sampler.update({k: tuple(v) if isinstance(v, list) else v for k, v in cfg["generate"]["sampler"].items()
                    if k in g.sampler})
  g.sampler.update(overrides)
  t = time.time()
  ds = generate.generate(g, out / "generated")
  info = json.loads((ds / "generation.json").read_text())
  return {"dataset": str(ds), "evals": info["network_evals_per_image"], "seconds": time.time() - t,
          "images": info["num_examples"], "sampler": info["provenance"]["sampler"]}


def base_experiment_config(base: Path) -> ml_collections.ConfigDict:
  from recipe_study import base_config   # this script's neighbour (its folder is on sys.path when run)
  return base_config(base)


def tests(base: Path, with_test: bool) -> ml_collections.ConfigDict:
  data = json.loads((base / "stages" / "data.json").read_text())["result"]
  out = {"validation": {"path": data["dataset"], "split": "val"}}
  if with_test:
    out[experiment.INTERNAL] = {"path": data["dataset"], "split": "test"}
  return ml_collections.ConfigDict(out)


def tstr(base: Path, out: Path, generated: dict) -> dict:
  """The generated-only classifier's reports on the validation fold (and, later, the test fold)."""
  cfg = base_experiment_config(base)
  data = json.loads((base / "stages" / "data.json").read_text())["result"]
  k = experiment.classifier_config(cfg, {"real": None, "generated": (1.0, 0)}, data,
                                   {"dataset": generated["dataset"]}, {})
  k.test = tests(base, False)
  return classify.run(k, out / "classify")


def quality(base: Path, out: Path, dataset: str) -> dict:
  data = json.loads((base / "stages" / "data.json").read_text())["result"]
  q = fidelity.default_config()
  q.update(real=data["dataset"], real_split="train", generated=dataset,
           encoder=str(base / "classify" / "real" / "best"), conditions=(), bootstrap=100)
  q.tstr.update(synthetic="", real="")
  return fidelity.run(q, out / "quality")["fidelity"]["all"]


def run_variant(base: Path, work: Path, student: str, name: str, spec) -> dict:
  out = work / slug(name)
  done = out / "result.json"
  if done.exists():
    return json.loads(done.read_text())
  out.mkdir(parents=True, exist_ok=True)
  print(f"sampler study: {name} ...", flush=True)
  model, overrides = spec
  checkpoint = str(base / "diffusion" / "checkpoints") if model == "teacher" else student
  generated = run_generate(base, out, checkpoint, overrides)
  val = tstr(base, out, generated)["validation"]
  fid = quality(base, out, generated["dataset"])
  result = {"variant": name, "evals": generated["evals"], "images": generated["images"],
            "generate_seconds": generated["seconds"], "sampler": generated["sampler"],
            "val_auc": val["auc"], "val_ci": val["auc_ci95"], "fd": fid["fd"], "kid": fid["kid"],
            "precision": fid["precision"], "recall": fid["recall"], "dir": str(out)}
  done.write_text(json.dumps(result, indent=1))
  print(f"RESULT {name}: {result['evals']} evals, FD {fid['fd']['value']:.3f}, val AUC {val['auc']:.3f}", flush=True)
  return result


def within(r: dict, ref: dict) -> bool:
  """Validation AUC inside the reference's CI, and FD no worse than the upper end of the reference's CI."""
  return ref["val_ci"][0] <= r["val_auc"] and r["fd"]["value"] <= ref["fd"]["ci"][1]


def reference(rows: list[dict]) -> dict:
  return next(r for r in rows if r["variant"] == REFERENCE)


def markdown(rows: list[dict], test: dict) -> str:
  ref = reference(rows)
  ci = lambda v, c, f="{:.3f}": f"{f.format(v)} [{f.format(c[0])}, {f.format(c[1])}]"
  lines = ["| sampler | network evaluations / image | images/s here | FD [95% CI] | KID [95% CI] | precision | "
           "recall | TSTR validation AUC [95% CI] | within the official sampler's CIs |",
           "|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    rate = f"{r['images'] / r['generate_seconds']:.2f}" if r.get("generate_seconds") else "–"
    ok = "reference" if r is ref else ("yes" if within(r, ref) else "no")
    lines.append(f"| {r['variant']} | {r['evals']} | {rate} | {ci(r['fd']['value'], r['fd']['ci'])} | "
                 f"{ci(r['kid']['value'], r['kid']['ci'], '{:.4f}')} | {r['precision']['value']:.3f} | "
                 f"{r['recall']['value']:.3f} | {ci(r['val_auc'], r['val_ci'])} | {ok} |")
  lines.append("")
  for name, t in test.items():
    lines.append(f"- Test fold (read once), TSTR AUC of **{name}**: {ci(t['auc'], t['auc_ci95'])}")
  return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
  for ax, key, label in ((axes[0], "fd", "FD (lower is better)"), (axes[1], "val", "TSTR validation AUC")):
    for r in rows:
      v, c = (r["fd"]["value"], r["fd"]["ci"]) if key == "fd" else (r["val_auc"], r["val_ci"])
      ax.errorbar([r["evals"]], [v], yerr=[[v - c[0]], [c[1] - v]], fmt="o", capsize=3, label=r["variant"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("network evaluations per image")
    ax.set_title(label)
  axes[1].legend(fontsize=6, loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--base", required=True, help="a finished `busgen-jax experiment --config ...:cpu` workdir")
  p.add_argument("--student", required=True, help="a guidance student's checkpoints (busgen-jax distill)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--variants", default="", help="|-separated substrings: run only these (besides the reference "
                 "and the preset)")
  p.add_argument("--docs", default="", help="a Markdown file whose sampler-study section to rewrite: the decision "
                 "(the test fold is read only then)")
  a = p.parse_args()
  base, work = Path(a.base).expanduser(), Path(a.workdir).expanduser()
  work.mkdir(parents=True, exist_ok=True)
  console.setup(str(work), "sampler_study")   # progress bars on the console, library INFO into work/logs
  rows = [run_variant(base, work, a.student, name, spec) for name, spec in VARIANTS.items()
          if name in (REFERENCE, PRESET) or not a.variants or any(v in name for v in a.variants.split("|"))]
  # The decision: the fewest evaluations within the reference's CIs. Its test fold (and the reference's) once.
  # The decision is made when the table is written (--docs), among the rows run: only then is the test fold read.
  ref = reference(rows)
  chosen = min((r for r in rows if r is not ref and within(r, ref)), key=lambda r: r["evals"], default=None)
  test = {}
  for r in ([ref] + ([chosen] if chosen else [])) if a.docs else ():
    f = Path(r["dir"]) / "test.json"
    if not f.exists():
      best = Path(r["dir"]) / "classify" / "best"
      only_test = ml_collections.ConfigDict({experiment.INTERNAL: tests(base, True)[experiment.INTERNAL].to_dict()})
      res = classify.evaluate_checkpoint(best, Path(r["dir"]) / "eval_test", tests=only_test)[experiment.INTERNAL]
      f.write_text(json.dumps({"auc": res["auc"], "auc_ci95": res["auc_ci95"]}))
    test[r["variant"]] = json.loads(f.read_text())
  md = markdown(rows, test)
  (work / "study.md").write_text(md)
  print(md)
  if a.docs:
    plot(rows, Path(a.docs).with_name("sampler_study.png"))
    report.write_section(Path(a.docs), md, BEGIN, END, "Sampler study")


if __name__ == "__main__":
  main()
