"""`busgen-jax bench` cases: "cpu" (the default config's) or "accelerator" (bf16, batches that fill a GPU or TPU).

  busgen-jax bench --config configs/bench.py:cpu --workdir /tmp/bench --config.docs=docs/BENCHMARKS.md
  busgen-jax bench --config configs/bench.py:accelerator --workdir /tmp/bench
"""

from busgen_jax.stages import bench


def get_config(arg: str = "cpu"):
  c = bench.default_config()
  if arg in ("", "cpu"):
    return c
  if arg != "accelerator":
    raise ValueError(f"configs/bench.py: argument cpu or accelerator, got {arg!r}")
  c.cases = {
      "tiny_32px": bench.case("tiny", 32, 256, steps=20, sample_batch=256, sample_steps=25, official_steps=50,
                               student_steps=8, pipeline_batches=20, dtype="bfloat16"),
      # The official sampler: DPM-Solver++ at 50 steps (here multistep, one evaluation per step).
      "official_64px": bench.case("official", 64, 64, steps=10, sample_batch=64, sample_steps=10, official_steps=50,
                                   student_steps=8, pipeline_batches=20, dtype="bfloat16", compare_attention=True),
      "official_128px": bench.case("official", 128, 16, steps=10, sample_batch=16, sample_steps=10,
                                    official_steps=50, student_steps=8, pipeline_batches=10, dtype="bfloat16",
                                    compare_attention=True),
  }
  return c
