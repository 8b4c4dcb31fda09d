"""Process-wide XLA settings, applied before jax is first imported (the CLI, the tests, bench's children).

    from busgen_jax import xla_env; xla_env.apply()      # then import jax
    from busgen_jax import xla_env; xla_env.script()     # a script outside the CLI: the same, absl flags parsed

XLA:CPU in jaxlib 0.10 hands convolutions to YNNPACK, whose kernel gradients run at about a third of the forward
convolutions' rate inside a training step; with XLA's Eigen convolutions the `cpu` preset's UNet trains 1.3x and
samples 1.8x faster (docs/BENCHMARKS.md, "XLA:CPU convolutions"). YNNPACK keeps the dots. The flag only concerns
XLA:CPU (TPU and GPU compilations ignore it); a user's own setting of it is kept.
"""

from __future__ import annotations

import os
from typing import MutableMapping

YNN_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"{YNN_FLAG}=-individual_convolution",)


def xla_flags(current: str) -> str:
  """`current` (an XLA_FLAGS value) with CPU_FLAGS appended, except a flag the user already set."""
  given = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in CPU_FLAGS if f.split("=", 1)[0] not in given]
  return " ".join([current.strip(), *extra]).strip()


def apply(environ: MutableMapping[str, str] = os.environ) -> None:
  """Adds CPU_FLAGS to XLA_FLAGS (read once, when jax creates its first backend)."""
  environ["XLA_FLAGS"] = xla_flags(environ.get("XLA_FLAGS", ""))


def script() -> None:
  """The process setup of a script outside the CLI (docs/experiments, test workers): apply(), the CLI's quiet
  imports (no TensorFlow start-up lines on the console), and absl's flags marked parsed, since Grain's worker
  processes read them and only absl.app.run would mark them."""
  apply()
  from busgen_jax import console
  console.quiet_imports()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
