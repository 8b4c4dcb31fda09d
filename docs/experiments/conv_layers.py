"""One 3x3 convolution layer on XLA:CPU: XLA's (Eigen) against Winograd's F(2x2, 3x3) or F(4x4, 3x3)
(busgen_jax/models/winograd.py).

  python docs/experiments/conv_layers.py                 # the official model's shapes at 64 px, batch 4, and the
                                                         # cpu preset's (32-64 channels, batch 16)
  python docs/experiments/conv_layers.py --tile 4        # F(4x4, 3x3) (model.conv=winograd4)
  python docs/experiments/conv_layers.py --rounds 5

For each (batch, height, width, in, out): the forward pass, and forward + both gradients of sum(y^2) / 2, each
form compiled once and timed in alternating rounds (the median round is reported, so the machine's drift hits both);
the largest relative difference of the output and of the two gradients. winograd.MIN_CHANNELS and MIN_PIXELS come
from this table.
"""

import argparse
import statistics
import time

from busgen_jax import xla_env  # noqa: E402

xla_env.script()   # as the CLI does, before jax is first imported

SHAPES = [(4, 64, 64, 128, 128), (4, 64, 64, 256, 128), (4, 32, 32, 128, 256), (4, 32, 32, 256, 256),
          (4, 32, 32, 256, 1024), (4, 16, 16, 256, 256), (4, 8, 8, 256, 256), (16, 64, 64, 32, 32),
          (16, 32, 32, 64, 64)]


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--tile", type=int, default=2, choices=(2, 4), help="Winograd's output tile: F(2x2) or F(4x4)")
  a = p.parse_args()
  if a.rounds < 1:
    p.error("--rounds must be at least 1")
  import jax
  import jax.numpy as jnp
  import numpy as np
  from busgen_jax.models import winograd
  from busgen_jax.stages import bench

  def direct(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

  forms = {"xla": direct, "winograd": lambda x, w: winograd.conv3x3(x, w, a.tile)}
  print(f"matmul peak {bench._matmul_peak(jnp.float32) / 1e9:.0f} GFLOP/s")
  f = f"F({a.tile}x{a.tile}) ms"
  print(f"| batch, H, W, in, out | forward: XLA ms | {f} | ratio | forward + backward: XLA ms | {f} "
        "| ratio | largest relative difference |")
  print("|---|---|---|---|---|---|---|---|")
  for N, H, W, I, O in SHAPES:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((N, H, W, I)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((3, 3, I, O)) / np.sqrt(9 * I), jnp.float32)
    fns = {}
    for name, f in forms.items():
      fns["fwd", name] = jax.jit(f)
      fns["grad", name] = jax.jit(jax.value_and_grad(lambda x, w, f=f: jnp.sum(f(x, w) ** 2) / 2, argnums=(0, 1)))
    outs = {k: jax.block_until_ready(f(x, w)) for k, f in fns.items()}
    rel = lambda a, b: float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    err = max([rel(outs["fwd", "xla"], outs["fwd", "winograd"])]
              + [rel(a, b) for a, b in zip(outs["grad", "xla"][1], outs["grad", "winograd"][1])])
    times = {k: [] for k in fns}
    for _ in range(a.rounds):
      for k, f in fns.items():
        t = time.perf_counter()
        jax.block_until_ready(f(x, w))
        times[k].append(time.perf_counter() - t)
    ms = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"| {N}, {H}, {W}, {I}, {O} | {ms['fwd', 'xla']:.1f} | {ms['fwd', 'winograd']:.1f} | "
          f"{ms['fwd', 'xla'] / ms['fwd', 'winograd']:.2f}x | {ms['grad', 'xla']:.1f} | {ms['grad', 'winograd']:.1f} | "
          f"{ms['grad', 'xla'] / ms['grad', 'winograd']:.2f}x | {err:.1e} |", flush=True)


if __name__ == "__main__":
  main()
