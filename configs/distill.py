"""Distil a trained BUSGen model into a few-step student (busgen_jax/train/distill.py; docs/SAMPLING.md).

  # 1. guidance distillation: the guidance scale becomes an input, one network evaluation per solver step;
  #    the student samples with DPM-Solver++ 2M at 8 steps (8 evaluations; the official sampler spends 100)
  busgen-jax distill --config configs/distill.py --workdir /tmp/student_g \
      --config.teacher=/tmp/exp_cpu/diffusion/checkpoints
  # 2. progressive rounds, each halving a DDIM grid (its teacher the last student): 16 -> 8, then 8 -> 4
  busgen-jax distill --config configs/distill.py:progressive --workdir /tmp/student_8 \
      --config.teacher=/tmp/student_g/checkpoints
  busgen-jax distill --config configs/distill.py:progressive --workdir /tmp/student_4 \
      --config.teacher=/tmp/student_8/checkpoints
  # then sample as with any model: the card names the student's plan
  busgen-jax sample --config configs/sample_phantom.py --workdir /tmp/gen --config.checkpoint=/tmp/student_4/checkpoints

The data is the teacher's training data (its card) unless --config.data.sources.real.path=DATASET is given. The
student's architecture, schedule and objective are the teacher's. The step counts suit the `cpu` experiment
preset's model on 2 CPU cores (about 3 s per step at batch 16); accelerators: raise num_steps and batch_size.
"""

from busgen_jax.train import distill


def get_config(arg: str = "guidance"):
  kind = arg.removeprefix("kind=") or "guidance"
  c = distill.default_config()
  c.data.batch_size = 16
  c.log_every = 25
  if kind == "guidance":
    c.kind, c.num_steps = "guidance", 600
  elif kind == "progressive":
    c.kind, c.num_steps = "progressive", 600
    c.optim.lr = 5e-5
  elif kind == "ci":   # the test suite: a few steps on a tiny teacher
    c.kind, c.num_steps, c.log_every, c.checkpoint_every = "guidance", 4, 2, 2
    c.data.batch_size = 8
  else:
    raise ValueError(f"configs/distill.py: guidance, progressive or ci, got {arg!r}")
  return c
