"""`busgen-jax bench` end to end on a micro case (its own process, as every case runs): every figure present and
plausible, bench.md written, and a docs file's generated section replaced without touching the rest."""

import pytest

from busgen_jax.stages import bench


@pytest.mark.slow   # a performance tool: `pytest -m slow tests/test_bench.py`
def test_bench_micro_case_and_docs_section(tmp_path):
  docs = tmp_path / "BENCHMARKS.md"
  docs.write_text(f"# Benchmarks\n\nhand-written\n\n{bench.BEGIN}\nold figures\n{bench.END}\n\nmore hand-written\n")
  cfg = bench.default_config()
  with cfg.unlocked():
    cfg.cases = {"micro": bench.case("tiny", 16, 2, steps=1, sample_batch=2, sample_steps=2, official_steps=3,
                                      student_steps=2, pipeline_batches=2, compare_attention=True,
                                      adapt_rank=2)}
  cfg.pipeline_images, cfg.docs = 16, str(docs)
  report = bench.run(cfg, tmp_path / "work")
  r = report["cases"]["micro"]
  assert r["matmul_peak_gflop_per_s"] > 1 and r["train_images_per_s"] > 0 and r["gflop_per_image"] > 0.01
  assert 0 < r["train_fraction_of_matmul_peak"] < 1.5 and r["sample_images_per_s"] > 0
  assert r["sample_network_evals"] == 4 and r["train_compile_s"] > 0   # 2 steps on a doubled batch
  rows = r["samplers"]
  assert {k: v["network_evals"] for k, v in rows.items()} == {"official": 6, "solver": 4, "student": 2}
  assert all(v["images_per_s"] > 0 for v in rows.values())
  assert r["temp_gib_dense_attention"] > 0 and r["temp_gib_chunked_attention"] > 0
  assert r["adapt_branch_images_per_s"] > 0 and r["adapt_kernel_images_per_s"] > 0
  assert r["pipeline_images_per_s_2_workers"] > 0 and 0.1 < r["peak_host_memory_gib"] < 20
  text = docs.read_text()
  assert "hand-written" in text and "more hand-written" in text and "old figures" not in text
  assert "| micro (tiny, 16 px, batch 2, float32) |" in text and text.count(bench.BEGIN) == 1
  assert "| micro | 2 | " in text.split("fold=kernel")[1]
  assert "| micro (batch 2) | guidance student, DPM-Solver++ 2M, 2 steps | 2 |" in text
  assert (tmp_path / "work" / "bench.md").read_text() in text


def test_torch_reference_is_checked_before_any_case_runs(tmp_path):
  cfg = bench.default_config()
  cfg.torch_reference = str(tmp_path)                  # not a checkout of the official code
  with pytest.raises(FileNotFoundError, match=r"torch_reference=.*no BUSGen/Model\.py there"):
    bench.run(cfg, tmp_path / "work")
  cfg.only = "tiny_32px"
  with pytest.raises(ValueError, match="none of the cases"):
    bench.run(cfg, tmp_path / "work")
  assert not (tmp_path / "work" / "data").exists()     # nothing converted, no case started


@pytest.mark.slow   # needs a checkout of the official code: BUSGEN_OFFICIAL=/path/to/BUSGen pytest -m slow -k torch
def test_torch_reference_row_times_the_official_trainer_beside_ours(tmp_path):
  import os
  checkout = os.environ.get("BUSGEN_OFFICIAL")
  if not checkout:
    pytest.skip("BUSGEN_OFFICIAL (a checkout of the official BUSGen code) is not set")
  pytest.importorskip("torch")
  cfg = bench.default_config()
  cfg.only, cfg.torch_reference, cfg.reference_rounds = "official_64px", checkout, 2
  cfg.cases.official_64px.update(size=16, batch=1, steps=1, sample_steps=0, pipeline_batches=0,
                                 compare_attention=False)
  r = bench.run(cfg, tmp_path / "work")["cases"]["official_64px"]
  assert len(r["torch_rounds"]) == 2 and all(x["torch_step_s"] > 0 and x["step_s"] > 0 for x in r["torch_rounds"])
  assert r["train_over_torch"] == pytest.approx(r["torch_train_step_s"] / r["train_step_s"])
  assert r["torch_train_step_s"] == min(x["torch_step_s"] for x in r["torch_rounds"])
  assert r["train_step_s"] == min(x["step_s"] for x in r["torch_rounds"])   # as many draws of each
  assert "| official_64px | " in (tmp_path / "work" / "bench.md").read_text().split("official PyTorch trainer")[1]


def test_case_models_are_the_configs_they_name():
  """Each case's model is the architecture it names: the demo's, the experiment cpu preset's, the official one;
  the case sets size, batch, dtype and attention on top; an unknown model is refused with the choices."""
  from busgen_jax import config_files
  cpu = config_files.load(f"{config_files.CONFIGS / 'experiment.py'}:cpu").diffusion
  cfg = bench._config(bench.default_config().cases.experiment_cpu_64px.to_dict())
  assert cfg.model.to_dict() == {**cpu.model.to_dict(), "dtype": "float32", "attention": "auto"}
  assert (cfg.optim.to_dict(), cfg.data.image_size, cfg.data.batch_size) == (cpu.optim.to_dict(), 64, 16)
  official = bench._config(bench.case("official", 32, 2, dtype="bfloat16"))
  assert (official.model.ch, official.model.dropout, official.model.dtype) == (128, 0.1, "bfloat16")
  assert official.data.image_size == 32
  with pytest.raises(ValueError, match=r"one of \['experiment_cpu', 'official', 'tiny'\]"):
    bench._config(bench.case("huge", 32, 2))
