"""Generate a labelled synthetic repository from the phantom-trained tiny model.

  busgen-jax fit-box-prior --config.dataset=/tmp/phantom/phantom/1.0.0 --workdir /tmp/phantom_tiny
  busgen-jax sample --config configs/sample_phantom.py --workdir /tmp/phantom_gen \
      --config.checkpoint=/tmp/phantom_tiny/checkpoints --config.box_prior=/tmp/phantom_tiny/box_prior.json

(after `configs/phantom_tiny.py` has trained). The dataset lands in /tmp/phantom_gen/data/generated/1.0.0 with a
contact sheet per condition in its sheets/ folder. Sampler: the official DPM-Solver++ (single-step, order 3)
with guidance 2.8; fewer steps for CPU.
"""

from busgen_jax import generate


def get_config(arg: str = ""):
  c = generate.default_config()
  c.checkpoint = ""         # required: --config.checkpoint=DIR (see the command above)
  c.box_prior = ""          # required: --config.box_prior=FILE (`busgen-jax fit-box-prior`)
  c.pathology = ("benign", "malignant")
  c.device = ("all",)
  c.num_per_condition = 32
  c.sampler.steps = 25
  c.per_device_batch = 16
  c.examples_per_shard = 128
  c.name = "phantom_generated"
  return c
