"""Every config file loads with each argument it documents, and its docstring gives the command that runs it."""

import importlib.util
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARGS = {"adapt_busbra": [f"task={t},k={k}" for t in ("birads", "histology") for k in (8, 16, 32, 64)],
        "classify_phantom": ["real", "generated", "mixed"], "demo": ["cpu", "ci", "full"],
        "convert": ["phantom", "busbra", "busi", "manifest"]}


def _load(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_config_loads_and_documents_its_command(name):
  module = _load(name)
  assert module.__doc__ and "busgen-jax " in module.__doc__, f"{name}.py: the docstring must give its command"
  for arg in ARGS.get(name, [""]):
    cfg = module.get_config(arg)
    assert cfg.to_dict(), (name, arg)


def test_adapt_busbra_rejects_unknown_arguments():
  with pytest.raises(ValueError, match="task=birads"):
    _load("adapt_busbra").get_config("task=density,k=16")
