"""`busgen-jax quality --config configs/quality_phantom.py --workdir OUT`: fidelity, diversity and conditioning of
a generated dataset against real data (evaluate/fidelity.py): FD, KID, precision/recall per condition,
conditional accuracy, box fidelity, TSTR/TRTR -> OUT/quality.json|md|html."""

from busgen_jax.evaluate import fidelity

default_config = fidelity.default_config


def main(cfg, workdir: str, argv) -> None:
  rep = fidelity.run(cfg, workdir)
  a = rep["fidelity"]["all"]
  c = rep["conditional_accuracy"]["generated"]
  t = rep["tstr"]
  print(f"FD {a['fd']['value']:.3g}, KID {a['kid']['value']:.3g}, precision {a['precision']['value']:.3f}, recall "
        f"{a['recall']['value']:.3f}; conditional accuracy {c['accuracy']:.3f}; box fidelity AUC "
        f"{rep['box_fidelity']['generated']['auc']:.3f}" + (f"; TSTR/TRTR {t['ratio']:.2f}" if t else "")
        + f"\nreport: {workdir}/quality.html")
