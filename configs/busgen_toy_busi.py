"""The official toy model on BUSI: 128 px, 3 devices (GE-LOGIQ-E9=1, Mindray-M9=2, Siemens-ACUSON-NX3-Elite=3).

  busgen-jax convert --config configs/convert.py:busi --input /data/Dataset_BUSI_with_GT --workdir /data/busi
  busgen-jax train --config configs/busgen_toy_busi.py --workdir /tmp/toy_busi \
      --config.data.sources.real.path=/data/busi/busi/1.0.0

BUSI carries no device names; give them with a manifest (device column) to condition on devices.
"""

from busgen_jax.train import diffusion

TOY_DEVICES = ("GE-LOGIQ-E9", "Mindray-M9", "Siemens-ACUSON-NX3-Elite")


def get_config(arg: str = ""):
  c = diffusion.default_config()
  c.num_steps = 50_000
  c.log_every = 100
  c.checkpoint_every = 2000
  c.sample_every = 5000
  c.data.image_size = 128
  c.data.batch_size = 32
  c.data.balance = "subsample"
  c.data.device_vocab = TOY_DEVICES
  c.data.sources.real.path = ""        # required: --config.data.sources.real.path=DATASET (see above)
  c.data.sources.real.filters.pathology = ["benign", "malignant"]
  c.model.num_devices = len(TOY_DEVICES) + 1
  return c
