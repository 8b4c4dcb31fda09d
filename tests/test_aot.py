"""`busgen-jax aot`: the real sharded train and sample programs compiled for a TPU topology on this CPU machine.

Needs libtpu (the `tpu` extra, which the test command installs). One micro model, compiled once per program,
on two v5e:2x2 slices (8 chips, 2 hosts): data parallel across slices, fsdp inside them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libtpu")

from busgen_jax import parallel  # noqa: E402
from busgen_jax.stages import aot  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def micro_config(batch: int = 16, size: int = 16):
  from busgen_jax.train import diffusion
  c = diffusion.default_config()
  c.data.image_size, c.data.batch_size = size, batch
  # One resolution with attention (this module alone: 84 s -> 33 s for the fixture's three TPU compiles); remat
  # as the official config (sampling skips it).
  c.model.update(ch=16, ch_mult=(1,), num_res_blocks=1, num_groups=4, attn_levels=(0,), dtype="bfloat16",
                 num_pathology=3, num_devices=3, remat=True)
  c.mesh = {"data": -1, "fsdp": 2}
  return c


@pytest.fixture(scope="module")
def report(tmp_path_factory):
  work = tmp_path_factory.mktemp("aot")
  # One training batch: each TPU training compile takes ~50 s even for this model; the batch search is tested
  # without compiling (test_the_best_batch_is_the_largest_that_fits).
  return aot.run(micro_config(), work, topology_name="v5e:2x2", num_slices=2, batch_sizes=[16],
                 sample_per_device_batch=2, effort=-1, programs=("train", "sample", "student")), work


def test_multislice_mesh_keeps_fsdp_inside_a_slice():
  devices, chip = aot.topology("v5e:2x2", num_slices=2)
  assert chip.name == "v5e" and len(devices) == 8
  mesh = parallel.make_mesh({"data": -1, "fsdp": 2}, devices)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
  grid = mesh.devices
  for row in grid:       # an fsdp group (a row) never crosses the data-centre network
    assert len({d.slice_index for d in row}) == 1
  assert {d.slice_index for d in grid[:, 0]} == {0, 1}
  # With fsdp first, fsdp is the axis that crosses slices (the first the slice count divides).
  other = parallel.make_mesh({"fsdp": 2, "data": -1}, devices).devices
  assert {d.slice_index for d in other[0]} == {0} and {d.slice_index for d in other[1]} == {1}


def test_sampling_scope_follows_the_chip():
  from busgen_jax import generate
  # v5e's compiler refuses a program on part of a slice: a 4-host v5e slice samples as one program; a
  # one-host-per-slice v5e topology, and v5p, sample per host.
  assert generate.resolve_scope("auto", aot.topology("v5e:4x4")[0]) == "slice"
  assert generate.resolve_scope("auto", aot.topology("v5e:2x2", num_slices=2)[0]) == "host"
  assert generate.resolve_scope("auto", aot.topology("v5p:2x2x2")[0]) == "host"
  assert generate.resolve_scope("host", aot.topology("v5e:4x4")[0]) == "host"


def test_train_and_sample_compile_with_per_chip_figures(report):
  rep, work = report
  assert rep["chips"] == 8 and rep["hosts"] == 2 and rep["num_slices"] == 2
  train, sample, student = rep["programs"]
  assert rep["best_train_batch"] == 16
  assert train["program"] == "train" and train["fits"] and train["mesh"] == {"data": 4, "fsdp": 2}
  hbm = train["hbm_bytes"]
  assert 0 < hbm["total"] < aot.CHIPS["TPU v5 lite"].hbm_bytes and hbm["arguments"] > 0 and hbm["temporaries"] > 0
  # Donated state: the outputs alias the arguments (state in, state out).
  assert hbm["aliased"] > 0.5 * hbm["arguments"]
  # fsdp 2: parameters are gathered for the forward pass, gradients reduced over the data axes.
  assert train["collectives"]["all-gather"]["count"] > 0 and train["collectives"]["all-gather"]["bytes"] > 0
  assert train["collectives"]["all-reduce"]["count"] + train["collectives"]["reduce-scatter"]["count"] > 0
  fwd = rep["forward_flops_per_image"]
  assert train["model_flops"] == pytest.approx(3 * fwd * 16 / 8)
  assert train["compiled_flops"] >= 0.8 * train["model_flops"]
  assert train["step_time_s"] == max(train["time_bounds_s"].values()) > 0
  # MFU is the model's FLOPs over the roofline step time at the chip's peak: at the assumed utilisation (0.5)
  # when compute bounds the step, lower when memory or the interconnect do.
  peak = aot.CHIPS["TPU v5 lite"].bf16_flops
  assert train["mfu"] == pytest.approx(train["model_flops"] / (train["step_time_s"] * peak))
  compute_mfu = 0.5 * train["model_flops"] / max(train["compiled_flops"], train["model_flops"])
  assert train["mfu"] == pytest.approx(compute_mfu) if train["bound_by"] == "compute" else train["mfu"] < compute_mfu
  # Sampling runs per host, over that host's 4 chips, params replicated.
  assert sample["fits"] and sample["mesh"] == {"data": 4} and sample["call_batch"] == 8 and sample["scope"] == "host"
  # 50 solver steps, each on the doubled (guided) batch: 100 network evaluations per image.
  assert sample["solver_steps"] == 50 and sample["network_evals"] == 100
  assert sample["model_flops"] == pytest.approx(fwd * 2 * 100)
  # Its guidance-distilled student: the default 8-step plan, one evaluation per step (the scale is an input).
  assert student["program"] == "student" and student["fits"] and student["sampler"]["steps"] == 8
  assert student["solver_steps"] == 8 and student["network_evals"] == 8
  assert student["model_flops"] == pytest.approx(fwd * 2 * 8, rel=0.01)   # + the tiny guidance embedding
  saved = json.loads((work / "aot.json").read_text())
  assert saved["programs"][0]["hbm_bytes"] == train["hbm_bytes"]
  md = (work / "aot.md").read_text()
  assert "v5e:2x2 x 2 slices (8 v5e chips, 2 hosts)" in md and "| train | 16 / 2 (best) |" in md
  assert "| student | 8 per host / 2 |" in md


def _with_batch_32(rep):
  """The report as a two-batch search would have it: a second training entry (batch 32) that fits and is best."""
  rep = json.loads(json.dumps(rep))
  train = rep["programs"][0]
  bigger = {**train, "global_batch": 32, "per_chip_batch": 4.0,
            "hbm_bytes": {**train["hbm_bytes"], "total": 2 * train["hbm_bytes"]["total"]}}
  rep["programs"].insert(1, bigger)
  rep["best_train_batch"] = 32
  return rep


def test_the_best_batch_is_the_largest_that_fits(monkeypatch, tmp_path):
  """The batch search, without TPU compiles: batches up to 32 fit, 64 runs out of memory in the compiler and 48
  compiles but exceeds the chip's HBM. The best is 32, the report says why the others failed, and when no batch
  fits the stage fails after writing its report."""
  chip = aot.CHIPS["TPU v5 lite"]

  def program(cfg, devices, b):
    return b, {"data": 4, "fsdp": 2}

  def compile_(b, effort):
    if b == 64:
      raise aot.DoesNotFit("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm")
    return b

  def analyse(b, chip_, *, model_flops, utilisation):   # what aot.analyse reads from a compiled program
    total = (chip.hbm_bytes // 40) * b
    times = {"compute": 0.01 * b, "hbm": 0.001, "ici": 0.001}
    return {"hbm_bytes": {"arguments": 0, "outputs": 0, "aliased": 0, "temporaries": total, "code": 0,
                          "total": total}, "hbm_capacity": chip.hbm_bytes, "hbm_fraction": total / chip.hbm_bytes,
            "fits": total <= chip.hbm_bytes, "model_flops": model_flops, "compiled_flops": model_flops,
            "hbm_traffic_bytes": 0.0, "collectives": {}, "collective_bytes": 0, "time_bounds_s": times,
            "bound_by": "compute", "step_time_s": times["compute"], "mfu": utilisation}

  monkeypatch.setattr(aot, "train_program", program)
  monkeypatch.setattr(aot, "_compile", compile_)
  monkeypatch.setattr(aot, "analyse", analyse)
  rep = aot.run(micro_config(), tmp_path / "a", topology_name="v5e:2x2", batch_sizes=[16, 32, 64, 48],
                programs=("train",))
  assert rep["best_train_batch"] == 32
  assert [p["fits"] for p in rep["programs"]] == [True, True, False, False]
  assert "Ran out of memory" in rep["programs"][2]["error"]
  assert json.loads((tmp_path / "a" / "aot.json").read_text())["best_train_batch"] == 32
  with pytest.raises(aot.DoesNotFit, match=r"train \(batch 64\): RESOURCE_EXHAUSTED.*train \(batch 48\): 19\.\d GiB per chip > 16 GiB"):
    aot.run(micro_config(), tmp_path / "b", topology_name="v5e:2x2", batch_sizes=[64, 48], programs=("train",))
  assert json.loads((tmp_path / "b" / "aot.json").read_text())["best_train_batch"] is None


def test_docs_sections_per_topology_and_a_summary_rebuilt_from_them(report, tmp_path):
  rep = _with_batch_32(report[0])
  doc = tmp_path / "TPU.md"
  doc.write_text("# TPU\n\n<!-- aot:summary:begin -->\nstale\n<!-- aot:summary:end -->\n\nprose kept\n")
  aot.write_docs(doc, rep, "busgen-jax aot --topology v5e:2x2 --num_slices 2")
  other = json.loads(json.dumps(rep))         # a second topology: its own section and summary row
  other.update(topology="v5e:4x4", num_slices=1, chips=16, hosts=4)
  aot.write_docs(doc, other, "busgen-jax aot --topology v5e:4x4")
  aot.write_docs(doc, rep, "busgen-jax aot --topology v5e:2x2 --num_slices 2")   # rewritten, not repeated
  text = doc.read_text()
  assert "stale" not in text and "prose kept" in text
  assert text.count("<!-- aot:v5e:2x2x2:begin -->") == 1 and text.count("<!-- aot:v5e:4x4:begin -->") == 1
  # An appended section carries one heading, its own (the slice and its chips), not a second one above it.
  assert text.count("### 2x v5e-4 (") == 1 and "## 2x v5e-4\n" not in text and "## v5e-16\n" not in text
  summary = text[text.index("<!-- aot:summary:begin -->"):text.index("<!-- aot:summary:end -->")]
  rows = [l for l in summary.splitlines() if l.startswith("| 2x v5e-4") or l.startswith("| v5e-16")]
  assert len(rows) == 2, summary
  best = next(p for p in rep["programs"] if p["program"] == "train" and p["global_batch"] == 32)
  assert f"**32** (4) | {best['hbm_bytes']['total'] / aot.GiB:.1f} of 16 GiB" in rows[0]
  sample = next(p for p in rep["programs"] if p["program"] == "sample")
  assert f"| {sample['images_per_s']:.0f} (100) | " in rows[0] and " (8) | none larger tried |" in rows[0]
  assert "`busgen-jax aot --topology v5e:4x4` (libtpu " in text


def test_collective_parser_on_async_and_combined_ops():
  hlo = ("%a = (f32[8]{0}, f32[32]{0}) all-gather-start(f32[8]{0} %x), dimensions={0}\n"
         "%b = (bf16[4,4]{1,0:T(8,128)(2,1)}, /*index=1*/bf16[2]{0}) all-reduce(%y, %z), to_apply=%add\n"
         "%c = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%w)\n"
         "%d = f32[8]{0} all-gather-done(%a)\n")
  c = aot.collectives(hlo)
  assert c["all-gather"] == {"count": 1, "bytes": 128}
  assert c["all-reduce"] == {"count": 1, "bytes": 36}
  assert c["collective-permute"] == {"count": 1, "bytes": 32}


def test_cli_fails_clearly_when_the_batch_does_not_fit(tmp_path):
  # The sampler at 64 px, 4096 images per chip of a micro model: activations far beyond a v5e chip's 16 GiB (the
  # sampler: a TPU training compile takes ~50 s more; train's search is test_the_best_batch_is_the_largest_that_fits).
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  cfg = tmp_path / "big.py"
  cfg.write_text("import sys\nsys.path.insert(0, %r)\nfrom test_aot import micro_config\n"
                 "def get_config():\n  return micro_config(size=64)\n" % str(ROOT / "tests"))
  r = subprocess.run([sys.executable, "-m", "busgen_jax.cli", "aot", "--config", str(cfg), "--topology", "v5e:2x2",
                      "--programs", "sample", "--sample_batch", "4096", "--effort=-1", "--workdir", str(tmp_path / "w")],
                     env=env, capture_output=True, text=True, timeout=900)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "does not fit on v5e:2x2" in r.stderr
  rep = json.loads((tmp_path / "w" / "aot.json").read_text())
  assert rep["programs"][0]["fits"] is False
