"""`busgen-jax <stage> [flags]`: parses flags, then calls the stage.

Every stage takes `--config` (an ml-collections config file; `path.py:arg` passes an argument to its
get_config) or, without it, the stage's built-in default config, plus `--config.key=value` overrides and
`--workdir`. `busgen-jax <stage> --helpfull` lists everything.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Callable

from absl import app, flags, logging

FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Stage:
  help: str
  default_config: Callable | None        # the config used when --config is not given
  define_flags: Callable[[], None]
  main: Callable[[list[str]], None]
  open_keys: tuple[str, ...] = ()        # config dicts that take new keys: --config.<key>.<any name>=<value>


def _define_config(default_config: Callable | None, argv: list[str]) -> None:
  from ml_collections import config_flags
  given = any(a == "--config" or a.startswith("--config=") for a in argv)
  if given or default_config is None:
    config_flags.DEFINE_config_file("config", None, "ml-collections config file (path.py[:arg])", lock_config=True)
  else:
    config_flags.DEFINE_config_dict("config", default_config(), "the stage's default config", lock_config=True)
  flags.DEFINE_string("workdir", None, "working/output directory")


# ---------------------------------------------------------------------------------------------------- convert

def _convert_flags():
  flags.DEFINE_string("format", None, "shorthand for --config.format (phantom, busi, busbra, manifest)")
  flags.DEFINE_string("input", None, "shorthand for --config.input (input root or manifest file)")
  flags.DEFINE_string("output", None, "shorthand for --config.output (data_dir; --workdir works too)")
  flags.DEFINE_integer("shard_index", None, "shorthand for --config.shard_index")
  flags.DEFINE_integer("num_shards", None, "shorthand for --config.num_shards")


def _convert_main(argv):
  from busgen_jax.data import convert
  cfg = FLAGS.config
  with cfg.unlocked():
    for name in ("format", "input", "shard_index", "num_shards"):
      if FLAGS[name].value is not None:
        cfg[name] = FLAGS[name].value
    output = FLAGS.output or FLAGS.workdir
    if output:
      cfg.output = output
  ds = convert.run(cfg)
  report = json.loads((ds / convert.REPORT).read_text()) if (ds / convert.REPORT).exists() else None
  if report:
    print(f"{ds}\n  {report['inputs']} inputs -> {report['converted']} converted, {report['rejected']} rejected "
          f"{report['rejections_by_code']}; splits {report['counts']['split']}")


def _default_convert_config():
  from busgen_jax.data import convert
  return convert.default_config()


# ---------------------------------------------------------------------------------------------------- inspect

def _inspect_flags():
  flags.DEFINE_string("split", None, "split for the contact sheet (default: train)")
  flags.DEFINE_string("sheet", None, "contact sheet PNG path (default: <dataset dir>/contact_sheet.png)")
  flags.DEFINE_integer("num_images", 48, "images on the contact sheet")
  flags.DEFINE_bool("json", False, "print the summary as JSON")


def _inspect_main(argv):
  from pathlib import Path
  from busgen_jax.data import inspect, reader
  paths = argv[1:] or ([FLAGS.workdir] if FLAGS.workdir else [])
  if len(paths) != 1:
    raise app.UsageError("usage: busgen-jax inspect DATASET_DIR [--split train] [--sheet out.png]")
  ds = reader.open_dataset(paths[0])
  summary = inspect.summarize(ds)
  sheet = inspect.contact_sheet(ds, Path(FLAGS.sheet) if FLAGS.sheet else ds.dir / "contact_sheet.png",
                                split=FLAGS.split, n=FLAGS.num_images)
  summary["contact_sheet"] = str(sheet)
  print(json.dumps(summary, indent=1) if FLAGS.json else inspect.format_summary(summary) + f"\ncontact sheet: {sheet}")


# ---------------------------------------------------------------------------------------------------- demo

def _demo_main(argv):
  from busgen_jax import demo
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  demo.run(FLAGS.config, FLAGS.workdir)


def _default_demo_config():
  from busgen_jax import demo
  return demo.default_config()


# ---------------------------------------------------------------------------------------------------- train

def _train_main(argv):
  from busgen_jax.train import diffusion
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  diffusion.train(FLAGS.config, FLAGS.workdir)


def _default_train_config():
  from busgen_jax.train import diffusion
  return diffusion.default_config()


# ---------------------------------------------------------------------------------------------------- adapt

def _adapt_main(argv):
  from busgen_jax.train import adapt
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  s = adapt.adapt(FLAGS.config, FLAGS.workdir)
  print(f"validation loss {s['val_loss_start']:.4f} -> {s['val_loss_best']:.4f} (step {s['best_step']}); "
        f"adapters {s['adapters']}, merged {s['merged'] or '-'}, box prior {s['box_prior'] or '-'}")


def _default_adapt_config():
  from busgen_jax.train import adapt
  return adapt.default_config()


# ---------------------------------------------------------------------------------------------------- sweep

def _sweep_flags():
  flags.DEFINE_enum("mode", "local", ["local", "print", "tpu", "collect"],
                    "local: run here one after another; print: the commands; tpu: through launch/tpu.sh on a TPU VM; "
                    "collect: only gather the runs' metrics")
  flags.DEFINE_bool("dry_run", False, "with --mode=tpu: print the launch/tpu.sh commands, run nothing")
  flags.DEFINE_list("only", [], "run only these runs (names or indices)")


def _sweep_main(argv):
  from busgen_jax import sweep
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (the sweep's directory; each run gets a subdirectory)")
  sweep.run(FLAGS.config, FLAGS.workdir, mode=FLAGS.mode, dry_run=FLAGS.dry_run, only=FLAGS.only)


# ---------------------------------------------------------------------------------------------------- aot

def _aot_flags():
  flags.DEFINE_string("topology", None, "TPU slice to compile for: v5p:4x4x4, v5e:16x16, v6e:8x8, v4:2x2x2 ...")
  flags.DEFINE_list("batch_sizes", [], "global train batch sizes to compile (default: the config's data.batch_size)")
  flags.DEFINE_list("programs", ["train", "sample"], "train and/or sample")
  flags.DEFINE_integer("sample_batch", 0, "sampling batch per chip (default: `busgen-jax sample`'s)")
  flags.DEFINE_float("utilisation", 0.5, "fraction of the bf16 peak assumed for the step-time estimate")
  flags.DEFINE_integer("num_slices", 1, "multi-slice: this many copies of the topology over the data-centre network")
  flags.DEFINE_float("effort", 0.0, "XLA exec_time_optimization_effort in [-1, 1]; -1 compiles about 2x faster")


def _aot_main(argv):
  # Nothing runs on the described chips: keep JAX on the host even where libtpu would claim a local TPU (jax is
  # already imported by the config, but its backends start lazily).
  import jax
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  from busgen_jax import aot
  if not FLAGS.topology:
    raise app.UsageError("--topology is required (e.g. v5p:4x4x4)")
  bad = set(FLAGS.programs) - {"train", "sample"}
  if bad:
    raise app.UsageError(f"--programs takes train and/or sample, got {sorted(bad)}")
  try:
    report = aot.run(FLAGS.config, FLAGS.workdir, topology_name=FLAGS.topology,
                     batch_sizes=[int(b) for b in FLAGS.batch_sizes], programs=FLAGS.programs,
                     sample_per_device_batch=FLAGS.sample_batch, utilisation=FLAGS.utilisation, effort=FLAGS.effort,
                     num_slices=FLAGS.num_slices)
  except aot.DoesNotFit as e:
    print(f"busgen-jax aot: does not fit on {FLAGS.topology}: {e}", file=sys.stderr)
    sys.exit(1)
  print(aot.markdown(report))


# ---------------------------------------------------------------------------------------------------- import-official

def _import_flags():
  flags.DEFINE_string("checkpoint", None, "official checkpoint (.pt/.pth/.ckpt read weights-only, or .npz)")
  flags.DEFINE_string("output", None, "output directory (or --workdir)")
  flags.DEFINE_string("key", None, "entry of the checkpoint dict holding the state dict (default: found)")


def _import_main(argv):
  from busgen_jax import official
  output = FLAGS.output or FLAGS.workdir
  if not FLAGS.checkpoint or not output:
    raise app.UsageError("usage: busgen-jax import-official --checkpoint ckpt.pt --output DIR [--config.ch=...]")
  c = FLAGS.config
  cfg = official.model_config(ch=c.ch, ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                              num_groups=c.num_groups, T=c.T, dev_num=c.dev_num)
  out = official.import_checkpoint(FLAGS.checkpoint, output, cfg, key=FLAGS.key)
  print(f"{out}: imported {FLAGS.checkpoint} (use --config.init_from={out} to train from it)")


def _default_import_config():
  import ml_collections
  # The official constructor's arguments (full model defaults).
  return ml_collections.ConfigDict({"ch": 128, "ch_mult": (1, 2, 2, 2), "num_res_blocks": 2, "num_groups": 32,
                                    "T": 500, "dev_num": 20})


# ---------------------------------------------------------------------------------------------------- sample

def _sample_main(argv):
  from busgen_jax import generate, parallel
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  parallel.maybe_initialize_distributed()
  ds = generate.generate(FLAGS.config, FLAGS.workdir)
  print(f"{ds}: generated dataset (sheets in {ds / generate.SHEETS})")


def _default_sample_config():
  from busgen_jax import generate
  return generate.default_config()


def _fit_box_prior_main(argv):
  from busgen_jax.diffusion import box_prior
  out = box_prior.run(FLAGS.config, FLAGS.workdir)
  print(f"{out}: box prior")


def _default_box_prior_config():
  from busgen_jax.diffusion import box_prior
  return box_prior.default_config()


# ---------------------------------------------------------------------------------------------------- classify

def _classify_main(argv):
  from busgen_jax.train import classifier
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  results = classifier.train(FLAGS.config, FLAGS.workdir)
  for name, r in results.items():
    auc = r.get("auc", r.get("macro_auc"))
    print(f"{name}: n={r['n']} AUC={auc:.3f} -> {FLAGS.workdir}/eval/{name}.html")


def _default_classify_config():
  from busgen_jax.train import classifier
  return classifier.default_config()


def _evaluate_main(argv):
  from busgen_jax.train import classifier
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  for name, r in classifier.evaluate_main(FLAGS.config, FLAGS.workdir).items():
    print(f"{name}: n={r['n']} AUC={r.get('auc', r.get('macro_auc')):.3f} -> {FLAGS.workdir}/{name}.html")


def _default_evaluate_config():
  from busgen_jax.train import classifier
  return classifier.default_evaluate_config()


# ---------------------------------------------------------------------------------------------------- quality

def _quality_main(argv):
  from busgen_jax.evaluate import fidelity
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (the report's directory)")
  rep = fidelity.run(FLAGS.config, FLAGS.workdir)
  a = rep["fidelity"]["all"]
  c = rep["conditional_accuracy"]["generated"]
  t = rep["tstr"]
  print(f"FD {a['fd']['value']:.3g}, KID {a['kid']['value']:.3g}, precision {a['precision']['value']:.3f}, recall "
        f"{a['recall']['value']:.3f}; conditional accuracy {c['accuracy']:.3f}; box fidelity AUC "
        f"{rep['box_fidelity']['generated']['auc']:.3f}" + (f"; TSTR/TRTR {t['ratio']:.2f}" if t else "")
        + f"\nreport: {FLAGS.workdir}/quality.html")


def _default_quality_config():
  from busgen_jax.evaluate import fidelity
  return fidelity.default_config()


# ---------------------------------------------------------------------------------------------------- audit

def _audit_flags():
  flags.DEFINE_bool("strict", False, "exit with status 3 when the repository is not safe to share")


def _audit_main(argv):
  from busgen_jax.evaluate import privacy
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (the audit's report directory)")
  rep = privacy.run(FLAGS.config, FLAGS.workdir)
  v = rep["verdict"]
  print(("SAFE TO SHARE by the configured thresholds" if v["safe_to_share"] else "NOT SAFE TO SHARE:\n  "
         + "\n  ".join(v["reasons"])) + "\n" + "\n".join(f"  - {c}" for c in v["checks"])
        + f"\nreport: {FLAGS.workdir}/audit.html" + (f"\nfiltered: {rep['filtered_dataset']}"
                                                     if rep.get("filtered_dataset") else ""))
  if FLAGS.strict and not v["safe_to_share"]:
    sys.exit(3)


def _default_audit_config():
  from busgen_jax.evaluate import privacy
  return privacy.default_config()


# ---------------------------------------------------------------------------------------------------- experiment

def _experiment_main(argv):
  from busgen_jax import experiment
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (the experiment's run directory)")
  s = experiment.run(FLAGS.config, FLAGS.workdir)
  for test, t in s.get("tests", {}).items():
    print(f"{test}: " + ", ".join(f"{arm} {r['auc']:.3f}" for arm, r in t["arms"].items())
          + f"; TSTR/TRTR {t['tstr_over_trtr']:.3f}, mixed - real {t['mixed_minus_real']:+.3f}")


def _default_experiment_config():
  from busgen_jax import experiment
  return experiment.default_config()


# ---------------------------------------------------------------------------------------------------- bench

def _bench_main(argv):
  from busgen_jax import bench
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required (bench.json, bench.md and the pipeline's data go there)")
  bench.run(FLAGS.config, FLAGS.workdir)
  print(open(os.path.join(FLAGS.workdir, "bench.md")).read())


def _default_bench_config():
  from busgen_jax import bench
  return bench.default_config()


STAGES: dict[str, Stage] = {
    "demo": Stage("the end-to-end job on the built-in phantom data (writes <workdir>/report.md)",
                  _default_demo_config, lambda: None, _demo_main),
    "convert": Stage("convert a dataset (phantom, BUSI, BUS-BRA, manifest) to ArrayRecord shards",
                     _default_convert_config, _convert_flags, _convert_main),
    "train": Stage("train (or resume) the BUSGen diffusion model: --config configs/<...>.py --workdir DIR",
                   _default_train_config, lambda: None, _train_main),
    "adapt": Stage("few-shot LoRA adaptation of a pretrained model to a new task (new label rows, k shots)",
                   _default_adapt_config, lambda: None, _adapt_main),
    "fit-box-prior": Stage("fit per-pathology lesion-box densities (KDE) on a dataset: --config.dataset=DIR",
                           _default_box_prior_config, lambda: None, _fit_box_prior_main),
    "sample": Stage("generate a synthetic dataset from a checkpoint (sharded, resumable)",
                    _default_sample_config, lambda: None, _sample_main),
    "experiment": Stage("the paper's protocol on real data: pretrain, generate, classifiers on real / generated / "
                        "mixed data and a scaling curve, tested on the internal test split and on external sets "
                        "(--config.external.NAME=PATH), quality and audit; one report",
                        _default_experiment_config, lambda: None, _experiment_main, open_keys=("external",)),
    "classify": Stage("train a classifier on real, generated or mixed data; evaluate on held-out real data",
                      _default_classify_config, lambda: None, _classify_main),
    "evaluate": Stage("evaluate a saved classifier on any dataset: --config.checkpoint=DIR --config.dataset=DS",
                      _default_evaluate_config, lambda: None, _evaluate_main),
    "quality": Stage("fidelity, diversity and conditioning of a generated dataset against real data (FD, KID, "
                     "precision/recall per condition, conditional accuracy, box fidelity, TSTR/TRTR)",
                     _default_quality_config, lambda: None, _quality_main),
    "audit": Stage("privacy audit of a generated dataset: near-copies of training cases, membership inference, "
                   "a safe-to-share verdict, and a filtered copy", _default_audit_config, _audit_flags, _audit_main),
    "sweep": Stage("expand a sweep config (configs/sweeps/*.py) into runs; run them here or on a TPU VM; one table",
                   None, _sweep_flags, _sweep_main),
    "bench": Stage("throughput, fraction of peak (MFU on accelerators), compile time and memory of training, "
                   "sampling and the input pipeline; writes bench.md (and docs/BENCHMARKS.md's generated section)",
                   _default_bench_config, lambda: None, _bench_main),
    "aot": Stage("compile the sharded train and sample steps for a TPU topology here; per-chip HBM, FLOPs, MFU",
                 _default_train_config, _aot_flags, _aot_main),
    "import-official": Stage("import an official BUSGen PyTorch checkpoint into an Orbax checkpoint",
                             _default_import_config, _import_flags, _import_main),
    "inspect": Stage("print a dataset's counts and label distributions, write a contact sheet",
                     None, _inspect_flags, _inspect_main),
}


def _usage() -> str:
  width = max(map(len, STAGES))
  return "usage: busgen-jax <stage> [flags]\n\nstages:\n" + "\n".join(
      f"  {name:{width}s}  {s.help}" for name, s in STAGES.items()) + "\n\n`busgen-jax <stage> --help` for its flags."


def main(argv: list[str] | None = None) -> None:
  # XLA compilation dominates short CPU runs: keep compiled programs across runs (JAX's persistent cache;
  # read when jax is first imported, so set before any stage imports it).
  argv = list(sys.argv if argv is None else argv)
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "busgen_jax", "xla"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(_usage())
    sys.exit(0 if len(argv) >= 2 else 2)
  name = argv[1]
  if name not in STAGES:
    print(f"busgen-jax: unknown stage {name!r}\n\n{_usage()}", file=sys.stderr)
    sys.exit(2)
  stage = STAGES[name]
  stage_argv, added = _open_key_overrides([f"busgen-jax {name}"] + argv[2:], stage.open_keys)
  if added:   # ml-collections' config flag also reads sys.argv for overrides
    sys.argv[:] = [a for a in sys.argv if a in stage_argv or a == sys.argv[0] or a == name]
  if name != "inspect":
    _define_config(stage.default_config, stage_argv)
  else:
    flags.DEFINE_string("workdir", None, "dataset directory (or give it as the argument)")
  stage.define_flags()
  logging.set_verbosity(logging.INFO)

  def stage_main(args):
    if added:
      with FLAGS.config.unlocked():
        for key, entries in added.items():
          FLAGS.config[key].update(entries)
    stage.main(args)

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
