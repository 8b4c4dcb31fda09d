"""Pretraining on the real BUS-BRA dataset (1875 images, 4 devices), for accelerators.

  busgen-jax convert --config configs/convert.py:busbra --input ../shared/data/busbra --workdir /data/busbra
  busgen-jax train --config configs/busbra_pretrain.py --workdir /tmp/busbra_pretrain \
      --config.data.sources.real.path=/data/busbra/busbra/1.0.0
  # 128 px instead of 160: --config.data.image_size=128
"""

from busgen_jax.train import diffusion


def get_config(arg: str = ""):
  c = diffusion.default_config()
  c.num_steps = 100_000
  c.log_every = 100
  c.checkpoint_every = 2000
  c.sample_every = 5000
  c.data.image_size = 160
  c.data.batch_size = 64
  c.data.balance = "subsample"
  c.data.worker_count = 4
  c.data.sources.real.path = ""        # required: --config.data.sources.real.path=DATASET (see above)
  c.data.sources.real.filters.pathology = ["benign", "malignant"]
  c.model.num_devices = 5      # null + BUS-BRA's 4 scanners
  c.model.dtype = "bfloat16"
  c.optim.warmup_steps = 2000
  return c
