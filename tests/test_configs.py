"""Every config file loads with each argument it documents, and its docstring gives the command that runs it."""

from pathlib import Path

import ml_collections
import pytest

from busgen_jax import config_files

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
ARGS = {"adapt_busbra": [f"task={t},k={k}" for t in ("birads", "histology") for k in (8, 16, 32, 64)],
        "classify": ["", "real=/r", "generated=/g,val=/r", "real=/r,generated=/g,mix=0.3,siteB=/b"],
        "experiment": ["cpu", "ci", "full", "fewshot", "fewshot_curve", "fewshot_ci"], "demo": ["cpu", "ci", "full"],
        "convert": ["phantom", "busbra", "busi", "manifest"], "bench": ["cpu", "accelerator"],
        "distill": ["guidance", "progressive", "ci"],
        "audit_phantom": ["/tmp/busgen_demo"], "quality_phantom": ["/tmp/busgen_demo"]}


def _load(name):
  return config_files.module(CONFIGS / f"{name}.py")


@pytest.mark.parametrize("name", sorted(str(p.relative_to(CONFIGS).with_suffix("")) for p in CONFIGS.glob("**/*.py")))
def test_config_loads_and_documents_its_command(name):
  module = _load(name)
  doc = module.__doc__ or ""
  assert "busgen-jax " in doc and f"configs/{name}.py" in doc, f"{name}.py: the docstring must give its command"
  for arg in ARGS.get(name, [""]):
    cfg = module.get_config(arg)
    assert isinstance(cfg, ml_collections.ConfigDict) and cfg.to_dict(), (name, arg)


def test_adapt_busbra_rejects_unknown_arguments():
  with pytest.raises(ValueError, match="task=birads"):
    _load("adapt_busbra").get_config("task=density,k=16")


def test_sweep_configs_expand_into_runs_of_existing_config_keys():
  """Each sweep's runs override keys that its stage's config has (a typo would fail every run on the pod)."""
  from ml_collections import config_flags  # noqa: F401  (the same override semantics as the CLI)
  from busgen_jax.stages import sweep
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
    module = config_files.module(path)       # imports only: main() runs under __main__
    assert f"python docs/experiments/{path.name}" in module.__doc__ and callable(module.main), path


def test_classify_config_takes_every_dataset_by_argument(tmp_path):
  from busgen_jax.data import convert
  from busgen_jax.train import classifier
  from helpers import convert_config
  real = convert.convert(convert_config("phantom", "", tmp_path / "real", **{"phantom.num_examples": 12}))
  gen = convert.convert(convert_config("phantom", "", tmp_path / "gen", **{"phantom.num_examples": 12,
                                                                           "phantom.seed": 5}))
  cfg = _load("classify").get_config(f"real={real},generated={gen},mix=0.3,siteB={tmp_path / 'siteB'}")
  s = cfg.data.sources
  assert (s.real.path, s.generated.path) == (str(real), str(gen))
  assert (s.real.weight, s.generated.weight) == pytest.approx((0.7, 0.3))
  assert cfg.val.path == str(real) and cfg.val.split == "val"          # selection: the real source's val split
  assert {n: (t.path, t.split) for n, t in cfg.test.items()} == {
      "real_test": (str(real), "test"), "siteB": (str(tmp_path / "siteB"), "test")}
  with pytest.raises(FileNotFoundError, match="test.siteB.path"):   # before any training
    classifier.check_paths(cfg)
  only = _load("classify").get_config(f"generated={gen},val={real}")
  assert set(only.data.sources) == {"generated"} and only.val.path == str(real) and not len(only.test)
  classifier.check_paths(only)
  with pytest.raises(ValueError, match="val=PATH"):
    _load("classify").get_config(f"generated={gen}")
  bare = _load("classify").get_config("")            # nothing given: nothing defaults to a made-up path
  with pytest.raises(ValueError, match="data.sources.real.path is empty"):
    classifier.check_paths(bare)
