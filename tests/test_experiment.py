"""`busgen-jax experiment`: the protocol end to end at toy scale (a BUS-BRA subset with one scanner held out as an
external site when ../shared is there, the phantom otherwise), external test sets by path in every format, the
report's figures, resuming, and the pieces it is built from."""

import csv
import json
import logging
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from busgen_jax import checkpoint, cli, config_files, generate
from busgen_jax.models import card
from busgen_jax.stages import experiment, fewshot
from busgen_jax.data import box_prior, convert, reader
from helpers import convert_config, gray, lesion_mask, make_busi, save

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = "Toshiba"       # the scanner kept out of the internal data: the "other hospital"


def _config(preset: str) -> ml_collections.ConfigDict:
  """A preset of configs/experiment.py, loaded as `--config configs/experiment.py:PRESET` loads it."""
  return config_files.load(f"{ROOT / 'configs' / 'experiment.py'}:{preset}")


def _busbra_manifests(busbra: Path, out: Path) -> tuple[Path, Path]:
  """A CSV manifest of a small BUS-BRA subset without one scanner (split by BUS-BRA's own folds: 1 test, 2 val),
  and a folder with a manifest of that scanner's images (files beside it, as a user's export would be)."""
  fold = {r["ID"]: int(r["kFold"]) for r in csv.DictReader(open(busbra / "5-fold-cv.csv"))}
  internal, external, per = [], [], {}
  for r in csv.DictReader(open(busbra / "bus_data.csv")):
    key = (r["Device"], r["Pathology"], fold[r["ID"]])
    per[key] = per.get(key, 0) + 1
    if per[key] > (6 if fold[r["ID"]] > 2 else 4):
      continue
    row = {"file": f"Images/{r['ID']}.png", "mask": f"Masks/mask_{r['ID'].removeprefix('bus_')}.png",
           "pathology": r["Pathology"], "device": r["Device"], "case_id": r["Case"],
           "split": {1: "test", 2: "val"}.get(fold[r["ID"]], "train")}
    (external if r["Device"].startswith(HELD_OUT) else internal).append(row)
  site = out / "site"
  for row in external:
    for k in ("file", "mask"):
      (site / row[k]).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy(busbra / row[k], site / row[k])
  paths = []
  for rows, path in ((internal, out / "internal.csv"), (external, site / "manifest.csv")):
    with open(path, "w", newline="") as f:
      w = csv.DictWriter(f, fieldnames=list(rows[0]))
      w.writeheader()
      w.writerows(rows)
    paths.append(path)
  return paths[0], paths[1]


def _busi_site(root: Path) -> Path:
  """A BUSI-style folder whose malignant image carries coloured annotation marks (kept as luma)."""
  make_busi(root)
  rgb = np.stack([gray(seed=11)] * 3, -1)
  rgb[18:22, 10:40] = (255, 255, 0)
  save(root / "Dataset_BUSI_with_GT/malignant/malignant (3).png", rgb)
  save(root / "Dataset_BUSI_with_GT/malignant/malignant (3)_mask.png", lesion_mask(boxes=((20, 10, 40, 35),)))
  return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """One tiny experiment through the CLI with three external sets: a manifest folder, a BUSI-style folder and
  a converted dataset. Internal data: a BUS-BRA subset without one scanner, or the phantom."""
  tmp = tmp_path_factory.mktemp("experiment")
  busbra = ROOT.parent / "shared" / "data" / "busbra"
  args = []
  if (busbra / "bus_data.csv").is_file():
    internal, site = _busbra_manifests(busbra, tmp)
    args += ["--config.data.convert.format=manifest", f"--config.data.input={internal}",
             f"--config.data.convert.manifest.root={busbra}", "--config.data.convert.split.scheme=given"]
  else:
    site_cfg = convert_config("phantom", "", tmp / "site", **{"phantom.num_examples": 40, "phantom.size": 32,
                                                                "phantom.seed": 7, "image.size": 32})
    site = convert.convert(site_cfg)
  converted = convert.convert(convert_config("phantom", "", tmp / "converted", **{
      "phantom.num_examples": 40, "phantom.size": 32, "phantom.seed": 3, "image.size": 32}))
  work = tmp / "work"
  externals = [f"--config.external.site={site}", f"--config.external.busi={_busi_site(tmp / 'busi')}",
               f"--config.external.phantom_b={converted}"]
  cmd = [sys.executable, "-m", "busgen_jax.cli", "experiment", "--config", "configs/experiment.py:ci",
         "--workdir", str(work), *args, *externals]
  r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
  return {"work": work, "cmd": cmd, "stdout": r.stdout, "stderr": r.stderr, "real_data": bool(args)}


def test_report_has_every_test_set_and_arm(run):
  work = run["work"]
  rep = json.loads((work / "report.json").read_text())
  assert set(rep["tests"]) == {"internal", "site", "busi", "phantom_b"}
  arms = {"real", "generated", "mixed", "generated x0.5"}
  for name, t in rep["tests"].items():
    assert set(t["arms"]) == arms, name
    n = {a["n"] for a in t["arms"].values()}
    assert len(n) == 1, (name, n)          # every arm on the same images
    for arm, a in t["arms"].items():
      lo, hi = a["auc_ci95"]
      assert lo <= a["auc"] <= hi, (name, arm)
      if arm != "real":
        d = a["delong_vs_real"]
        assert abs(d["difference"] - (a["auc"] - t["arms"]["real"]["auc"])) < 1e-9 and 0 <= d["p_value"] <= 1
    real_auc = t["arms"]["real"]["auc"]     # tiny test sets (4 BUSI images) can give a real-only AUC of 0
    if real_auc:
      assert t["tstr_over_trtr"] == pytest.approx(t["arms"]["generated"]["auc"] / real_auc)
    else:
      assert np.isnan(t["tstr_over_trtr"])
    assert t["mixed_minus_real"] == pytest.approx(t["arms"]["mixed"]["auc"] - t["arms"]["real"]["auc"])
    assert [s["multiple"] for s in t["scaling"]] == [0.5, 1.0]
    assert t["scaling"][0]["n_generated"] < t["scaling"][1]["n_generated"]
  # The external sets are what their paths hold: the BUSI folder (5 kept, the colour-marked one among them; 2
  # benign/malignant images after the task's filter drops normal) and the held-out scanner, all of it tested.
  ext = rep["external"]
  assert ext["busi"]["format"] == "busi" and ext["phantom_b"]["format"] == "dataset"
  busi_report = reader.open_dataset(ext["busi"]["dataset"]).report
  assert busi_report["converted"] == 5 and any(w.get("code") == "colour_to_luma" for w in busi_report["warnings"])
  if run["real_data"]:
    assert ext["site"]["format"] == "manifest"
    site = reader.open_dataset(ext["site"]["dataset"])
    assert set(site.splits) == {"test"} and all(HELD_OUT in d for d in site.vocab("device")[1:])
    internal = reader.open_dataset(rep["data"]["dataset"])
    assert not any(HELD_OUT in d for d in internal.vocab("device"))
  # The repository is 1x the real training images (the largest multiple of the ci preset).
  gen = reader.open_dataset(rep["generated"]["dataset"])
  assert rep["generated"]["images"] == gen.splits["train"]
  assert rep["generated"]["images"] == round(1.0 * rep["generated"]["real_images"])


def test_report_pages_and_figures(run):
  work = run["work"]
  md = (work / "report.md").read_text()
  for needle in ("## Classifiers per test set", "**busi**", "TSTR/TRTR", "DeLong", "![scaling](scaling.png)",
                 "## Quality and privacy", "**Privacy audit:", "**Quality.**", "Stage times"):
    assert needle in md, needle
  html = (work / "report.html").read_text()
  assert html.count("<img") >= 4 + len(list((work / "sheets").glob("*.png")))
  assert (work / "scaling.png").stat().st_size > 5000
  assert list((work / "sheets").glob("*_generated.png")) and list((work / "sheets").glob("*_real.png"))
  assert "internal:" in run["stdout"] and "TSTR/TRTR" in run["stdout"]


def test_console_shows_stages_and_bars_and_the_log_file_the_rest(run):
  out, err = run["stdout"].splitlines(), run["stderr"].splitlines()
  assert len(out) + len(err) < 120, "\n".join(out + err)
  assert not [l for l in err if l[:1] == "I" and l[1:5].isdigit()], err      # no INFO records (warnings stay)
  assert not [l for l in err if "Type handler registry" in l or "oneDNN" in l], err
  assert any(l.startswith("diffusion: ") and "steps" in l for l in err), err   # a progress bar, line by line
  for bar in ("convert ", "audit: pixel search, generated: ", "features of "):    # convert, audit, quality
    assert any(l.startswith(bar) for l in err), (bar, err)
  assert "experiment: pretrain done in" in run["stdout"]
  log = (run["work"] / "logs" / "experiment.log").read_text()
  assert "CheckpointManager" in log and len(log.splitlines()) > 100            # the libraries' INFO records


def test_rerun_reuses_every_stage_and_refuses_another_config(run):
  work = run["work"]
  before = {p.name: p.stat().st_mtime for p in (work / "stages").glob("*.json")}
  r = subprocess.run(run["cmd"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "experiment: pretrain ..." not in r.stdout and "experiment done" in r.stdout
  assert {p.name: p.stat().st_mtime for p in (work / "stages").glob("*.json")} == before
  r = subprocess.run(run["cmd"] + ["--config.diffusion.num_steps=5"], capture_output=True, text=True, cwd=ROOT)
  assert r.returncode != 0 and "another config" in r.stderr and "diffusion.num_steps" in r.stderr


def test_pretrained_reuses_the_model_and_varies_only_the_recipe(run, tmp_path, caplog):
  cfg = _config("ci")
  cfg.update(pretrained=str(run["work"]), skip=("quality", "audit"))
  cfg.generate.sampler.guidance_scale = 1.5
  cfg.generate.multiples = (1.0,)
  cfg.diffusion.optim.lr *= 2       # a pretraining setting the reused model was not trained with: said, not lost
  with caplog.at_level(logging.WARNING):
    summary = experiment.run(cfg, str(tmp_path / "variant"))
  assert any("its diffusion settings are used" in r.getMessage() and "diffusion.optim.lr" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  base = json.loads((run["work"] / "report.json").read_text())
  assert summary["data"] == base["data"] and summary["diffusion"]["final"] == base["diffusion"]["final"]
  assert not (tmp_path / "variant" / "diffusion").exists()         # no second model was trained
  assert set(summary["tests"]["internal"]["arms"]) == {"real", "generated", "mixed"}
  gen = reader.open_dataset(summary["generated"]["dataset"])
  assert json.loads(gen.source("train")[0]["gen_conditions"])["guidance_scale"] == 1.5
  assert "reused from the experiment" in (tmp_path / "variant" / "report.md").read_text()
  # The real-only classifier was the same recipe: copied, not retrained, and it scores as it did.
  real = summary["tests"]["internal"]["arms"]["real"]
  assert real["auc"] == base["tests"]["internal"]["arms"]["real"]["auc"]
  assert summary["generated"]["dataset"] != base["generated"]["dataset"]
  # A classifier recipe for generated data alone: the repository is reused, the real arm untouched; the mixed arm
  # as the generated classifier fine-tuned on the real images.
  cfg2 = _with(cfg, generated_overrides=("num_steps=3", "data.ultrasound_augment=('gain',)"), mixed="finetune",
               finetune_overrides=("num_steps=2",))
  cfg2.generate = _config("ci").generate
  s2 = experiment.run(cfg2, str(tmp_path / "variant2"))
  assert s2["generated"]["dataset"] == base["generated"]["dataset"]
  assert s2["tests"]["internal"]["arms"]["real"]["auc"] == real["auc"]
  _, meta = checkpoint.load_meta(tmp_path / "variant2" / "classify" / "generated" / "best")
  k = json.loads(meta["config"])
  assert k["num_steps"] == 3 and k["data"]["ultrasound_augment"] == ["gain"]
  _, meta = checkpoint.load_meta(tmp_path / "variant2" / "classify" / "real" / "best")
  assert json.loads(meta["config"])["num_steps"] == cfg.classifier.num_steps
  _, meta = checkpoint.load_meta(tmp_path / "variant2" / "classify" / "mixed" / "best")
  k = json.loads(meta["config"])
  assert k["init"] == str(tmp_path / "variant2" / "classify" / "generated" / "best") and k["num_steps"] == 2
  assert list(k["data"]["sources"]) == ["real"]
  assert "generated-only classifier fine-tuned on the real" in (tmp_path / "variant2" / "report.md").read_text()
  with pytest.raises(ValueError, match="mixed must be one of"):
    experiment.arms(_with(cfg, mixed="blend"), 10, 20)
  with pytest.raises(ValueError, match="not a finished experiment"):
    experiment.adopt_pretrained(_with(cfg, pretrained=str(tmp_path)), tmp_path / "other")
  # A run reusing this variant (itself a reuse) finds the model where it was trained.
  assert experiment._model_dir(_with(cfg, pretrained=str(tmp_path / "variant")), tmp_path / "w") == \
      run["work"] / "diffusion"


def _with(cfg, **kw):
  cfg = cfg.copy_and_resolve_references()
  cfg.update(kw)
  return cfg


def test_missing_paths_are_errors_naming_them(tmp_path):
  cfg = experiment.default_config()
  cfg.data.input = str(tmp_path / "nope")
  with pytest.raises(FileNotFoundError, match="data.input.*nope"):
    experiment.run(cfg, str(tmp_path / "w1"))
  cfg = experiment.default_config()
  cfg.data.convert.format = "phantom"
  cfg.data.convert.phantom.num_examples = 20
  cfg.data.convert.split.scheme = "random"
  cfg.external.far = str(tmp_path / "far_away")
  cfg.skip = ("quality", "audit")
  with pytest.raises(FileNotFoundError, match="external.far"):
    experiment.run(cfg, str(tmp_path / "w2"))
  (tmp_path / "junk").mkdir()
  with pytest.raises(ValueError, match="neither a converted dataset"):
    experiment.detect_format(tmp_path / "junk")


def test_generation_conditions_keep_the_training_proportions():
  counts = {"benign": {"A": 60, "B": 30, "unknown": 5}, "malignant": {"A": 10, "B": 20}, "normal": {"A": 9}}
  conds = generate.proportional_conditions(counts, ("benign", "malignant"), 240, "train")
  got = {(c["pathology"], c["device"]): c["num"] for c in conds}
  assert got == {("benign", "A"): 120, ("benign", "B"): 60, ("malignant", "A"): 20, ("malignant", "B"): 40}
  odd = generate.proportional_conditions(counts, ("benign", "malignant"), 7, "train")
  assert sum(c["num"] for c in odd) == 7
  grid = generate.proportional_conditions(counts, ("benign", "malignant"), 8, "grid")
  assert [c["num"] for c in grid] == [2, 2, 2, 2]
  with pytest.raises(ValueError, match="proportions"):
    generate.proportional_conditions(counts, ("benign",), 8, "uniform")


def test_scaling_arms_are_nested_subsets_of_one_repository():
  cfg = experiment.default_config()
  cfg.generate.multiples = (0.25, 1.0, 4.0)
  arms = experiment.arms(cfg, n_real=100, n_generated=400)
  assert arms["generated"]["generated"] == (1.0, 0) and arms["real"]["generated"] is None
  assert arms["generated x0.25"]["generated"] == (1.0, 25) and arms["generated x1"]["generated"] == (1.0, 100)
  assert arms["mixed"]["real"] + arms["mixed"]["generated"][0] == pytest.approx(1.0)
  # The classifiers' own seed (a recipe study's repeats on one repository); unset, the run's; a saved config.json
  # from before the setting reads as the run's seed.
  assert experiment.classifier_seed(cfg) == cfg.seed
  assert experiment.classifier_seed(_with(cfg, classifier_seed=3)) == 3
  assert experiment.classifier_seed({"seed": 2}) == 2


def test_interrupted_stage_is_not_recorded(tmp_path):
  rec = experiment.Record(tmp_path)

  def preempted():
    raise experiment.Interrupted("stopped at step 3 of 10")
  with pytest.raises(experiment.Interrupted):
    rec.run("pretrain", preempted)
  assert not (tmp_path / "stages" / "pretrain.json").exists()
  assert rec.run("pretrain", lambda: {"loss": 1.0}) == {"loss": 1.0}
  assert rec.run("pretrain", lambda: {"loss": 2.0}) == {"loss": 1.0}     # done: not run again


def test_stale_record_is_rerun_with_the_stages_built_on_it(tmp_path):
  rec = experiment.Record(tmp_path)
  rec.run("external", lambda: {"a": 1})
  rec.run("classify", lambda: {"auc": 0.7})
  rec.run("other", lambda: {"x": 1})
  has = lambda names: lambda r: set(r) == set(names)
  assert rec.run("external", lambda: {"a": 9}, valid=has({"a"}), stale=("classify",)) == {"a": 1}   # valid: kept
  assert (tmp_path / "stages" / "classify.json").exists()
  assert rec.run("external", lambda: {"a": 1, "b": 2}, valid=has({"a", "b"}), stale=("classify",)) == {"a": 1, "b": 2}
  assert not (tmp_path / "stages" / "classify.json").exists() and (tmp_path / "stages" / "other.json").exists()
  assert rec.run("classify", lambda: {"auc": 0.8}) == {"auc": 0.8}     # reruns on the new external sets
  assert rec.run("external", lambda: {}, valid=has({"a", "b"})) == {"a": 1, "b": 2}   # the new record is kept


def test_open_config_keys_take_any_name():
  argv, added = cli._open_key_overrides(
      ["busgen-jax experiment", "--config.external.siteA=/a", "--config.seed=1", "--config.external.b=gs://x/y"],
      ("external",))
  assert argv == ["busgen-jax experiment", "--config.seed=1"]
  assert added == {"external": {"siteA": "/a", "b": "gs://x/y"}}
  with pytest.raises(SystemExit):
    cli._open_key_overrides(["x", "--config.external.noval"], ("external",))


# ------------------------------------------------------------------------------------------------ few-shot arm

@pytest.fixture(scope="module")
def fewshot_run(tmp_path_factory):
  """The `fewshot_ci` preset: phantom data, one of its two devices held out of pretraining and adapted to from
  k = 4 shots per class in two draws; one external set (a converted dataset)."""
  tmp = tmp_path_factory.mktemp("fewshot")
  converted = convert.convert(convert_config("phantom", "", tmp / "converted", **{
      "phantom.num_examples": 24, "phantom.size": 32, "phantom.seed": 3, "image.size": 32}))
  cfg = _config("fewshot_ci")
  cfg.external = {"phantom_b": str(converted)}
  cfg.external_split = "train"
  work = tmp / "work"
  summary = experiment.run(cfg, str(work))
  return {"work": work, "cfg": cfg, "summary": summary}


def test_fewshot_report_has_every_k_arm_and_test_set(fewshot_run):
  work, cfg = fewshot_run["work"], fewshot_run["cfg"]
  s = json.loads((work / "report.json").read_text())
  assert s["fewshot"] == json.loads(json.dumps(fewshot_run["summary"]["fewshot"], default=float))
  f = s["fewshot"]
  assert "tests" not in s and not (work / "generated").exists()        # skip=("generate",): no repository arm
  assert set(f["tests"]) == {fewshot.SITE, "phantom_b"}
  for per_k in f["tests"].values():
    entry = per_k["4"]
    assert set(entry["arms"]) == set(fewshot.ARMS)
    for cell in entry["arms"].values():
      assert cell["n_draws"] == 2 and len(cell["draws"]) == 2
      aucs = [d["auc"] for d in cell["draws"]]
      assert cell["auc_mean"] == pytest.approx(np.mean(aucs)) and (cell["auc_min"], cell["auc_max"]) == (
          min(aucs), max(aucs))
      assert all(d["auc_ci95"][0] <= d["auc"] <= d["auc_ci95"][1] for d in cell["draws"])
      assert cell["val_auc_mean"] == pytest.approx(np.mean([d["val_auc"] for d in cell["draws"]]))
    d = entry["differences"][f"{fewshot.SHOTS_ADAPTED} − {fewshot.SHOTS}"]
    assert d["mean"] == pytest.approx(entry["arms"][fewshot.SHOTS_ADAPTED]["auc_mean"] -
                                      entry["arms"][fewshot.SHOTS]["auc_mean"])
  md = (work / "report.md").read_text()
  assert "**validation** (" in md
  assert "Few-shot adaptation to a new site" in md and (work / f"fewshot_{fewshot.SITE}.png").stat().st_size > 0
  assert f["held_out"] and f["site"]["device"] == cfg.fewshot.device


def test_fewshot_site_is_held_out_and_draws_never_leak_a_case(fewshot_run):
  work, cfg = fewshot_run["work"], fewshot_run["cfg"]
  stages = work / "stages"
  assert json.loads((stages / "pretrain.json").read_text())["result"]["held_out_devices"] == [cfg.fewshot.device]
  _, meta = checkpoint.load_meta(work / "diffusion" / "checkpoints")   # pretraining read every device but the site's
  model_card = card.Card.from_meta(meta)
  allowed = model_card.train_config["data"]["sources"]["real"]["filters"]["device"]
  assert cfg.fewshot.device not in allowed and allowed
  assert model_card.untrained == {"device": [cfg.fewshot.device]}    # and its card says so
  site = json.loads((stages / "fewshot_site.json").read_text())["result"]
  ds = reader.open_dataset(site["dataset"])
  from busgen_jax.data import pipeline
  labels = pipeline.scan_labels(ds, fewshot.SITE)
  assert {ds.vocab("device")[i] for i in labels["device"]} == {cfg.fewshot.device}
  assert len(labels["device"]) == site["n"]
  cases = ds.case_ids(fewshot.SITE)
  val_cases = set(cases[site["val"]])
  assert set(site["draws"]) == {"k4_d0", "k4_d1"}
  assert site["draws"]["k4_d0"]["shots"] != site["draws"]["k4_d1"]["shots"]
  for draw in site["draws"].values():
    shots, test = np.array(draw["shots"]), np.array(draw["test"])
    assert np.bincount(labels["pathology"][shots]).max() == 4 and len(shots) == 8
    assert not (set(cases[shots]) | val_cases) & set(cases[test])
    assert not set(cases[shots]) & val_cases
    assert len(set(draw["test"]) | set(draw["shots"]) | set(site["val"])) <= site["n"]
  # the site's device, named by the base's vocabulary but held out of its training, got a new trained row
  for key in site["draws"]:
    a = json.loads((work / "fewshot" / key / "adapt" / "adapt.json").read_text())
    assert a["new_rows"] == {"pathology": 0, "device": 1}
  # every classifier was tested on exactly its draw's test images
  for key, draw in site["draws"].items():
    for arm_dir in (work / "fewshot" / key / "classify").iterdir():
      with np.load(arm_dir / "eval" / f"{fewshot.SITE}.predictions.npz") as z:
        assert len(z["labels"]) == len(draw["test"])


def test_fewshot_guards(fewshot_run, tmp_path):
  cfg = fewshot_run["cfg"]
  data = json.loads((fewshot_run["work"] / "stages" / "data.json").read_text())["result"]
  with pytest.raises(ValueError, match="nothing to pretrain on"):
    fewshot.held_out_devices(_with(cfg, fewshot={**cfg.fewshot.to_dict(), "device": "all"}), data["dataset"])
  with pytest.raises(ValueError, match="not a device of"):
    fewshot.stage_site(_with(cfg, fewshot={**cfg.fewshot.to_dict(), "device": "Nope-1"}), tmp_path, data)
  with pytest.raises(ValueError, match="--config.fewshot.dataset: .*no dataset here"):
    fewshot.stage_site(_with(cfg, fewshot={**cfg.fewshot.to_dict(), "dataset": str(tmp_path)}), tmp_path, data)
  with pytest.raises(ValueError, match="too small for any k"):
    fewshot.stage_site(_with(cfg, fewshot={**cfg.fewshot.to_dict(), "k": (500,)}), tmp_path, data)
  # the experiment's box prior (fewshot.box_prior=pretraining) leaves the site's device out; a record from before
  # that rule is refitted on the next run
  stage = fewshot_run["work"] / "stages" / "box_prior.json"
  rec = json.loads(stage.read_text())
  assert rec["result"]["held_out_devices"] == [cfg.fewshot.device]
  prior = box_prior.BoxPrior.load(rec["result"]["path"])
  assert prior.source["excluded_devices"] == [cfg.fewshot.device]
  assert not any(k.endswith("|" + cfg.fewshot.device) for k in prior.groups)
  again = tmp_path / "again"
  shutil.copytree(fewshot_run["work"], again)
  (again / "stages" / "box_prior.json").write_text(json.dumps({**rec, "result": {"path": rec["result"]["path"]}}))
  experiment.run(cfg, str(again))
  redone = json.loads((again / "stages" / "box_prior.json").read_text())["result"]
  assert redone == {"path": str(again / "box_prior.json"), "held_out_devices": [cfg.fewshot.device]}
  with pytest.raises(ValueError, match="fewshot.box_prior must be one of"):
    fewshot.stage_site(_with(cfg, fewshot={**cfg.fewshot.to_dict(), "box_prior": "site"}), tmp_path, data)
  # a model pretrained on the site's device cannot stand in for the held-out pretraining
  plain = _with(cfg, fewshot={**cfg.fewshot.to_dict(), "device": ""})
  experiment.run(plain, str(tmp_path / "plain"))
  with pytest.raises(ValueError, match="pretrained on the few-shot site's device"):
    experiment.run(_with(cfg, pretrained=str(tmp_path / "plain")), str(tmp_path / "reuse"))


def test_fewshot_finetune_arms_start_from_the_repositories_classifiers(fewshot_run, tmp_path):
  """fewshot.mixed=finetune on the same adaptations and repositories: each shots + generated arm is the classifier
  of its repository alone, fine-tuned on the shots only."""
  work, cfg = fewshot_run["work"], fewshot_run["cfg"]
  again = tmp_path / "finetune"
  shutil.copytree(work, again, ignore=shutil.ignore_patterns("classify", "config.json", "fewshot_k*.json"))
  ft = _with(cfg, fewshot={**cfg.fewshot.to_dict(), "mixed": "finetune", "finetune_overrides": ("num_steps=2",)})
  summary = experiment.run(ft, str(again))
  for key in json.loads((again / "stages" / "fewshot_site.json").read_text())["result"]["draws"]:
    for arm, start in fewshot.FINETUNES.items():
      _, meta = checkpoint.load_meta(fewshot.classifier_dir(again, key, arm) / "best")
      k = json.loads(meta["config"])
      assert k["init"] == str(fewshot.classifier_dir(again, key, start) / "best") and k["num_steps"] == 2
      assert list(k["data"]["sources"]) == ["shots"]
    _, meta = checkpoint.load_meta(fewshot.classifier_dir(again, key, fewshot.UNADAPTED) / "best")
    assert list(json.loads(meta["config"])["data"]["sources"]) == ["generated"] and not json.loads(meta["config"])["init"]
  site = summary["fewshot"]["tests"][fewshot.SITE]
  assert set(next(iter(site.values()))["arms"]) == {*fewshot.ARMS, fewshot.UNADAPTED}
  md = (again / "report.md").read_text()
  assert "fine-tuned on the shots" in md and "| un-adapted |" in md
  data = json.loads((work / "stages" / "data.json").read_text())["result"]
  with pytest.raises(ValueError, match="fewshot.mixed must be one of"):
    fewshot.stage_site(_with(cfg, fewshot={**cfg.fewshot.to_dict(), "mixed": "blend"}), tmp_path, data)


def test_adapt_study_variant_lands_where_the_experiment_reuses_it(fewshot_run, tmp_path, monkeypatch):
  """docs/experiments/adapt_study.py: a variant (prior preservation) adapts on the base run's own draws (same
  start, paired), its prior images are the pretraining corpus without the site's device, and the experiment run
  it prints takes that adaptation up instead of adapting again."""
  monkeypatch.syspath_prepend(str(ROOT / "docs" / "experiments"))   # its neighbour recipe_study, as when run
  study = config_files.module(ROOT / "docs" / "experiments" / "adapt_study.py")
  base, cfg = fewshot_run["work"], fewshot_run["cfg"]
  overrides = {"prior.weight": 0.5}                                   # another recipe than the base run's
  draws = study.run_variant(base, tmp_path, "prior", "prior 0.5", overrides, ["k4_d0"])
  done = json.loads((base / "stages" / "fewshot_k4_d0.json").read_text())["result"]["adapt"]
  assert draws["k4_d0"]["val_loss_start"] == pytest.approx(done["val_loss_start"])   # the same site and draw
  assert draws["k4_d0"]["val_loss_best"] != done["val_loss_best"]                     # another recipe
  out = study.variant_dir(tmp_path, "prior", "prior 0.5")
  adapted = fewshot.draw_dir(out, "k4_d0") / "adapt"
  prior = json.loads(checkpoint.load_meta(adapted / "adapters")[1]["config"])["prior"]
  data = json.loads((base / "stages" / "data.json").read_text())["result"]
  assert prior["path"] == data["dataset"] and prior["split"] == cfg.data.train_split
  assert cfg.fewshot.device not in prior["devices"] and len(prior["devices"]) >= 1
  history = (adapted / "val_history.json").read_text()
  own = study.base_draws(base, ["k4_d0"])
  seconds = json.loads((fewshot.draw_dir(base, "k4_d0") / "adapt" / "adapt.json").read_text())["seconds"]
  assert own["k4_d0"]["minutes"] == pytest.approx(seconds / 60)        # the adaptation's own time
  rows = [study.row("base", None, own), study.row("prior 0.5", overrides, draws)]
  md = study.markdown("prior", rows, base, tmp_path, str(base))
  assert ("--config.fewshot.adapt.prior.weight=0.5" in md) == (draws["k4_d0"]["val_loss_best"] < done["val_loss_best"])
  variant = _with(cfg, pretrained=str(base))
  variant.fewshot.adapt.prior.weight, variant.fewshot.draws = 0.5, 1
  s = experiment.run(variant, str(out))
  assert (adapted / "val_history.json").read_text() == history   # not re-adapted
  assert set(s["fewshot"]["tests"][fewshot.SITE]["4"]["arms"]) == set(fewshot.ARMS)


def test_fewshot_curve_summary_orders_k_numerically_and_reports_a_skipped_k(tmp_path):
  """The k-curve preset's report (several k, one skipped by the site's size), which the CI run's single k never
  builds: k in numeric order in every table and the plot, per-k means over that k's draws only, the skip said."""
  rng = np.random.default_rng(0)
  site = {"source": "site_ds", "device": "Scanner-B", "n": 139, "counts": {"benign": 71, "malignant": 68},
          "cases": 72, "val_counts": {"benign": 14, "malignant": 14},
          "skipped": {"64": "64 shots per class leave {'benign': 3, 'malignant': 1} test images"}}
  draws = {}
  for k in (8, 16, 32):
    for d in range(3):
      res = {arm: {test: {"n": 40, "n_positive": 20, "auc": float(rng.uniform(0.5, 0.9)),
                          "auc_ci95": [0.4, 0.95], "val_auc": float(rng.uniform(0.6, 0.9))}
                   for test in (fewshot.SITE, "external_a")} for arm in fewshot.ARMS}
      draws[f"k{k}_d{d}"] = {"k": k, "draw": d, "results": res}
  s = fewshot.summarise(site, dict(sorted(draws.items())))   # keyed k16, k32, k8: the order names sort in
  for test in (fewshot.SITE, "external_a"):
    assert list(s["tests"][test]) == ["8", "16", "32"]
    cell = s["tests"][test]["16"]["arms"][fewshot.SHOTS]
    want = [draws[f"k16_d{d}"]["results"][fewshot.SHOTS][test]["auc"] for d in range(3)]
    assert cell["n_draws"] == 3 and cell["auc_mean"] == pytest.approx(np.mean(want))
    assert cell["auc_std"] == pytest.approx(np.std(want, ddof=1))
  cfg = _config("fewshot_curve")
  md = fewshot.markdown(cfg, {**s, "held_out": True}, tmp_path)
  assert "k = 64 skipped: 64 shots per class leave" in md
  rows = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and line[2].isdigit()]
  assert rows == ["8", "16", "32"] * 3            # validation, the site, the external set
  for test in (fewshot.SITE, "external_a"):
    assert (tmp_path / f"fewshot_{test}.png").stat().st_size > 0 and f"![k-curve {test}]" in md


def test_validation_cases_are_whole_cases_near_the_fraction():
  label = np.array(["benign"] * 30 + ["malignant"] * 20)
  cases = np.array([f"c{i // 2}" for i in range(50)])          # two views per case
  val = fewshot.validation_cases(label, cases, ["benign", "malignant"], 0.2, seed=0)
  chosen = set(cases[val])
  assert np.array_equal(val, np.flatnonzero(np.isin(cases, list(chosen))))   # whole cases
  assert 6 <= (label[val] == "benign").sum() <= 8 and 4 <= (label[val] == "malignant").sum() <= 6
  assert np.array_equal(val, fewshot.validation_cases(label, cases, ["benign", "malignant"], 0.2, seed=0))
  with pytest.raises(ValueError, match="val_fraction"):
    fewshot.validation_cases(label, cases, ["benign"], 1.5, seed=0)


def test_adapt_study_layer_variants_target_part_of_the_model_and_print_a_flag_that_parses(monkeypatch, tmp_path):
  """The `layers` family's targets each wrap some of the `fewshot` preset's layers, not all; the selected variant's
  printed command carries its tuple as one shell word that the config flag reads back."""
  monkeypatch.syspath_prepend(str(ROOT / "docs" / "experiments"))
  study = config_files.module(ROOT / "docs" / "experiments" / "adapt_study.py")
  from busgen_jax.models import lora, unet
  cfg = _config("fewshot")
  every = lora.inject(unet.create(cfg.diffusion.model), cfg.fewshot.adapt.lora)
  for name, overrides in study.FAMILIES["layers"]:
    lcfg = ml_collections.ConfigDict(cfg.fewshot.adapt.lora.to_dict())
    lcfg.targets = overrides["lora.targets"]
    wrapped = lora.inject(unet.create(cfg.diffusion.model), lcfg)
    assert 0 < len(wrapped) < len(every), name
  draws = {"k32_d0": {"val_loss_start": 1.0, "val_loss_best": 0.9, "best_step": 200, "minutes": 4.0}}
  name, overrides = study.FAMILIES["layers"][0]
  recorded = study._json(overrides)                   # as adapt_study.json holds it: lists
  md = study.markdown("layers", [study.row("base", None, {"k32_d0": {**draws["k32_d0"], "val_loss_best": 0.95}}),
                                 study.row(name, recorded, draws)], tmp_path, tmp_path, "/m")
  flag = next(w for w in shlex.split(md.split("Its classifiers: `")[1].split("`")[0]) if "lora.targets" in w)
  from absl import flags
  from ml_collections import config_flags
  values = flags.FlagValues()
  monkeypatch.setattr(sys, "argv", ["prog", flag])   # ml-collections defines override flags from sys.argv
  config_flags.DEFINE_config_dict("config", cfg, flag_values=values)
  values(["prog", flag])
  assert values.config.fewshot.adapt.lora.targets == overrides["lora.targets"]


def test_recipe_study_refuses_an_ema_variant_that_trains_the_base_model(monkeypatch):
  """An EMA decay above the warm-up's cap at the run's last step is never reached: such a variant is the base's
  model (the 0.999 run was), and the study says so instead of training it; the family's 0.99 does differ."""
  monkeypatch.syspath_prepend(str(ROOT / "docs" / "experiments"))
  study = config_files.module(ROOT / "docs" / "experiments" / "recipe_study.py")
  base = _config("cpu")   # 1,400 steps, ema_decay 0.995
  def variant(decay):
    v = ml_collections.ConfigDict(base.to_dict())
    v.diffusion.optim.ema_decay = decay
    return v, {"diffusion.optim.ema_decay": decay, "generate.multiples": (1.0,)}
  assert study.same_ema_only(base, *variant(0.999))
  ema = next(ov for name, ov in study.FAMILIES["schedule"][2] if name.startswith("EMA"))   # the family's own
  assert not study.same_ema_only(base, *variant(ema["diffusion.optim.ema_decay"]))
