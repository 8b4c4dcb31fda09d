"""`busgen-jax adapt --config configs/adapt_phantom.py --workdir DIR`: few-shot LoRA adaptation of a pretrained
model to a new task or site (train/adapt.py): DIR/adapters, DIR/merged, DIR/box_prior.json."""

from busgen_jax.train import adapt

default_config = adapt.default_config


def main(cfg, workdir: str, argv) -> None:
  s = adapt.adapt(cfg, workdir)
  print(f"validation loss {s['val_loss_start']:.4f} -> {s['val_loss_best']:.4f} (step {s['best_step']}); "
        f"adapters {s['adapters']}, merged {s['merged'] or '-'}, box prior {s['box_prior'] or '-'}")
