"""`busgen-jax evaluate --config.checkpoint=DIR/best --config.dataset=DS --workdir OUT`: a saved classifier's
reports on any dataset (stages/classify.py's evaluation half)."""

from busgen_jax.stages import classify

default_config = classify.default_evaluate_config


def main(cfg, workdir: str, argv) -> None:
  for name, r in classify.evaluate_main(cfg, workdir).items():
    print(f"{name}: n={r['n']} AUC={r.get('auc', r.get('macro_auc')):.3f} -> {workdir}/{name}.html")
