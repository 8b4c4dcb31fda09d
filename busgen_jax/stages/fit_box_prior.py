"""`busgen-jax fit-box-prior --config.dataset=DIR --workdir OUT`: per-pathology lesion-box densities (KDE) of a
dataset (data/box_prior.py) -> OUT/box_prior.json."""

from busgen_jax.data import box_prior

default_config = box_prior.default_config
WORKDIR_OPTIONAL = True


def main(cfg, workdir: str, argv) -> None:
  print(f"{box_prior.run(cfg, workdir)}: box prior")
