"""ml-collections config files (`configs/*.py`) loaded by path outside the CLI: docs scripts, bench, tests.

    cfg = config_files.load("configs/experiment.py:cpu")     # what --config=configs/experiment.py:cpu gives
    cfg = config_files.load(config_files.CONFIGS / "phantom_tiny.py")
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from types import ModuleType

import ml_collections

CONFIGS = Path(__file__).resolve().parents[1] / "configs"   # the checkout's configs (a source install)


def module(path: str | os.PathLike) -> ModuleType:
  """The config file as a module (its get_config and any helpers)."""
  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"config file {path}: not found")
  name = "config_" + "_".join(path.with_suffix("").parts[-2:]).replace("-", "_").replace(".", "_")
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load(spec: str | os.PathLike) -> ml_collections.ConfigDict:
  """`path.py[:arg]` -> its get_config(arg) (or get_config() without an argument), as --config does."""
  path, _, arg = os.fspath(spec).partition(":")
  get = module(path).get_config
  return get(arg) if arg else get()
