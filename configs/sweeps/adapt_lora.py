"""Few-shot adaptation: held-out validation loss vs k shots per class, for three LoRA ranks (phantom task of
configs/adapt_phantom.py: cyst vs fibroadenoma on the demo's pretrained model).

  busgen-jax sweep --config configs/sweeps/adapt_lora.py:/tmp/busgen_demo --workdir /tmp/sweep_adapt
  busgen-jax sweep --config configs/sweeps/adapt_lora.py:/tmp/busgen_demo --workdir /tmp/sweep_adapt --mode=print

Results: DIR/sweep.md and DIR/sweep.png (best validation loss vs shots, one line per rank).
"""

import ml_collections

from busgen_jax.stages import sweep


def get_config(arg: str = "/tmp/busgen_demo"):
  demo = arg or "/tmp/busgen_demo"
  c = sweep.default_config()
  c.stage = "adapt"
  c.config = "configs/adapt_phantom.py"
  c.fixed = (f"base={demo}/diffusion/checkpoints", f"data.path={demo}/data", "data.image_size=32",
             "num_steps=120", "eval_every=40")
  c.axes = ml_collections.ConfigDict({
      "shots": {"key": "data.shots", "values": (4, 8, 16, 32)},
      "rank": {"key": "lora.rank", "values": (2, 8, 16)},
  })
  c.metrics = "adapt.json"
  c.plot = {"x": "shots", "y": "val_loss_best", "group": "rank", "xscale": "log"}
  return c
