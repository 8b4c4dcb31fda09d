"""`busgen-jax audit --config configs/audit_phantom.py --workdir OUT [--strict]`: privacy audit of a generated
dataset (evaluate/privacy.py): near-copies of training cases, membership inference, a safe-to-share verdict and
a filtered copy -> OUT/audit.json|md|html. `--strict` exits with status 3 when it is not safe to share."""

import sys

from absl import flags

from busgen_jax.evaluate import privacy

default_config = privacy.default_config


def define_flags() -> None:
  flags.DEFINE_bool("strict", False, "exit with status 3 when the repository is not safe to share")


def main(cfg, workdir: str, argv) -> None:
  rep = privacy.run(cfg, workdir)
  v = rep["verdict"]
  print(("SAFE TO SHARE by the configured thresholds" if v["safe_to_share"] else "NOT SAFE TO SHARE:\n  "
         + "\n  ".join(v["reasons"])) + "\n" + "\n".join(f"  - {c}" for c in v["checks"])
        + f"\nreport: {workdir}/audit.html" + (f"\nfiltered: {rep['filtered_dataset']}"
                                               if rep.get("filtered_dataset") else ""))
  if flags.FLAGS.strict and not v["safe_to_share"]:
    sys.exit(3)
