"""`busgen-jax convert --config configs/convert.py:busbra --input DIR --output OUT`: a dataset (phantom, BUSI's
folders, BUS-BRA, a CSV/JSON manifest) into ArrayRecord shards in the record schema (data/convert.py), with a
conversion report that accounts for every input. `--shard_index`/`--num_shards` split it over hosts."""

import json

from absl import flags

from busgen_jax.data import convert

default_config = convert.default_config
WORKDIR_OPTIONAL = True


def define_flags() -> None:
  flags.DEFINE_string("format", None, "shorthand for --config.format (phantom, busi, busbra, manifest)")
  flags.DEFINE_string("input", None, "shorthand for --config.input (input root or manifest file)")
  flags.DEFINE_string("output", None, "shorthand for --config.output (data_dir; --workdir works too)")
  flags.DEFINE_integer("shard_index", None, "shorthand for --config.shard_index")
  flags.DEFINE_integer("num_shards", None, "shorthand for --config.num_shards")


def main(cfg, workdir: str, argv) -> None:
  F = flags.FLAGS
  with cfg.unlocked():
    for name in ("format", "input", "shard_index", "num_shards"):
      if F[name].value is not None:
        cfg[name] = F[name].value
    if F.output or workdir:
      cfg.output = F.output or workdir
  ds = convert.run(cfg)
  report = json.loads((ds / convert.REPORT).read_text()) if (ds / convert.REPORT).exists() else None
  if report:
    print(f"{ds}\n  {report['inputs']} inputs -> {report['converted']} converted, {report['rejected']} rejected "
          f"{report['rejections_by_code']}; splits {report['counts']['split']}")
