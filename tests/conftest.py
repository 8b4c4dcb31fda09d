"""Test setup: 8 simulated CPU devices for sharding tests, absl flags parsed, shared fixtures."""

import os

# XLA:CPU's LLVM at -O0: programs compile ~45% faster and the tests' tiny steps run ~40% slower, a net gain
# for a suite that compiles far more than it runs (measured on the 16 px training step: 27 s -> 15 s).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The production XLA:CPU settings (Eigen convolutions), so that parity tests check what users run.
from busgen_jax import xla_env  # noqa: E402

xla_env.apply()
# Tests run on the host CPU even where libtpu (the `tpu` extra, for the aot tests) is installed.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA:CPU compilation dominates the suite: a persistent cache shared by tests, xdist workers and the
# subprocesses tests start (they inherit these variables) compiles each distinct program once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "xla")))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# Grain's worker processes read absl flags; outside absl.app.run they must be marked parsed.
flags.FLAGS.mark_as_parsed()

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
  if not SHARED.is_dir():
    pytest.skip("../shared is absent (a user's machine has none)")
  return SHARED


@pytest.fixture(scope="session")
def busbra_dir(shared_dir) -> Path:
  p = shared_dir / "data" / "busbra"
  if not (p / "bus_data.csv").is_file():
    pytest.skip("../shared/data/busbra is absent")
  return p


@pytest.hookimpl(tryfirst=True)   # before xdist's own hook, which reads the marks into the node ids
def pytest_collection_modifyitems(config, items):
  """A module's tests that use a module-scoped fixture run on one xdist worker (`--dist loadgroup` in
  pyproject.toml): with plain `load` scheduling each worker that draws one of them builds the fixture again (the
  few-shot experiment's, two minutes, was built twice). One group per module, not per fixture: its tests compile
  the same programs, and a program compiled on one worker is in the persistent cache only once that compile ends
  (test_train's two groups compiled one 48 s training step at the same time)."""
  for item in items:
    defs = getattr(item, "_fixtureinfo", None)
    if any(d[-1].scope == "module" for d in (defs.name2fixturedefs.values() if defs else ())):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
