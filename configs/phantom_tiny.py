"""A tiny BUSGen on the built-in phantom data: trains in a few minutes on 2 CPU cores.

  busgen-jax convert --config configs/convert.py:phantom --workdir /tmp/phantom \
      --config.phantom.num_examples=1000 --config.phantom.size=64
  busgen-jax train --config configs/phantom_tiny.py --workdir /tmp/phantom_tiny \
      --config.data.sources.real.path=/tmp/phantom/phantom/1.0.0

The official architecture's rules at 32 px with 32 base channels, with attention only at the 16 px level
and in the middle (the official placement, full-resolution attention included, is `--config.model.attn_levels=-1,`).
"""

from busgen_jax.train import diffusion


def get_config(arg: str = ""):
  c = diffusion.default_config()
  c.num_steps = 300
  c.log_every = 25
  c.checkpoint_every = 100
  c.sample_every = 150
  c.num_samples = 8
  c.sampler.steps = 25
  c.data.sources.real.path = ""        # required: --config.data.sources.real.path=DIR (a converted dataset)
  c.data.image_size = 32
  c.data.batch_size = 16
  c.data.balance = "subsample"         # BUSGen's class-balanced epochs
  c.model.ch = 32
  c.model.ch_mult = (1, 2)
  c.model.num_res_blocks = 1
  c.model.num_groups = 8
  c.model.attn_levels = (1,)           # full-resolution attention at 32 px costs more than the rest of the step
  c.model.num_pathology = 4            # null, benign, malignant, normal (the phantom can make normals)
  c.model.num_devices = 7              # null + up to 6 phantom devices
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 20
  c.optim.ema_decay = 0.99
  return c
