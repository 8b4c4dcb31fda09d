"""`busgen-jax <stage> [flags]`: parses flags, then calls the stage.

Every stage takes `--config` (an ml-collections config file; `path.py:arg` passes an argument to its
get_config) or, without it, the stage's built-in default config, plus `--config.key=value` overrides and
`--workdir`. `busgen-jax <stage> --helpfull` lists everything.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Callable

from absl import app, flags, logging

FLAGS = flags.FLAGS


# stage -> (module of busgen_jax/stages/, one line of help). Each module has default_config(), optionally
# define_flags() and main(cfg, workdir, argv); see busgen_jax/stages/__init__.py.
STAGES: dict[str, tuple[str, str]] = {
    "demo": ("demo", "the end-to-end job on the built-in phantom data (writes <workdir>/report.md)"),
    "convert": ("convert", "convert a dataset (phantom, BUSI, BUS-BRA, manifest) to ArrayRecord shards"),
    "train": ("train", "train (or resume) the BUSGen diffusion model: --config configs/<...>.py --workdir DIR"),
    "adapt": ("adapt", "few-shot LoRA adaptation of a pretrained model to a new task (new label rows, k shots)"),
    "distill": ("distill", "distil a trained diffusion model into a few-step student (guidance distillation, then "
                           "progressive rounds): --config.teacher=CKPT"),
    "fit-box-prior": ("fit_box_prior", "fit per-pathology lesion-box densities (KDE) on a dataset: "
                                       "--config.dataset=DIR"),
    "sample": ("sample", "generate a synthetic dataset from a checkpoint (sharded, resumable)"),
    "experiment": ("experiment", "the paper's protocol on real data: pretrain, generate, classifiers on real / "
                                 "generated / mixed data and a scaling curve, tested on the internal test split and "
                                 "on external sets (--config.external.NAME=PATH), quality and audit; one report"),
    "classify": ("classify", "train a classifier on real, generated or mixed data; evaluate on held-out real data"),
    "evaluate": ("evaluate", "evaluate a saved classifier on any dataset: --config.checkpoint=DIR "
                             "--config.dataset=DS"),
    "quality": ("quality", "fidelity, diversity and conditioning of a generated dataset against real data (FD, KID, "
                           "precision/recall per condition, conditional accuracy, box fidelity, TSTR/TRTR)"),
    "audit": ("audit", "privacy audit of a generated dataset: near-copies of training cases, membership inference, "
                       "a safe-to-share verdict, and a filtered copy"),
    "sweep": ("sweep", "expand a sweep config (configs/sweeps/*.py) into runs; run them here or on a TPU VM; one "
                       "table"),
    "bench": ("bench", "throughput, fraction of peak (MFU on accelerators), compile time and memory of training, "
                       "sampling and the input pipeline; writes bench.md (and docs/BENCHMARKS.md's generated section)"),
    "aot": ("aot", "compile the sharded train and sample steps for a TPU topology here; per-chip HBM, FLOPs, MFU"),
    "import-official": ("import_official", "import an official BUSGen PyTorch checkpoint into an Orbax checkpoint"),
    "inspect": ("inspect", "print a dataset's counts and label distributions, write a contact sheet"),
}


def _define_config(default_config: Callable | None, argv: list[str]) -> None:
  from ml_collections import config_flags
  given = any(a == "--config" or a.startswith("--config=") for a in argv)
  if given or default_config is None:
    config_flags.DEFINE_config_file("config", None, "ml-collections config file (path.py[:arg])", lock_config=True)
  else:
    config_flags.DEFINE_config_dict("config", default_config(), "the stage's default config", lock_config=True)


def _usage() -> str:
  width = max(map(len, STAGES))
  return "usage: busgen-jax <stage> [flags]\n\nstages:\n" + "\n".join(
      f"  {name:{width}s}  {help}" for name, (_, help) in STAGES.items()) + "\n\n`busgen-jax <stage> --help` for its flags."


def main(argv: list[str] | None = None) -> None:
  from busgen_jax import xla_env
  if argv is None:          # the program itself (not a caller's function call): glibc's huge pages, by re-exec
    xla_env.reexec_with_hugepages()
  argv = list(sys.argv if argv is None else argv)
  # XLA compilation dominates short CPU runs: keep compiled programs across runs (JAX's persistent cache;
  # read when jax is first imported, so set before any stage imports it).
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "busgen_jax", "xla"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  xla_env.apply()
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in STAGES:
    print(f"busgen-jax: unknown stage {name!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)
  from busgen_jax import console
  console.quiet_imports()
  stage = importlib.import_module(f"busgen_jax.stages.{STAGES[name][0]}")
  stage_argv, added = _open_key_overrides([f"busgen-jax {name}"] + argv[2:], getattr(stage, "OPEN_KEYS", ()))
  if added:   # ml-collections' config flag also reads sys.argv for overrides
    sys.argv[:] = [a for a in sys.argv if a in stage_argv or a == sys.argv[0] or a == name]
  if getattr(stage, "NO_CONFIG", False):
    flags.DEFINE_string("workdir", None, "dataset directory (or give it as the argument)")
  else:
    _define_config(None if getattr(stage, "REQUIRES_CONFIG", False) else stage.default_config, stage_argv)
    flags.DEFINE_string("workdir", None, "working/output directory")
  if hasattr(stage, "define_flags"):
    stage.define_flags()
  logging.set_verbosity(logging.INFO)

  def stage_main(args):
    if not FLAGS.workdir and not getattr(stage, "WORKDIR_OPTIONAL", False):
      raise app.UsageError("--workdir is required")
    console.setup(FLAGS.workdir, name, verbose=FLAGS["verbosity"].present)
    cfg = None if getattr(stage, "NO_CONFIG", False) else FLAGS.config
    if added:
      with cfg.unlocked():
        for key, entries in added.items():
          cfg[key].update(entries)
    try:
      stage.main(cfg, FLAGS.workdir, args)
    finally:
      console.finish()

  app.run(stage_main, argv=stage_argv, flags_parser=_parse_flags)


def _open_key_overrides(argv: list[str], open_keys) -> tuple[list[str], dict[str, dict[str, str]]]:
  """Takes `--config.<key>.<name>=<value>` for each open key out of argv (ml-collections rejects keys a config
  lacks), to be added to the parsed config: how `--config.external.NAME=PATH` names any number of test sets."""
  rest, added = [], {}
  for a in argv:
    key = next((k for k in open_keys if a.startswith(f"--config.{k}.")), None)
    if key is None:
      rest.append(a)
      continue
    name, sep, value = a[len(f"--config.{key}."):].partition("=")
    if not sep or not name or "." in name or not value:
      print(f"{argv[0]}: expected --config.{key}.NAME=VALUE, got {a!r}", file=sys.stderr)
      sys.exit(2)
    added.setdefault(key, {})[name] = value
  return rest, added


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad `--config.key=value` (a key the config lacks, a value of the wrong type) a
  one-line usage error (exit status 2) instead of a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    msg = str(e).strip("'\"").replace("\\n", " ").replace("\n", " ").replace("\\'", "'")
    print(f"{argv[0]}: bad --config override: {type(e).__name__}: {msg}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  main()
