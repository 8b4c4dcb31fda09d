"""The end-to-end demo on the built-in phantom data (the README's main command).

  bash launch/local.sh demo --workdir /tmp/busgen_demo
  busgen-jax demo --config configs/demo.py --workdir /tmp/busgen_demo --config.data.phantom.num_examples=5000
"""

from busgen_jax import demo


def get_config(arg: str = ""):
  return demo.default_config()
