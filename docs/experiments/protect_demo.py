"""Protected sampling on the demo's model: how many images change, the audit, and the downstream (TSTR) AUC.

  busgen-jax demo --workdir /tmp/busgen_demo                       # once: the model, data and repository
  python docs/experiments/protect_demo.py --demo /tmp/busgen_demo --out /tmp/protect auto 0.35

Regenerates the demo's repository (same seed and config) with protection for each setting (`auto`: the
calibrated default radius; a number: that fixed radius), audits it (with the demo's real-data classifier as
the feature encoder) and trains the demo's classifier on it. Prints one RESULT line per setting and a BASE
line for the demo's own figures; docs/PRIVACY.md has them.
"""

import argparse
import json
import time
from pathlib import Path

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported

from busgen_jax import generate  # noqa: E402
from busgen_jax.stages import demo  # noqa: E402
from busgen_jax.data import reader  # noqa: E402
from busgen_jax.evaluate import privacy  # noqa: E402
from busgen_jax.stages import classify  # noqa: E402


def shas(d) -> list[str]:
  ds = reader.open_dataset(d)
  return [ds.decode(r, skip=("image", "mask"))["sha256"] for r in ds.records("train")]


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--demo", required=True, help="a finished `busgen-jax demo` workdir")
  p.add_argument("--out", required=True)
  p.add_argument("settings", nargs="+", help="auto, or a fixed radius")
  a = p.parse_args()
  work, out = Path(a.demo), Path(a.out)
  base = work / "generated" / "data" / "phantom_generated" / "1.0.0"
  real = work / "data" / "phantom" / "1.0.0"
  plan = json.loads((base / "shard_reports" / "plan.json").read_text())
  ref = shas(base)
  for setting in a.settings:
    g = generate.default_config()
    g.update(plan["config"]["generation"])
    g.update(checkpoint=str(work / "diffusion" / "checkpoints"), box_prior=str(work / "box_prior.json"),
             output=str(out / setting))
    g.protect.update(bank=str(real), **({} if setting == "auto" else {"radius": float(setting)}))
    t = time.time()
    d = generate.generate(g, out / setting)
    seconds = time.time() - t
    audit = privacy.default_config()
    audit.update(generated=str(d), train=str(real), encoder=str(work / "classify" / "real" / "best"))
    rep = privacy.run(audit, out / f"audit_{setting}")
    res = classify.run(demo._classifier_config(demo.default_config(), real, d, "generated"),
                           out / f"classify_{setting}")["real_test"]
    print("RESULT", setting, json.dumps({
        "changed": sum(x != y for x, y in zip(ref, shas(d))), "n": len(ref), "seconds": seconds,
        "radius": json.loads((d / "generation.json").read_text())["provenance"]["protect"]["radius_used"],
        "n_flagged": rep["n_flagged"], "pixel_dcr": rep["spaces"]["pixel"]["dcr"],
        "feature_dcr": rep["spaces"].get("feature", {}).get("dcr"), "auc": res["auc"], "auc_ci95": res["auc_ci95"]}),
        flush=True)
  print("BASE", json.dumps({"auc": json.loads((work / "classify/generated/eval/real_test.json").read_text())["auc"]}))


if __name__ == "__main__":
  main()
