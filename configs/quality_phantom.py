"""Quality of the demo's generated phantom repository (run `busgen-jax demo --workdir /tmp/busgen_demo` first).

  busgen-jax quality --config configs/quality_phantom.py:/tmp/busgen_demo --workdir /tmp/busgen_demo/quality

FD, KID, precision and recall per pathology x device on the real-data classifier's features, that classifier's
agreement with the requested labels, lesion-box fidelity, and the TSTR / TRTR headline from the demo's classifiers.
"""

from busgen_jax.stages import demo


def get_config(arg: str = ""):
  if not arg:
    raise ValueError("configs/quality_phantom.py:DIR needs the demo's workdir (e.g. configs/quality_phantom.py:/tmp/busgen_demo)")
  return demo.quality_config(arg)
