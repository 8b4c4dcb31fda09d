"""The bad-input corpus beyond the converters' own (tests/test_converters.py): damaged ArrayRecord shards,
damaged checkpoints, a disk that fills up during a checkpoint, config overrides of the wrong type or naming
unknown keys, bad model settings, impossible meshes. Each is a clear error naming the file or setting, and none
loses data silently."""

import asyncio
import errno
import gc
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from busgen_jax import checkpoint, parallel
from busgen_jax.data import convert, reader
from busgen_jax.models import unet
from busgen_jax.train import diffusion
from helpers import convert_config, tiny_diffusion_config

ROOT = Path(__file__).resolve().parents[1]


SAME = {"phantom.num_examples": 40, "phantom.size": 32, "examples_per_shard": 12}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  return convert.convert(convert_config("phantom", "", tmp_path_factory.mktemp("bad") / "data", **SAME))


def _read_all(ds_dir):
  ds = reader.open_dataset(ds_dir)
  records = ds.records("train")
  return [ds.decode(records[i])["sha256"] for i in range(len(records))]


def test_damaged_shards_name_the_file_and_reconverting_repairs_them(data, tmp_path):
  want = _read_all(data)
  shard = Path(reader.open_dataset(data).files("train")[1])
  for name, damage in (("flipped", lambda b: b[:100] + bytes(x ^ 0xFF for x in b[100:400]) + b[400:]),
                       ("truncated", lambda b: b[: len(b) // 2]),
                       ("emptied", lambda b: b"")):
    copy = tmp_path / name
    shutil.copytree(data, copy)
    bad = copy / shard.name
    bad.write_bytes(damage(shard.read_bytes()))
    with pytest.raises(IOError, match=bad.name):
      _read_all(copy)
  # Another dataset's shard of a different length in its place: the count check names it.
  copy = tmp_path / "swapped"
  shutil.copytree(data, copy)
  files = reader.open_dataset(copy).files("train")
  shutil.copy(files[-1], files[1])
  with pytest.raises(IOError, match=rf"{Path(files[1]).name}: holds \d+ records, dataset_info.json says"):
    reader.open_dataset(copy).records("train")
  # The error's advice works: delete the shard, run the same conversion, and only it is rewritten.
  redo = tmp_path / "redo"
  shutil.copytree(data.parents[1], redo)
  ds_dir = redo / data.relative_to(data.parents[1])
  (ds_dir / shard.name).unlink()
  stamps = {f: f.stat().st_mtime_ns for f in ds_dir.glob("*.array_record-*")}
  assert _read_all(convert.convert(convert_config("phantom", "", redo, **SAME))) == want
  assert all(f.stat().st_mtime_ns == t for f, t in stamps.items())


def _tiny(data, **kw):
  cfg = tiny_diffusion_config(data, 6)
  cfg.checkpoint_every = 2
  cfg.update_from_flattened_dict(kw)
  return cfg


def test_full_disk_during_a_checkpoint_then_a_damaged_checkpoint(data, tmp_path, monkeypatch):
  import tensorstore
  work = tmp_path / "run"
  full = {"on": False}
  real_open, real_save = tensorstore.open, checkpoint.Checkpointer.save

  def open_(*a, **k):
    if full["on"]:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real_open(*a, **k)

  def save(self, step, *a, **k):
    full["on"] = step == 6      # the disk fills up as step 6 is saved
    return real_save(self, step, *a, **k)

  monkeypatch.setattr(tensorstore, "open", open_)
  monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
  with pytest.raises(OSError, match=r"checkpoints failed \(No space left on device\); the last complete checkpoint "
                                    r"is step (\d)") as e:
    diffusion.train(_tiny(data), work)
  assert e.value.errno == errno.ENOSPC
  # The failed save's other, unawaited futures would each print their spec at exit, burying the error above:
  # asyncio's own record of one is dropped, its other records are not.
  seen = []
  handler = logging.Handler()
  handler.emit = lambda record: seen.append(record.getMessage())
  asyncio_log = logging.getLogger("asyncio")
  asyncio_log.addHandler(handler)
  try:
    loop = asyncio.new_event_loop()
    left = loop.create_future()
    left.set_exception(ValueError("ABORTED: Error opening \"zarr\" driver"))
    del left
    gc.collect()
    loop.close()
    asyncio_log.error("Task was destroyed but it is pending!")
  finally:
    asyncio_log.removeHandler(handler)
  assert seen == ["Task was destroyed but it is pending!"], seen
  monkeypatch.undo()
  # Step 4's asynchronous write may still be running when the disk fills: then 2 is the last complete one.
  last = int(str(e.value).rsplit(" ", 1)[-1])
  directory = work / "checkpoints"
  assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == list(range(2, last + 1, 2))
  assert checkpoint.load_params(directory)                                               # the last one reads
  diffusion.train(_tiny(data), work)                                                     # space freed: resumes
  assert checkpoint.Checkpointer(directory).latest_step() == 6
  assert not [p for p in directory.iterdir() if "tmp" in p.name]                          # leftovers removed

  # Damage step 6: readers name it, and training refuses to resume rather than silently starting over.
  for f in (directory / "6" / "state").rglob("*"):     # every data file cut short, as an interrupted copy leaves them
    if f.is_file() and f.parent.name == "d":
      f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
  with pytest.raises(RuntimeError, match=r"checkpoints/6"):
    diffusion.train(_tiny(data, num_steps=8), work)
  with pytest.raises(RuntimeError, match=r"checkpoints/6"):
    checkpoint.load_params(directory)
  assert checkpoint.load_params(directory, step=4)                                       # the older one still reads


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1")
  return subprocess.run([sys.executable, "-m", "busgen_jax.cli", *args], env=env, capture_output=True, text=True,
                        timeout=300)


def test_config_overrides_with_unknown_keys_or_wrong_types_are_usage_errors(tmp_path):
  for override, message in (("--config.num_stepz=3", 'Did you mean "num_steps"'),
                            ("--config.num_steps=abc", "invalid literal for int")):
    r = _cli("train", "--config", str(ROOT / "configs" / "phantom_tiny.py"), override, "--workdir", str(tmp_path))
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert not (tmp_path / "checkpoints").exists()


def test_bad_model_settings_and_impossible_meshes():
  base = unet.default_config()
  for key, value, message in (("ch_mult", ("abc",), "ch_mult entries must be a positive integer"),
                              ("ch_mult", (), "ch_mult must be a tuple of positive integers"),
                              ("ch", 0, "model.ch must be a positive integer"),
                              ("num_groups", 48, "num_groups=48 does not divide the 128 channels"),
                              ("attn_levels", (7,), "attn_levels"),
                              ("dropout", 1.5, "dropout"),
                              ("conditions", ("pathology", "age"), "unknown \\['age'\\]")):
    cfg = base.copy_and_resolve_references()
    with cfg.unlocked():
      cfg[key] = value
    with pytest.raises(ValueError, match=message):
      unet.check_config(cfg)
  unet.check_config(base)
  for mesh, message in (({"data": 3}, "does not divide the 8 devices"), ({"data": -1, "fsdp": -1}, "at most one"),
                        ({"data": 4, "fsdp": 4}, "does not divide the 8 devices"),
                        ({"data": 2}, "uses 2 devices, but there are 8")):
    with pytest.raises(ValueError, match=message):
      parallel.make_mesh(mesh)
  with pytest.raises(ValueError, match=r"mesh axes \['dta'\].*named by no sharding rule"):
    parallel.Rules().check(parallel.make_mesh({"dta": 8}))
  parallel.Rules().check(parallel.make_mesh({"data": 4, "fsdp": 2}))


def test_stages_that_write_datasets_refuse_a_bucket_at_start():
  """ArrayRecord writes local files: a gs:// run directory for the demo, an experiment or sampling (without a local
  --config.output) is refused before any work, naming the gcsfuse mount, never written to a local `gs:` folder."""
  from busgen_jax import generate
  from busgen_jax.stages import demo, experiment
  runs = {"demo": lambda: demo.run(demo.default_config("ci"), "gs://bucket/run"),
          "experiment": lambda: experiment.run(experiment.default_config("ci"), "gs://bucket/run"),
          "sample": lambda: generate.generate(generate.default_config(), "gs://bucket/run")}
  for name, fn in runs.items():
    with pytest.raises(ValueError, match="gcsfuse") as e:
      fn()
    assert "gs://bucket" in str(e.value), name
  assert not Path("gs:").exists()


def test_configs_take_data_by_argument_and_a_missing_one_is_a_clear_error(tmp_path):
  from busgen_jax import config_files, generate
  from busgen_jax.train import adapt, distill
  configs = ROOT / "configs"
  for name in ("phantom_tiny", "busbra_pretrain", "busgen_toy_busi"):
    with pytest.raises(ValueError, match=r"data.sources.real.path is empty"):
      diffusion.train(config_files.load(configs / f"{name}.py"), tmp_path / "train")
  for name in ("adapt_phantom", "adapt_busbra"):
    with pytest.raises(ValueError, match=r"--config.base .* are required"):
      adapt.adapt(config_files.load(configs / f"{name}.py"), tmp_path / "adapt")
  with pytest.raises(ValueError, match="--config.teacher is required"):
    distill.distill(config_files.load(configs / "distill.py"), tmp_path / "distill")
  with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
    generate.generate(config_files.load(configs / "sample_phantom.py"), tmp_path / "sample")
  for name in ("audit_phantom", "quality_phantom"):
    with pytest.raises(ValueError, match="needs the demo's workdir"):
      config_files.load(configs / f"{name}.py")
  with pytest.raises(ValueError, match="no dataset path given"):
    reader.open_dataset("")
