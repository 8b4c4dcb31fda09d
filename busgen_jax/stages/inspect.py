"""`busgen-jax inspect DATASET_DIR [--split train] [--sheet out.png] [--json]`: a dataset's counts and label
distributions, and a contact sheet (data/inspect.py)."""

import json
from pathlib import Path

from absl import app, flags

from busgen_jax.data import inspect, reader

NO_CONFIG = True   # a dataset directory, no config
WORKDIR_OPTIONAL = True


def define_flags() -> None:
  flags.DEFINE_string("split", None, "split for the contact sheet (default: train)")
  flags.DEFINE_string("sheet", None, "contact sheet PNG path (default: <dataset dir>/contact_sheet.png)")
  flags.DEFINE_integer("num_images", 48, "images on the contact sheet")
  flags.DEFINE_bool("json", False, "print the summary as JSON")


def main(cfg, workdir: str, argv) -> None:
  F = flags.FLAGS
  paths = argv[1:] or ([workdir] if workdir else [])
  if len(paths) != 1:
    raise app.UsageError("usage: busgen-jax inspect DATASET_DIR [--split train] [--sheet out.png]")
  ds = reader.open_dataset(paths[0])
  summary = inspect.summarize(ds)
  sheet = inspect.contact_sheet(ds, Path(F.sheet) if F.sheet else ds.dir / "contact_sheet.png", split=F.split,
                                n=F.num_images)
  summary["contact_sheet"] = str(sheet)
  print(json.dumps(summary, indent=1) if F.json else inspect.format_summary(summary) + f"\ncontact sheet: {sheet}")
