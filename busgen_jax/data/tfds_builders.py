"""TFDS builders wrapping the same sources, for users who build datasets the TFDS way.

    from busgen_jax.data import tfds_builders
    b = tfds_builders.BusgenBusbra(data_dir="/data/tfds", input_dir="../shared/data/busbra")
    b.download_and_prepare()          # ArrayRecord shards, same schema as `busgen-jax convert`
    ds = b.as_data_source("train")

`busgen-jax convert` is the tool for scale (processes, many hosts, resumable, conversion_report.json); these
builders run in one process and log each rejected input (code and reason) as a warning. Both write the record schema of busgen_jax/data/schema.py.
"""

from __future__ import annotations

import functools

import ml_collections
import tensorflow_datasets as tfds
from absl import logging

from busgen_jax.data import convert, schema, splits
from busgen_jax.data.sources import base


class _SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  VERSION = tfds.core.Version(schema.SCHEMA_VERSION)
  FORMAT = ""

  def __init__(self, *, input_dir: str = "", config_overrides: dict | None = None, **kwargs):
    cfg = convert.default_config()
    cfg.format = self.FORMAT
    cfg.input = str(input_dir)
    cfg.update_from_flattened_dict(config_overrides or {})
    if self.FORMAT == "busbra" and "split.scheme" not in (config_overrides or {}):
      cfg.split.scheme = "folds"
    self._cfg = ml_collections.FrozenConfigDict(cfg)
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @functools.cached_property
  def _source_and_plan(self):
    source = convert.make_source(ml_collections.ConfigDict(self._cfg.to_dict()))
    return source, source.plan()

  def _info(self) -> tfds.core.DatasetInfo:
    _, plan = self._source_and_plan
    return self.dataset_info_from_configs(features=schema.features(plan.vocab),
                                          description=f"{self.FORMAT} in the busgen-jax record schema")

  def _split_generators(self, dl_manager):
    _, plan = self._source_and_plan
    c = self._cfg.split
    split_of = splits.assign(plan.items, c.scheme, fractions=dict(c.fractions), seed=c.seed,
                             test_fold=c.test_fold, val_fold=c.val_fold)
    for r in plan.rejected:
      logging.warning("rejected %s (%s): %s", r.file, r.code, r.reason)
    names = sorted(set(split_of.values()))
    return {s: self._generate_examples([it for it in plan.items if split_of[it.key] == s], s) for s in names}

  def _generate_examples(self, items, split):
    source, _ = self._source_and_plan
    for item in items:
      try:
        ex, _ = source.load(item)
      except base.Reject as e:
        logging.warning("rejected %s (%s): %s", item.source_file or item.key, e.code, e.message)
        continue
      ex = convert.resize_for_storage(ex, self._cfg.image.resize, self._cfg.image.size)
      yield ex.id, schema.to_feature_dict(ex, split)


class BusgenPhantom(_SourceBuilder):
  """The procedural phantom (`config_overrides={"phantom.num_examples": 1000, ...}`)."""
  FORMAT = "phantom"


class BusgenBusi(_SourceBuilder):
  """BUSI folder layout (`input_dir` = the folder with benign/ malignant/ normal/)."""
  FORMAT = "busi"


class BusgenBusbra(_SourceBuilder):
  """BUS-BRA (`input_dir` = the folder with bus_data.csv, Images/, Masks/); split by its own folds."""
  FORMAT = "busbra"


class BusgenManifest(_SourceBuilder):
  """A generic manifest (`input_dir` = the manifest file)."""
  FORMAT = "manifest"
