"""The UNet's downsampler on XLA:CPU: its two stride-2 convolutions apart, merged into one 5x5 convolution, and
merged with the phase form of the input gradient (busgen_jax/models/strided.py).

  python docs/experiments/downsample_layers.py              # the official model's shapes at 64 px (batch 4) and
                                                            # the cpu preset's (batch 16)
  python docs/experiments/downsample_layers.py --rounds 20

For each (batch, height, width, channels): forward + the gradients of the input and of both layers' parameters,
each form compiled once and timed in alternating rounds (3 calls a round); the median round of each, the median of
the per-round ratios against "apart" (the machine's drift hits all three), and the largest relative difference of
the output and the input gradient. strided.applies() comes from the last column but one.
"""

import argparse
import statistics
import time

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported

SHAPES = [(4, 64, 64, 128), (4, 32, 32, 256), (4, 16, 16, 256), (16, 64, 64, 32), (16, 32, 32, 64),
          (4, 32, 32, 128), (16, 16, 16, 64)]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=10)
  args = p.parse_args()
  import jax
  import jax.numpy as jnp
  import numpy as np
  from flax import nnx
  from busgen_jax.models import strided, unet
  from busgen_jax.stages import bench

  rng = np.random.default_rng(0)
  forms, outputs = {}, {}
  for shape in SHAPES:
    B, H, W, C = shape
    graph, params = nnx.split(unet.DownSample(C, rng, None), nnx.Param)
    x = jnp.asarray(rng.standard_normal((B, H, W, C), dtype=np.float32))
    g = jnp.asarray(rng.standard_normal((B, H // 2, W // 2, C), dtype=np.float32))
    for name, phase, merge in [("apart", False, False), ("merged", False, True), ("merged, phase", True, True)]:
      def f(p, x):
        m = nnx.merge(graph, p)
        return m(x) if merge else m.c1(x) + m.c2(x)
      strided.applies = lambda shape, phase=phase: phase   # read when the function is traced, below
      fn = jax.jit(jax.value_and_grad(lambda p, x: jnp.vdot(f(p, x), g), argnums=(0, 1)))
      forms[shape, name] = (fn.lower(params, x).compile(), (params, x))
      outputs[shape, name] = (jax.jit(f).lower(params, x).compile()(params, x), forms[shape, name][0](params, x)[1][1])
  times = {key: [] for key in forms}
  for _ in range(args.rounds):
    for key, (fn, a) in forms.items():
      t = time.perf_counter()
      for _ in range(3):
        jax.block_until_ready(fn(*a))
      times[key].append((time.perf_counter() - t) / 3)
  print(f"matmul peak {bench._matmul_peak(jnp.float32) / 1e9:.0f} GFLOP/s; {args.rounds} rounds; forward + backward, "
        "ms (median round) and the median of per-round ratios against apart")
  print("| batch, H, W, C | apart | merged | ratio | merged, phase gradient | ratio | largest relative difference |")
  print("|---|---|---|---|---|---|---|")
  for shape in SHAPES:
    med = {n: statistics.median(times[shape, n]) * 1e3 for n in ("apart", "merged", "merged, phase")}
    ratio = {n: statistics.median(a / b for a, b in zip(times[shape, "apart"], times[shape, n]))
             for n in ("merged", "merged, phase")}
    ref = outputs[shape, "apart"]
    diff = max(float(jnp.max(jnp.abs(o - r)) / jnp.max(jnp.abs(r))) for n in ("merged", "merged, phase")
               for o, r in zip(outputs[shape, n], ref))
    print(f"| {', '.join(map(str, shape))} | {med['apart']:.1f} | {med['merged']:.1f} | {ratio['merged']:.2f}x | "
          f"{med['merged, phase']:.1f} | {ratio['merged, phase']:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
  main()
