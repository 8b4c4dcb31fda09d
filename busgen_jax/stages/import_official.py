"""`busgen-jax import-official --checkpoint ckpt.pt --output DIR [--config.ch=...]`: an official BUSGen PyTorch
checkpoint (read weights-only) as an Orbax checkpoint with its model card (official.py)."""

import ml_collections
from absl import app, flags

from busgen_jax import official

WORKDIR_OPTIONAL = True


def default_config() -> ml_collections.ConfigDict:
  # The official constructor's arguments (full model defaults), and the training image size for the model card
  # (0: unknown; `sample` then asks for --config.image_size).
  return ml_collections.ConfigDict({"ch": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2, "num_groups": 32,
                                    "T": 500, "dev_num": 20, "image_size": 0})


def define_flags() -> None:
  flags.DEFINE_string("checkpoint", None, "official checkpoint (.pt/.pth/.ckpt read weights-only, or .npz)")
  flags.DEFINE_string("output", None, "output directory (or --workdir)")
  flags.DEFINE_string("key", None, "entry of the checkpoint dict holding the state dict (default: found)")


def main(c, workdir: str, argv) -> None:
  F = flags.FLAGS
  output = F.output or workdir
  if not F.checkpoint or not output:
    raise app.UsageError("usage: busgen-jax import-official --checkpoint ckpt.pt --output DIR [--config.ch=...]")
  cfg = official.model_config(ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                              num_groups=c.num_groups, T=c.T, dev_num=c.dev_num)
  out = official.import_checkpoint(F.checkpoint, output, cfg, key=F.key, image_size=c.image_size)
  print(f"{out}: imported {F.checkpoint} (use --config.init_from={out} to train from it)")
