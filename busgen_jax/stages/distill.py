"""`busgen-jax distill --config configs/distill.py --workdir DIR --config.teacher=CKPT`: distil a trained diffusion
model into a few-step student (train/distill.py): guidance distillation, then progressive rounds. DIR/checkpoints
is a model like any other: `busgen-jax sample --config.checkpoint=DIR/checkpoints` runs the student's own plan."""

from busgen_jax.train import distill

default_config = distill.default_config


def main(cfg, workdir: str, argv) -> None:
  s = distill.distill(cfg, workdir)
  print(f"{s['kind']} student of {s['teacher']}@{s['teacher_step']}: step {s['step']}, loss {s['last'].get('loss', float('nan')):.4g}; "
        f"samples with {s['student']['network_evals']} network evaluations per image "
        f"({s['student']['sampler']['algorithm']}, {s['student']['sampler']['steps']} steps); {s['checkpoints']}")
