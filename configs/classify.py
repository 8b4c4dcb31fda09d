"""A benign/malignant classifier on real, generated or mixed data; every dataset comes in as an argument.

  busgen-jax classify --config configs/classify.py:real=/data/busbra/1.0.0 --workdir /tmp/cls_real
  busgen-jax classify --config configs/classify.py:generated=/gen/data/generated/1.0.0,val=/data/busbra/1.0.0 \
      --workdir /tmp/cls_generated
  busgen-jax classify --workdir /tmp/cls_mixed --config \
      configs/classify.py:real=/data/busbra/1.0.0,generated=/gen/data/generated/1.0.0,siteB=/data/siteB/1.0.0

Arguments (comma-separated NAME=PATH, each a converted dataset):
  real=PATH       real training images (its train split)
  generated=PATH  generated training images (train split); with real: the mixed stream, `mix` generated share
  val=PATH        checkpoint selection on its val split (default: real's); required without real
  mix=W           share of generated images in the mixed stream (default 0.5)
  any other NAME  a test set: its test split, reported as DIR/eval/<NAME>.*; real's test split is always one
                  (`real_test`). `size=S` and `steps=N` set the image size and the number of steps.
A path that does not exist is an error when `classify` starts, before any training.
"""

from busgen_jax.train import classifier


def get_config(arg: str = ""):
  args = dict(kv.split("=", 1) for kv in arg.split(",") if kv)
  real, generated, val = args.pop("real", ""), args.pop("generated", ""), args.pop("val", "")
  mix, size, steps = float(args.pop("mix", 0.5)), int(args.pop("size", 64)), int(args.pop("steps", 1500))
  if arg and not (real or generated):
    raise ValueError("configs/classify.py: give real=PATH and/or generated=PATH (converted datasets)")
  if generated and not (real or val):
    raise ValueError("configs/classify.py: generated-only training needs val=PATH (real data to select on)")
  c = classifier.default_config()
  src = dict(c.data.sources.real.to_dict())
  sources = {}
  if real or not generated:     # without arguments: a `real` source to fill in by --config.data.sources.real.path
    sources["real"] = {**src, "path": real, "weight": 1.0 - mix if generated else 1.0}
  if generated:
    sources["generated"] = {**src, "path": generated, "weight": mix if real else 1.0}
  c.data.sources = sources
  c.val.path = val or real
  c.test = {**({"real_test": {"path": real, "split": "test"}} if real or not generated else {}),
            **{name: {"path": path, "split": "test"} for name, path in args.items()}}
  c.data.image_size, c.data.batch_size = size, 32
  c.num_steps, c.eval_every, c.checkpoint_every = steps, 100, 500
  c.model.name = "resnet_tiny"
  c.optim.update(lr=3e-3, warmup_steps=30)
  return c
