"""The end-to-end demo on the built-in phantom data (the README's main command).

  bash launch/local.sh demo --workdir /tmp/busgen_demo                      # ~10 minutes on 2 CPU cores
  busgen-jax demo --workdir /tmp/busgen_demo --config.docs=README.md        # and rewrite README's demo figures
  busgen-jax demo --config configs/demo.py:full --workdir gs://.../demo      # accelerator scale
  busgen-jax demo --config configs/demo.py:ci --workdir /tmp/demo_ci         # the reduced run the tests use

convert -> box prior -> tiny BUSGen -> synthetic repository -> classifiers on real / generated / mixed ->
evaluation on the held-out real split; then LoRA adaptation to a new task (histology: cyst vs fibroadenoma, k
shots per class) -> its synthetic repository -> classifiers on the shots / adapted-generated / both ->
<workdir>/report.html and report.md.
"""

from busgen_jax.stages import demo


def get_config(arg: str = ""):
  return demo.default_config(arg.removeprefix("scale=") or "cpu")
