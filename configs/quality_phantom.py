"""Quality of the demo's generated phantom repository (run `busgen-jax demo --workdir /tmp/busgen_demo` first).

  busgen-jax quality --config configs/quality_phantom.py:/tmp/busgen_demo --workdir /tmp/busgen_demo/quality

FD, KID, precision and recall per pathology x device on the real-data classifier's features, that classifier's
agreement with the requested labels, lesion-box fidelity, and the TSTR / TRTR headline from the demo's classifiers.
"""

from busgen_jax.evaluate import fidelity


def get_config(arg: str = "/tmp/busgen_demo"):
  work = arg or "/tmp/busgen_demo"
  c = fidelity.default_config()
  c.real = f"{work}/data/phantom/1.0.0"
  c.generated = f"{work}/generated/data/phantom_generated/1.0.0"
  c.encoder = f"{work}/classify/real/best"
  c.tstr.synthetic, c.tstr.real = f"{work}/classify/generated", f"{work}/classify/real"
  return c
