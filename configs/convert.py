"""Conversion of a breast-ultrasound dataset into the busgen-jax record schema (ArrayRecord + TFDS metadata).

  # built-in phantom (no files needed):
  busgen-jax convert --config configs/convert.py:phantom --workdir /tmp/data
  # BUS-BRA (real, 1875 images; its own 5 folds: fold 1 is test)
  busgen-jax convert --config configs/convert.py:busbra --input ../shared/data/busbra --workdir /tmp/data
  # BUSI folder layout / any manifest (JSON list, split dict or CSV; the official BUSGen JSON loads as is)
  busgen-jax convert --config configs/convert.py:busi --input /data/Dataset_BUSI_with_GT --workdir /tmp/data
  busgen-jax convert --config configs/convert.py:manifest --input /data/export/manifest.json --workdir /tmp/data
  # across hosts: the same command on every host with --shard_index=$i --num_shards=$N

Any field can be overridden, e.g. `--config.image.size=160 --config.split.scheme=random --config.num_workers=8`.
The dataset lands in <workdir>/<name>/<version>/ with conversion_report.json beside the shards.
"""

from busgen_jax.data import convert


def get_config(arg: str = "phantom"):
  c = convert.default_config()
  c.format = arg or "phantom"
  if c.format == "busbra":
    c.split.scheme = "folds"   # BUS-BRA's case-level 5-fold split; fold 1 is test
    c.split.test_fold = 1
  return c
