"""Few-shot adaptation of a BUS-BRA-pretrained BUSGen to BI-RADS or histology, k images per class (for
accelerators).

  busgen-jax convert --config configs/convert.py:busbra --input ../shared/data/busbra --workdir /data/busbra \
      --config.split.val_fold=2           # a validation fold for adapter selection; fold 1 stays the test set
  busgen-jax train --config configs/busbra_pretrain.py --workdir /ckpt/busbra_pretrain \
      --config.data.sources.real.path=/data/busbra/busbra/1.0.0
  busgen-jax adapt --config configs/adapt_busbra.py:task=birads,k=16 --workdir /ckpt/adapt_birads_k16 \
      --config.base=/ckpt/busbra_pretrain/checkpoints --config.data.path=/data/busbra/busbra/1.0.0
  busgen-jax adapt --config configs/adapt_busbra.py:task=histology,k=64 --workdir /ckpt/adapt_histology_k64 \
      --config.base=/ckpt/busbra_pretrain/checkpoints --config.data.path=/data/busbra/busbra/1.0.0

task: birads (BI-RADS 2, 3, 4, 5: four new pathology rows) or histology (fibroadenoma, cyst, fibrocystic
changes, invasive ductal carcinoma); k: 8, 16, 32 or 64 images per class, drawn by case from the train folds.
"""

from busgen_jax.train import adapt

TASKS = {
    "birads": {"field": "birads", "classes": ("2", "3", "4", "5"), "pathology": ()},
    "histology": {"field": "histology",
                  "classes": ("fibroadenoma", "cyst", "fibrocystic changes", "invasive ductal carcinoma"),
                  "pathology": (("fibroadenoma", "benign"), ("cyst", "benign"), ("fibrocystic changes", "benign"),
                                ("invasive ductal carcinoma", "malignant"))},
}


def get_config(arg: str = "task=birads,k=16"):
  args = dict(kv.split("=", 1) for kv in (arg or "task=birads,k=16").split(",") if kv)
  task, k = args.get("task", "birads"), int(args.get("k", 16))
  if task not in TASKS or k not in (8, 16, 32, 64):
    raise ValueError(f"adapt_busbra.py:task=birads|histology,k=8|16|32|64, got {arg!r}")
  c = adapt.default_config()
  c.base = ""                          # required: --config.base=<pretraining run>/checkpoints
  c.data.path = ""                     # required: --config.data.path=<converted BUS-BRA>
  c.data.shots = k
  c.data.val_per_class = 48
  c.data.batch_size = min(64, 4 * k)
  c.data.worker_count = 4
  c.task.update(TASKS[task])
  c.num_steps = 50 * k                 # few examples: a few hundred epochs at most, validation picks the step
  c.eval_every = max(50, c.num_steps // 20)
  c.checkpoint_every = c.eval_every
  c.sample_every = 4 * c.eval_every    # sample grids of the adapted model in TensorBoard (the official sampler)
  c.lora.rank = 16
  c.lora.alpha = 16.0
  c.lora.dropout = 0.1
  c.optim.update(lr=5e-4, warmup_steps=50)
  c.mesh = {"data": -1, "fsdp": 1}
  return c
