"""Every config file loads with each argument it documents, and its docstring gives the command that runs it."""

import importlib.util
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARGS = {"adapt_busbra": [f"task={t},k={k}" for t in ("birads", "histology") for k in (8, 16, 32, 64)],
        "classify_phantom": ["real", "generated", "mixed"], "demo": ["cpu", "ci", "full"],
        "convert": ["phantom", "busbra", "busi", "manifest"], "bench": ["cpu", "accelerator"]}


def _load(name):
  spec = importlib.util.spec_from_file_location(f"config_{name.replace('/', '_')}", CONFIGS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in CONFIGS.glob("**/*.py")))
def test_config_loads_and_documents_its_command(name):
  module = _load(name)
  assert module.__doc__ and "busgen-jax " in module.__doc__, f"{name}.py: the docstring must give its command"
  for arg in ARGS.get(name, [""]):
    cfg = module.get_config(arg)
    assert cfg.to_dict(), (name, arg)


def test_adapt_busbra_rejects_unknown_arguments():
  with pytest.raises(ValueError, match="task=birads"):
    _load("adapt_busbra").get_config("task=density,k=16")


def test_sweep_configs_expand_into_runs_of_existing_config_keys():
  """Each sweep's runs override keys that its stage's config has (a typo would fail every run on the pod)."""
  from ml_collections import config_flags  # noqa: F401  (the same override semantics as the CLI)
  from busgen_jax import sweep
  for path in sorted((CONFIGS / "sweeps").glob("*.py")):
    cfg = _load(f"sweeps/{path.stem}").get_config()
    runs = sweep.expand(cfg)
    assert len(runs) > 1 and cfg.metrics and cfg.plot.x in cfg.axes and cfg.plot.y
    base, _, arg = cfg.config.partition(":")
    stage_cfg = _load(Path(base).stem).get_config(arg) if arg else _load(Path(base).stem).get_config()
    for override in runs[0]["overrides"]:
      key = override.split("=", 1)[0]
      node = stage_cfg
      for part in key.split("."):
        assert part in node, f"{path.name}: {key} is not a key of {cfg.config}"
        node = node[part]


def test_docs_experiment_scripts_import_and_document_their_command():
  """docs/experiments/*.py (the commands behind docs/PRIVACY.md's figures) stay runnable against the package."""
  for path in sorted((CONFIGS.parent / "docs" / "experiments").glob("*.py")):
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)          # imports only: main() runs under __main__
    assert f"python docs/experiments/{path.name}" in module.__doc__ and callable(module.main), path
