"""The official BUSGen model: 160 px, ch 128, ch_mult 1,2,2,2, 2 res blocks, 19 devices (+ null), T 500.

  busgen-jax train --config configs/busgen_official.py --workdir gs://BUCKET/runs/official \
      --config.data.sources.real.path=gs://BUCKET/data/busgen_corpus/1.0.0
  # continue from the released weights (after `busgen-jax import-official --checkpoint busgen.pt --output DIR`):
  ... --config.init_from=DIR

Device ids follow the official order (1..19), so imported checkpoints keep their meaning. Use on an
accelerator; bf16 compute with f32 parameters and optimizer state.
"""

from busgen_jax.train import diffusion

OFFICIAL_DEVICES = (
    "Siemens-ACUSON-Oxana", "GE-LOGIQ-E9", "Esaote-MyLab90", "Esaote-MyLabClassC", "Philips-EPIQ7",
    "Sonoscape-S60", "GE-EDVoluson-E8-Expert", "Samsung-RS80A", "Sonoscape-Clinic", "TOSHIBA-Aplio-i700",
    "Mindray-M9", "Canon-Aplio-i800", "Siemens-ACUSON-NX3-Elite", "VINNO-G86", "Mindray-Resona-R9",
    "SonoScape-Clinic", "Mindray-NuewaI9", "Mindray-Resona7", "Samsung-Heraw10")


def get_config(arg: str = ""):
  c = diffusion.default_config()
  c.num_steps = 200_000
  c.log_every = 100
  c.checkpoint_every = 2000
  c.sample_every = 5000
  c.data.image_size = 160
  c.data.batch_size = 256
  c.data.balance = "subsample"
  c.data.device_vocab = OFFICIAL_DEVICES
  c.data.worker_count = 8
  c.data.sources.real.filters.pathology = ["benign", "malignant"]
  c.model.num_devices = len(OFFICIAL_DEVICES) + 1
  c.model.dtype = "bfloat16"
  c.model.remat = True
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 5000
  c.mesh = {"data": -1, "fsdp": 4}
  return c
