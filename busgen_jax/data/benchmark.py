"""Data-layer throughput: phantom rendering (one core) and conversion (processes), beside the measured f32
matmul peak of the same machine in the same run (shared machines are noisy: compare ratios).

  python -m busgen_jax.data.benchmark [--size 128] [--num 600] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np


def matmul_peak_gflops(n: int = 2048, reps: int = 5) -> float:
  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  a @ a
  best = min(_timed(lambda: a @ a) for _ in range(reps))
  return 2 * n ** 3 / best / 1e9


def _timed(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def phantom_images_per_s(size: int, num: int) -> float:
  from busgen_jax.data.sources.phantom import PhantomSource
  src = PhantomSource(num_examples=num, size=size)
  src.example(0)
  return num / _timed(lambda: [src.example(i) for i in range(num)])


def conversion_images_per_s(size: int, num: int, workers: int) -> float:
  from busgen_jax.data import convert
  cfg = convert.default_config()
  cfg.phantom.num_examples, cfg.phantom.size, cfg.num_workers = num, size, workers
  cfg.examples_per_shard = max(1, num // max(2 * workers, 1))
  with tempfile.TemporaryDirectory() as d:
    cfg.output = d
    return num / _timed(lambda: convert.convert(cfg))


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", type=int, default=128)
  p.add_argument("--num", type=int, default=600)
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  a = p.parse_args()
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  out = {"cpu_count": os.cpu_count(), "matmul_peak_gflops": round(matmul_peak_gflops(), 1),
         f"phantom_images_per_s_1core_{a.size}px": round(phantom_images_per_s(a.size, a.num), 1),
         f"convert_images_per_s_{a.workers}workers_{a.size}px": round(conversion_images_per_s(a.size, a.num, a.workers), 1)}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
