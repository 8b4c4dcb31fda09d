"""The end-to-end demo on the built-in phantom data (the README's main command).

  bash launch/local.sh demo --workdir /tmp/busgen_demo                      # ~7 minutes on 2 CPU cores
  busgen-jax demo --workdir /tmp/busgen_demo --config.docs=README.md,docs/PRIVACY.md  # and rewrite the docs' demo figures
  busgen-jax demo --config configs/demo.py:full --workdir gs://.../demo      # accelerator scale
  busgen-jax demo --config configs/demo.py:ci --workdir /tmp/demo_ci         # the reduced run the tests use

convert -> box prior -> tiny BUSGen -> synthetic repository -> classifiers on real / generated / mixed ->
evaluation on the held-out real split; then a new site (a phantom scanner the corpus never had): k shots per class
-> LoRA adaptation with a new device row -> the site's repositories (adapted and un-adapted model) -> classifiers
on the shots / shots + un-adapted / shots + adapted / adapted alone -> the site's test images ->
<workdir>/report.html and report.md.
"""

from busgen_jax.stages import demo


def get_config(arg: str = ""):
  return demo.default_config(arg.removeprefix("scale=") or "cpu")
