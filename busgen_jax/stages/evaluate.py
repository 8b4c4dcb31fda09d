"""`busgen-jax evaluate --config.checkpoint=DIR/best --config.dataset=DS --workdir OUT`: a saved classifier's
reports on any dataset (stages/classify.py's evaluation half), and on any number of others by path:
`--config.external.NAME=DS` (their `--config.external_split`, default test) writes OUT/NAME.*."""

from busgen_jax.stages import classify

default_config = classify.default_evaluate_config
OPEN_KEYS = ("external",)   # --config.external.NAME=DATASET: any number of test sets


def main(cfg, workdir: str, argv) -> None:
  for name, r in classify.evaluate_main(cfg, workdir).items():
    print(f"{name}: n={r['n']} AUC={r.get('auc', r.get('macro_auc')):.3f} -> {workdir}/{name}.html")
