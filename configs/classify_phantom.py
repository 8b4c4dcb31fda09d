"""A phantom benign/malignant classifier on real, generated or mixed data (CPU-sized).

  busgen-jax classify --config configs/classify_phantom.py --workdir /tmp/cls_real
  busgen-jax classify --config configs/classify_phantom.py:mixed --workdir /tmp/cls_mixed \
      --config.data.sources.generated.path=/tmp/phantom_gen/data/phantom_generated/1.0.0

Validation (checkpoint selection) and testing use the real dataset's val and test splits.
"""

from busgen_jax.train import classifier


def get_config(arg: str = "real"):
  c = classifier.default_config()
  real = {"path": "/tmp/phantom/phantom/1.0.0", "split": "train", "weight": 1.0, "filters": {}, "limit": 0}
  generated = {"path": "/tmp/phantom_gen/data/phantom_generated/1.0.0", "split": "train", "weight": 1.0,
               "filters": {}, "limit": 0}
  c.data.sources = {"real": {"real": real}, "generated": {"generated": generated},
                    "mixed": {"real": {**real, "weight": 0.5}, "generated": {**generated, "weight": 0.5}}}[arg or "real"]
  c.val.path = real["path"]
  c.test = {"real_test": {"path": real["path"], "split": "test"}}
  c.data.image_size, c.data.batch_size = 64, 32
  c.num_steps, c.eval_every, c.checkpoint_every = 1000, 100, 100
  c.model.name = "resnet_tiny"
  return c
