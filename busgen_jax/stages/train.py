"""`busgen-jax train --config configs/<...>.py --workdir DIR`: train (or resume) the BUSGen diffusion model.

The loop is train/diffusion.py; checkpoints (with the model card) go to DIR/checkpoints, metrics to DIR.
"""

from busgen_jax.train import diffusion

default_config = diffusion.default_config


def main(cfg, workdir: str, argv) -> None:
  diffusion.train(cfg, workdir)
