"""Few-shot adaptation of the phantom-pretrained tiny BUSGen to a task it has not seen: histology, cyst vs
fibroadenoma (the base only knows "benign" for both), 16 images per class.

  # after configs/phantom_tiny.py has trained on /tmp/phantom/phantom/1.0.0:
  busgen-jax adapt --config configs/adapt_phantom.py --workdir /tmp/phantom_adapt \
      --config.base=/tmp/phantom_tiny/checkpoints --config.data.path=/tmp/phantom/phantom/1.0.0
  busgen-jax sample --workdir /tmp/phantom_adapt_gen --config.checkpoint=/tmp/phantom_adapt/merged \
      --config.box_prior=/tmp/phantom_adapt/box_prior.json --config.device=all --config.sampler.steps=25

`--config.data.shots=8` (k per class), `--config.lora.rank=4`, `--config.lora.targets='(".*attn.*",)'` etc.
"""

from busgen_jax.train import adapt


def get_config(arg: str = ""):
  c = adapt.default_config()
  c.base = ""               # required: --config.base=<a `busgen-jax train` workdir>/checkpoints
  c.data.path = ""          # required: --config.data.path=<the converted dataset with the shots>
  c.data.shots = 16
  c.data.val_per_class = 32
  c.data.batch_size = 16
  c.task.field = "histology"
  c.task.classes = ("cyst", "fibroadenoma")
  c.task.pathology = (("cyst", "benign"), ("fibroadenoma", "benign"))
  c.num_steps = 300
  c.eval_every = 50
  c.sample_every = 100      # sample grids of the adapted model in TensorBoard
  c.sampler.update(method="multistep", order=2, steps=25)
  c.lora.rank = 8
  c.lora.dropout = 0.05
  return c
