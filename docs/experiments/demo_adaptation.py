"""Why the demo's adapted-generated classifier lost to its shots, and which sampling setting fixes it.

  bash launch/local.sh demo --workdir /tmp/demo                                     # the demo, once
  python docs/experiments/demo_adaptation.py --demo /tmp/demo --workdir /tmp/demo_adapt_study [--docs README.md]

On the demo's adapted model (its `adapt/merged`), each variant generates the task's repository (cyst vs
fibroadenoma, the shots' box prior) at one guidance scale and trains the demo's generated-only classifier on it.
Variants are compared on the real **validation** split (the AUC of the checkpoint it selected); the test split is
reported once, for the selected variant. Beside each: the grey level inside the lesion boxes of the generated
images per class (through the classifier's own view: the evaluation pipeline at its image size), against the
real training images'.
"""

import argparse
import json
import sys
from pathlib import Path

from absl import flags

flags.FLAGS.mark_as_parsed()
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapt_diagnosis import lesion_grey  # noqa: E402  (this folder's diagnosis script)
from busgen_jax import generate  # noqa: E402
from busgen_jax.data import reader  # noqa: E402
from busgen_jax.evaluate import report  # noqa: E402
from busgen_jax.stages import classify, demo  # noqa: E402

BEGIN, END = "<!-- demo-adaptation:begin -->", "<!-- demo-adaptation:end -->"
GUIDANCE = (1.0, 1.5, 2.8)


def run_variant(work: Path, out: Path, cfg, guidance: float) -> dict:
  adapted = json.loads((work / "adapt" / "adapt.json").read_text())
  ds_dir = reader.find_dataset_dir(work / "data")
  g = demo.sample_config(cfg, reader.open_dataset(ds_dir), adapted=adapted)
  g.sampler.guidance_scale = guidance
  gen_dir = generate.generate(g, out / "generated")
  task = {"field": cfg.adapt.task.field, "classes": tuple(cfg.adapt.task.classes), "positive": cfg.adapt_positive}
  rep = classify.run(demo._classifier_config(cfg, ds_dir, gen_dir, "generated", task), out / "classify")["real_test"]
  size = cfg.classifier.data.image_size
  return {"guidance": guidance, "val_auc": rep["best"]["value"], "test_auc": rep["auc"],
          "test_ci": rep["auc_ci95"],
          "grey": {c: round(v["inside"], 1) for c, v in
                   lesion_grey(str(gen_dir), "train", task["field"], list(task["classes"]), size).items()}}


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--demo", required=True, help="a finished `busgen-jax demo` workdir (the CPU preset)")
  p.add_argument("--workdir", required=True)
  p.add_argument("--docs", default="", help="write the table between the markers of this markdown file")
  a = p.parse_args()
  work, out = Path(a.demo), Path(a.workdir)
  cfg = demo.default_config("cpu")
  rows = [run_variant(work, out / f"guidance_{g}", cfg, g) for g in GUIDANCE]
  ds_dir = str(reader.find_dataset_dir(work / "data"))
  real = {c: round(v["inside"], 1) for c, v in lesion_grey(
      ds_dir, "train", cfg.adapt.task.field, list(cfg.adapt.task.classes), cfg.classifier.data.image_size).items()}
  best = max(rows, key=lambda r: r["val_auc"])
  lines = [f"Command: `python docs/experiments/demo_adaptation.py --demo {a.demo} --workdir {a.workdir}`. "
           f"Real training images' lesion grey level: cyst {real['cyst']}, fibroadenoma {real['fibroadenoma']}.", "",
           "| guidance (adapted repository) | validation AUC | test AUC [95% CI] | lesion grey: cyst / fibroadenoma |",
           "|---|---|---|---|"]
  for r in rows:
    test = f"{r['test_auc']:.3f} [{r['test_ci'][0]:.3f}, {r['test_ci'][1]:.3f}]" if r is best else "–"
    name = f"**{r['guidance']}**" if r is best else str(r["guidance"])
    lines.append(f"| {name} | {r['val_auc']:.3f} | {test} | {r['grey']['cyst']} / {r['grey']['fibroadenoma']} |")
  text = "\n".join(lines)
  print(text)
  (out / "study.json").write_text(json.dumps({"rows": rows, "real_grey": real}, indent=1))
  if a.docs:
    report.write_section(Path(a.docs), text + "\n", BEGIN, END, "The demo's adapted arm")


if __name__ == "__main__":
  main()
