"""Privacy audit of the demo's generated phantom repository (run `busgen-jax demo --workdir /tmp/busgen_demo` first).

  busgen-jax audit --config configs/audit_phantom.py:/tmp/busgen_demo --workdir /tmp/busgen_demo/audit
  busgen-jax audit --config configs/audit_phantom.py:/tmp/busgen_demo --workdir /tmp/busgen_demo/audit \
      --config.filter_output=/tmp/busgen_demo/filtered --strict

Nearest training cases of every generated image in pixel space (aligned) and in the real-data classifier's
feature space, thresholds calibrated on the held-out test split, the denoising-loss membership-inference attack on
the diffusion model, the TSTR / TRTR headline from the demo's classifiers, and the verdict.
"""

from busgen_jax.stages import demo


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("configs/audit_phantom.py:DIR needs the demo's workdir (e.g. configs/audit_phantom.py:/tmp/busgen_demo)")
  return demo.audit_config(arg)
