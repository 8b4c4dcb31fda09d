"""`busgen-jax sample --config.checkpoint=DIR/checkpoints --workdir OUT`: generate a labelled synthetic dataset
from a model (generate.py: sharded over the chips and hosts, resumable) in the record schema."""

from busgen_jax import generate, parallel

default_config = generate.default_config


def main(cfg, workdir: str, argv) -> None:
  parallel.maybe_initialize_distributed()
  ds = generate.generate(cfg, workdir)
  print(f"{ds}: generated dataset (sheets in {ds / generate.SHEETS})")
