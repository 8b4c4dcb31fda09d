"""Classifiers: architectures, a tiny classifier learns the phantom task (and `evaluate` reproduces its test
report), mixing real and generated sources in the classifier pipeline, and the end-to-end demo."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from busgen_jax.data import convert, pipeline, reader
from busgen_jax.evaluate import encoder, fidelity, metrics, quality
from busgen_jax.models import classifiers
from busgen_jax.stages import classify
from busgen_jax.train import classifier
from helpers import convert_config


@pytest.mark.parametrize("name,params", [("resnet18", 11_177_538), ("resnet50", 23_512_130), ("vit_s16", 21_666_434)])
def test_architectures_have_their_published_sizes(name, params):
  cfg = classifiers.default_config()
  cfg.name = name
  model = nnx.eval_shape(lambda: classifiers.create(cfg, 2, 224))
  n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert n == params


def test_tiny_architectures_run_on_any_size():
  for name, size in (("resnet_tiny", 40), ("vit_tiny", 32)):
    cfg = classifiers.default_config()
    cfg.name = name
    m = classifiers.create(cfg, 3, size)
    assert m(np.zeros((2, size, size, 3), np.float32)).shape == (2, 3)
  with pytest.raises(ValueError, match="unknown"):
    cfg.name = "alexnet"
    classifiers.create(cfg, 2, 32)


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
  out = tmp_path_factory.mktemp("cls_data")
  return convert.convert(convert_config("phantom", "", out, **{"phantom.num_examples": 500, "phantom.size": 48,
                                                                 "split.fractions": {"train": 0.7, "val": 0.1,
                                                                                     "test": 0.2}}))


def test_tiny_classifier_learns_the_phantom_task_and_evaluate_reproduces_it(phantom, tmp_path):
  c = classifier.default_config()
  c.data.sources.real.path = str(phantom)
  c.data.image_size, c.data.batch_size = 32, 32
  c.data.ultrasound_augment = ()
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 150, 50, 50, 50
  c.model.name = "resnet_tiny"
  c.optim.update(lr=3e-3, warmup_steps=15)
  c.n_bootstrap = 200
  c.test = {"real_test": {"path": "", "split": "test"}, "real_train": {"path": "", "split": "train"}}
  res = classify.run(c, tmp_path / "run")
  assert res["real_train"]["auc"] > 0.85, res["real_train"]["auc"]     # it fits
  assert res["real_test"]["auc"] > 0.6, res["real_test"]["auc"]       # and generalises beyond chance
  assert res["real_test"]["n"] == json.loads((phantom / "conversion_report.json").read_text())["counts"]["split"]["test"]
  for ext in ("json", "md", "html", "roc.png", "calibration.png", "predictions.npz"):
    assert (tmp_path / "run" / "eval" / f"real_test.{ext}").exists()
  # `busgen-jax evaluate`, a fresh process, on the saved best checkpoint: the test split gives the same report, and
  # the validation split (an external set by path) the validation AUC that selected this checkpoint in training
  # (the trainer's selection metric and the reports agree).
  r = subprocess.run([sys.executable, "-m", "busgen_jax.cli", "evaluate",
                      f"--config.checkpoint={tmp_path / 'run' / 'best'}", f"--config.dataset={phantom}",
                      "--config.split=test", f"--config.external.val={phantom}", "--config.external_split=val",
                      f"--workdir={tmp_path / 'again'}"], capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  again = json.loads((tmp_path / "again" / "eval.json").read_text())
  assert again["auc"] == pytest.approx(res["real_test"]["auc"], abs=1e-6)
  best = res["real_test"]["best"]
  assert json.loads((tmp_path / "again" / "val.json").read_text())["auc"] == pytest.approx(best["value"], abs=1e-6)
  assert "val: n=" in r.stdout and (tmp_path / "again" / "val.roc.png").is_file()

  # Its penultimate layer is the domain encoder of the quality metrics: in its feature space the two
  # pathologies sit further apart than two halves of one split do.
  enc = encoder.ClassifierEncoder(tmp_path / "run" / "best")
  out = enc(phantom, "train")
  assert out["features"].shape == (len(reader.open_dataset(phantom).records("train")), 64)
  assert out["encoder"] == enc.name and out["index"].tolist() == sorted(out["index"].tolist())
  assert "resnet_tiny" in enc.name and str(tmp_path / "run" / "best") in enc.name
  f, path = out["features"], np.array(out["pathology"])
  benign, malignant = f[path == "benign"], f[path == "malignant"]
  half = len(benign) // 2
  apart = quality.kid(benign, malignant, subsets=20, subset_size=half)
  within = quality.kid(benign[:half], benign[half:], subsets=20, subset_size=half)
  assert apart["ci"][0] > within["ci"][1], (apart, within)
  assert out["probs"].shape == (len(f), 2) and out["classes"] == ["benign", "malignant"]
  # Images in memory (a probe's samples) get the same features, in batches with a padded last one.
  b = next(iter(pipeline.build_eval(str(phantom), "train", image_size=enc.image_size, batch_size=8)))
  keep = np.flatnonzero(b["valid"])[:5]
  mine = enc.encode(b["image"][keep])
  rows = [out["index"].tolist().index(i) for i in b["index"][keep]]
  np.testing.assert_allclose(mine[0], f[rows], atol=1e-4)
  np.testing.assert_allclose(mine[1], out["probs"][rows], atol=1e-5)
  with pytest.raises(ValueError, match="expected n >= 1 images of shape"):
    enc.encode(b["image"][keep, :16])

  # `busgen-jax quality` with the phantom's train split standing in for a generated repository: the report
  # carries the encoder, per-condition metrics, the classifier's agreement with the labels (here its training
  # accuracy, so above the test ceiling's chance level) and box fidelity (phantom lesions sit in their boxes).
  q = fidelity.default_config()
  q.update(real=str(phantom), real_split="test", generated=str(phantom), generated_split="train",
           encoder=str(tmp_path / "run" / "best"), conditions=("pathology",), min_count=5, bootstrap=20,
           kid_subsets=10, classifiers=(str(tmp_path / "run" / "best"),))
  # TSTR from two classify runs: a stand-in "synthetic" run whose test evaluation scored 0.6 (its own file).
  synthetic = tmp_path / "synthetic_run" / "eval"
  synthetic.mkdir(parents=True)
  (synthetic / "real_test.json").write_text(json.dumps({**res["real_test"], "auc": 0.6, "auc_ci95": [0.5, 0.7]}))
  q.tstr.synthetic, q.tstr.real = str(synthetic.parent), str(tmp_path / "run")
  rep = fidelity.run(q, tmp_path / "quality")
  assert rep["encoder"] == enc.name and set(rep["fidelity"]["conditions"]) == {"benign", "malignant"}
  acc = rep["conditional_accuracy"]
  assert acc["generated"]["n"] == len(f) and acc["generated"]["accuracy"] > 0.75, acc
  assert rep["conditional_accuracy_more"][0]["generated"] == acc["generated"]   # a second classifier: same plumbing
  assert rep["box_fidelity"]["real"]["auc"] > 0.8 and rep["box_fidelity"]["generated"]["auc"] > 0.8, rep["box_fidelity"]
  ratio = 0.6 / res["real_test"]["auc"]
  assert rep["tstr"]["ratio"] == pytest.approx(ratio) and rep["tstr"]["n_test"] == res["real_test"]["n"]
  assert rep["tstr"]["tstr_auc"] == 0.6 and rep["tstr"]["trtr_auc"] == res["real_test"]["auc"]
  md = (tmp_path / "quality" / "quality.md").read_text()
  assert f"TSTR / TRTR = {ratio:.2f}" in md and enc.name in md and (tmp_path / "quality" / "quality.html").is_file()

  # Fine-tuning (`init`): training starts from the saved weights (an experiment's generated-then-real arm), a
  # short gentle run keeps what they learned; a classifier that does not fit them is refused by name.
  ft = classifier.with_overrides(c, ("num_steps=20", "eval_every=20", "optim.lr=1e-4", "optim.warmup_steps=1"),
                                 "test")
  ft.init = str(tmp_path / "run" / "best")
  vocab = {"pathology": reader.open_dataset(phantom).vocab("pathology")}
  setup = classifier.Setup(classifier._with_task_filters(ft), vocab)
  saved, _ = classifier.load_classifier(ft.init)
  start = setup.init_state(classifier.initial_weights(ft, setup))
  for a, b in zip(jax.tree.leaves(start["params"]), jax.tree.leaves(saved["params"])):
    np.testing.assert_array_equal(np.asarray(a), b)
  assert int(start["step"]) == 0
  tuned = classify.run(ft, tmp_path / "finetuned")
  assert tuned["real_test"]["auc"] > 0.6, tuned["real_test"]["auc"]
  wider = classifier.with_overrides(ft, ("model.name=vit_tiny",), "test")
  with pytest.raises(ValueError, match="init .*best: its model differ"):
    classifier.initial_weights(wider, classifier.Setup(classifier._with_task_filters(wider), vocab))
  ft.init = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="init: no saved classifier at .*nowhere"):
    classifier.check_paths(ft)


def test_mixing_real_and_generated_in_the_classifier_pipeline(phantom, tmp_path):
  """Two sources with weights 0.7 / 0.3: batches hold about those shares, and the task filter keeps only the
  task's classes."""
  c = classifier.default_config()
  c.data.sources = {"real": {"path": str(phantom), "split": "train", "weight": 0.7, "filters": {}},
                    "generated": {"path": str(phantom), "split": "val", "weight": 0.3, "filters": {}}}
  c.task.classes = ("malignant",) + ("benign",)
  cfg = classifier._with_task_filters(c)
  cfg.data.image_size, cfg.data.batch_size = 16, 50
  p = pipeline.build(cfg.data)
  it = iter(p)
  try:
    batches = [next(it) for _ in range(8)]
  finally:
    it.close()
  src = np.concatenate([b["source"] for b in batches])
  share = (src == p.source_names.index("generated")).mean()
  assert abs(share - 0.3) < 0.06
  names = {p.vocab["pathology"][i] for b in batches for i in b["pathology"]}
  assert names <= {"benign", "malignant"}


def test_demo_in_its_reduced_setting_writes_every_report_section(tmp_path):
  from busgen_jax.stages import demo
  cfg = demo.default_config("ci")
  readme, privacy_md = tmp_path / "README.md", tmp_path / "PRIVACY.md"
  privacy_md.write_text("# Privacy\n\n<!-- demo:quality:begin -->\nSTALE\n<!-- demo:quality:end -->\n")
  cfg.docs = f"{readme},{privacy_md}"
  work = demo.run(cfg, str(tmp_path / "work"))
  md = (work / "report.md").read_text()
  # --config.docs: the summary appended to a file without markers, quality and privacy where their markers are.
  rep = json.loads((work / "report.json").read_text())
  assert "<!-- demo:begin -->" in readme.read_text() and f"on generated only {rep['classifiers']['generated']['auc']:.3f}" in readme.read_text()
  text = privacy_md.read_text()
  assert "STALE" not in text and "<!-- demo:begin -->" not in text
  assert f"| pixel | {rep['audit']['spaces']['pixel']['n_flagged']} of {rep['audit']['n_generated']} |" in text
  assert f"AUC {rep['audit']['membership_inference']['auc']:.3g}" in text
  for section in ("## 1. Data", "## 2. Diffusion model", "## 3. Generated repository", "## 4. Classifiers",
                  "trained on real", "trained on generated", "trained on mixed", "generated − real",
                  "## What the numbers mean", "TSTR / TRTR", "## 5. Few-shot adaptation to a new site: Phantom-L7",
                  "trained on shots", "trained on shots + un-adapted", "trained on shots + adapted",
                  "trained on adapted", "shots + adapted − shots",
                  "## 6. Quality and privacy", "Privacy audit:", "membership-inference AUC"):
    assert section in md, section
  page = (work / "report.html").read_text()
  assert page.count("data:image/png;base64") == 6 and "<table>" in page
  a = json.loads((work / "report.json").read_text())["adaptation"]
  assert a["shots_per_class"] == 4 and a["images"] > 0 and a["device"] == ["Phantom-L7"]
  assert set(a["classifiers"]) == {"shots", "shots + un-adapted", "shots + adapted", "adapted"}
  assert a["summary"]["new_rows"] == {"pathology": 0, "device": 1}   # the new scanner got its own row
  site = reader.open_dataset(a["site"]["dataset"])
  pretrain = reader.open_dataset(work / "data" / "phantom" / "1.0.0")
  assert "Phantom-L7" not in pretrain.vocab("device") and site.vocab("device") == ["unknown", "Phantom-L7"]
  assert not set(site.case_ids("site")) & set(pretrain.case_ids("train"))   # the site's own patients
  for arm, r in a["classifiers"].items():          # every arm is tested on the same images of the site
    assert r["n"] == a["classifiers"]["shots"]["n"]
  rep = json.loads((work / "report.json").read_text())
  assert set(rep["classifiers"]) == {"real", "generated", "mixed"}
  for variant, r in rep["classifiers"].items():   # each AUC is the one its saved test predictions give
    with np.load(work / "classify" / variant / "eval" / "real_test.predictions.npz") as z:
      y = (z["labels"] == 1).astype(int)          # task classes (benign, malignant): malignant positive
      assert r["n"] == len(y) and r["auc"] == pytest.approx(metrics.roc_auc(y, z["probs"][:, 1]), abs=1e-9)
  assert rep["generated"]["images"] > 0
  assert rep["audit"]["n_generated"] == rep["generated"]["images"] and "safe_to_share" in rep["audit"]["verdict"]
  for name in ("quality/quality.html", "audit/audit.html", "audit/audit_images.csv"):
    assert (work / name).is_file(), name


def test_multiclass_task_reports_one_vs_rest_aucs(phantom, tmp_path):
  """A 3-class task (the phantom's devices) with a ViT: macro AUC, per-class CIs, a confusion matrix."""
  ds_devices = [d for d in json.loads((phantom / "conversion_report.json").read_text())["vocab"]["device"]
                if d != "unknown"]
  c = classifier.default_config()
  c.task.update(field="device", classes=tuple(ds_devices), positive="")
  c.data.sources.real.path = str(phantom)
  c.data.image_size, c.data.batch_size = 32, 16
  c.data.ultrasound_augment = ()
  c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 4, 2, 4, 4
  c.model.name = "vit_tiny"
  c.select_metric = "macro_auc"
  c.n_bootstrap = 20
  rep = classify.run(c, tmp_path)["real_test"]
  assert set(rep["per_class"]) == set(ds_devices)
  with np.load(tmp_path / "eval" / "real_test.predictions.npz") as z:    # one-vs-rest, macro over the classes
    from sklearn.metrics import roc_auc_score
    assert rep["macro_auc"] == pytest.approx(roc_auc_score(z["labels"], z["probs"], multi_class="ovr"), abs=1e-9)
  assert np.array(rep["confusion"]).shape == (len(ds_devices),) * 2
  from helpers import tensorboard
  scalars, images = tensorboard(tmp_path)                            # TensorBoard, read back
  for tag in ("loss", "accuracy", "lr", "grad_norm", "images_per_sec", "val/macro_auc"):
    assert tag in scalars, tag
  assert [s for s, _ in scalars["val/macro_auc"]] == [4]
  assert images["inputs"][0][0] == 0 and images["inputs"][0][1] == 4 * 32      # 16 inputs of 32 px, 4 x 4
  assert (tmp_path / "eval" / "real_test.html").exists()


def test_evaluate_checks_every_dataset_before_the_first(phantom, tmp_path):
  cfg = classify.default_evaluate_config()
  cfg.checkpoint = str(tmp_path / "never_read")
  with pytest.raises(ValueError, match="a dataset .* required"):
    classify.evaluate_main(cfg, tmp_path / "out")
  cfg.dataset = str(phantom)
  cfg.external = {"b": str(phantom), "c": str(tmp_path)}
  with pytest.raises(FileNotFoundError, match=f"--config.external.c: {tmp_path}: no dataset here"):
    classify.evaluate_main(cfg, tmp_path / "out")
  cfg.external = {"b": str(phantom)}
  cfg.external_split = "holdout"
  with pytest.raises(ValueError, match=r"--config.external.b: .* has no split 'holdout' \(splits: \['test', "):
    classify.evaluate_main(cfg, tmp_path / "out")
  cfg.external = {"eval": str(phantom)}
  with pytest.raises(ValueError, match="the name `eval` is --config.dataset's report"):
    classify.evaluate_main(cfg, tmp_path / "out")
  assert not (tmp_path / "out").exists()
