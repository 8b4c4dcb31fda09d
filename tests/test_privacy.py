"""The privacy audit: planted copies of training images are found, clean images pass, the filter removes exactly
the flagged ones, and the membership-inference attack sits at chance where there is no membership to find."""

import json

import numpy as np
import pytest
from PIL import Image

from busgen_jax.data import convert, reader
from busgen_jax.evaluate import membership, neighbours, privacy
from helpers import convert_config, save

PLANTED = ("exact", "flipped", "cropped", "noisy")


def _plant(kind: str, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  if kind == "exact":
    return image
  if kind == "flipped":
    return image[:, ::-1]
  if kind == "cropped":    # 80% of each side at a random place, resized back
    h, w = image.shape
    ch, cw = int(0.8 * h), int(0.8 * w)
    y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    return np.asarray(Image.fromarray(image[y:y + ch, x:x + cw]).resize((w, h), Image.Resampling.BILINEAR))
  if kind == "noisy":      # Gaussian noise of 8% of the grey range
    return np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
  raise ValueError(kind)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
  """Real phantom data (train / test) and a "generated" repository: 60 new phantom images (another seed: other
  patients) and 4 planted copies of each kind, as a manifest dataset."""
  root = tmp_path_factory.mktemp("privacy")
  real = convert.convert(convert_config("phantom", "", root / "real", **{
      "phantom.num_examples": 240, "phantom.size": 96,
      "split.fractions": {"train": 0.75, "val": 0.05, "test": 0.2}}))
  ds = reader.open_dataset(real)
  train = reader.read_images(real, "train")
  rng = np.random.default_rng(0)
  rows = []
  other = convert.make_source(convert_config("phantom", "", root / "x", **{"phantom.seed": 7, "phantom.size": 96}))
  for i in range(60):
    save(root / "gen" / f"clean_{i:02d}.png", other.example(i).image)
    rows.append({"file": f"clean_{i:02d}.png", "pathology": "benign", "split": "train", "case_id": f"clean{i}"})
  picks = rng.choice(len(train["images"]), 4 * len(PLANTED), replace=False)
  for k, kind in enumerate(PLANTED):
    for j in range(4):
      t = int(picks[4 * k + j])
      name = f"{kind}_{j}.png"
      save(root / "gen" / name, _plant(kind, train["images"][t], rng))
      rows.append({"file": name, "pathology": "benign", "split": "train", "case_id": f"{kind}{j}"})
  (root / "gen" / "manifest.json").write_text(json.dumps(rows))
  gen = convert.convert(convert_config("manifest", root / "gen" / "manifest.json", root / "gen_ds", **{
      "name": "planted", "split.scheme": "given"}))
  assert ds.splits["test"] >= 40
  return {"real": real, "generated": gen, "root": root}


def _ids(ds_dir, split="train"):
  ds = reader.open_dataset(ds_dir)
  recs = ds.records(split)
  return [ds.decode(recs[i], skip=("image", "mask"))["id"] for i in range(len(recs))]


def test_audit_flags_every_planted_copy_passes_clean_images_and_the_filter_removes_them(repo, tmp_path):
  cfg = privacy.default_config()
  cfg.generated, cfg.train = str(repo["generated"]), str(repo["real"])
  cfg.filter_output = str(tmp_path / "filtered")
  rep = privacy.run(cfg, tmp_path / "audit")
  ids = _ids(repo["generated"])
  flagged = {ids[f["record"]] for f in rep["flagged"]}
  planted = {i for i in ids if not i.startswith("planted-clean") and "clean" not in i}
  assert planted == flagged, (sorted(planted - flagged), sorted(flagged - planted))
  assert len(planted) == 4 * len(PLANTED)
  assert not rep["verdict"]["safe_to_share"] and "near-copies" in rep["verdict"]["reasons"][0]
  for name in ("audit.json", "audit.md", "audit.html", "audit_images.csv", "near_copies.png"):
    assert (tmp_path / "audit" / name).is_file(), name
  assert "NOT SAFE TO SHARE" in (tmp_path / "audit" / "audit.md").read_text()
  # Pixel distances of flagged copies lie below every clean image's.
  csv = np.genfromtxt(tmp_path / "audit" / "audit_images.csv", delimiter=",", names=True, dtype=None, encoding=None)
  is_flag = np.array([str(x) == "True" for x in csv["flagged"]])
  assert csv["pixel_d1"][is_flag].max() < csv["pixel_d1"][~is_flag].min()

  # The filtered copy: the clean images only, every removal accounted for, and it passes the audit.
  filtered = reader.open_dataset(rep["filtered_dataset"])
  assert sorted(_ids(filtered.dir)) == sorted(set(ids) - planted)
  report = filtered.report
  assert report["accounted"] and report["inputs"] == len(ids) and report["rejected"] == len(planted)
  assert set(report["rejections_by_code"]) == {privacy.FLAGGED}
  again = privacy.default_config()
  again.generated, again.train = str(filtered.dir), str(repo["real"])
  rep2 = privacy.run(again, tmp_path / "audit2")
  assert rep2["verdict"]["safe_to_share"], rep2["verdict"]
  assert rep2["n_flagged"] == 0 and "SAFE TO SHARE" in (tmp_path / "audit2" / "audit.md").read_text()


def test_membership_inference_is_at_chance_between_two_held_out_sets(repo):
  """The denoising-loss attack on a (tiny, briefly trained) diffusion model, with "members" and "non-members"
  both drawn from cases it never saw: the AUC's CI covers 0.5. And the attack reads lower loss as membership."""
  from busgen_jax.train import diffusion
  from helpers import tiny_diffusion_config
  root = repo["root"]
  other = convert.convert(convert_config("phantom", "", root / "other", **{
      "phantom.num_examples": 200, "phantom.size": 32, "phantom.seed": 3,
      "split.fractions": {"train": 0.5, "val": 0.0, "test": 0.5}}))
  cfg = tiny_diffusion_config(repo["real"], 3)
  diffusion.train(cfg, root / "dm")
  from busgen_jax.models import card
  model = card.load(str(root / "dm" / "checkpoints"))
  kw = dict(timesteps=(10, 50, 100), repeats=2, batch_size=16)
  a_idx, b_idx = np.arange(reader.open_dataset(other).splits["train"]), np.arange(reader.open_dataset(other).splits["test"])
  la = membership.denoising_losses(model, other, "train", a_idx, **kw)
  lb = membership.denoising_losses(model, other, "test", b_idx, **kw)
  assert la.shape == (len(a_idx),) and np.isfinite(la).all() and (la > 0).all()
  np.testing.assert_array_equal(la, membership.denoising_losses(model, other, "train", a_idx, **kw))   # fixed noise
  # rows= scores every image under one label row: the same losses where that is the image's own row
  from busgen_jax.data import pipeline
  ds = reader.open_dataset(other)
  is_benign = pipeline.scan_labels(ds, "train")["pathology"][a_idx] == ds.vocab("pathology").index("benign")
  lr = membership.denoising_losses(model, other, "train", a_idx, rows={"pathology": model.vocab["pathology"].index(
      "benign")}, **kw)
  assert is_benign.any() and (~is_benign).any()
  np.testing.assert_allclose(lr[is_benign], la[is_benign], rtol=1e-6)
  assert not np.allclose(lr[~is_benign], la[~is_benign])
  res = membership.membership_auc(la, lb, member_cases=ds.case_ids("train"), nonmember_cases=ds.case_ids("test"),
                               n_bootstrap=300)
  assert res["auc_ci95"][0] < 0.5 < res["auc_ci95"][1] and abs(res["auc"] - 0.5) < 0.15, res
  # Direction: the same losses with a "memorised" group (losses halved) read as members.
  assert membership.membership_auc(la / 2, lb, n_bootstrap=50)["auc"] > 0.9


def test_pixel_alignment_is_the_brute_force_normalised_cross_correlation():
  """The FFT search (canvas transforms shared by every scale, one template FFT per query) finds, inside each
  canvas's image, the window a direct sum over every position scores highest, with that score."""
  rng = np.random.default_rng(0)
  C, ts = 12, 5
  canvas = rng.uniform(0, 255, (4, C, C)).astype(np.float32)
  template = rng.uniform(0, 255, (2, ts, ts)).astype(np.float32)
  canvas[3, 2:2 + ts, 4:4 + ts] = template[1] * 0.5 + 30          # an affine copy of template 1: NCC ~1 there
  owner = np.array([0, 0, 1, 1], np.int32)
  extent = np.array([[12, 12], [8, 10], [12, 7], [9, 12]], np.int32)   # the image's (h, w) on its canvas
  got = [np.asarray(a) for a in neighbours._ncc_max(neighbours._canvas_transforms(canvas), extent, template, owner,
                                                    ts=ts)]
  n = ts * ts
  for b in range(4):
    x = canvas[b].astype(np.float64) - canvas[b].mean()
    t = template[owner[b]].astype(np.float64) - template[owner[b]].mean()
    t /= np.sqrt((t * t).sum()) + 1e-6
    scores = {(r, c): (w * t).sum() / np.sqrt(max((w * w).sum() - w.sum() ** 2 / n, 0) + n)
              for r in range(extent[b, 0] - ts + 1) for c in range(extent[b, 1] - ts + 1)
              for w in [x[r:r + ts, c:c + ts]]}
    best = max(scores, key=scores.get)
    assert got[0][b] == pytest.approx(scores[best], abs=1e-4), b
    assert (got[1][b], got[2][b]) == best, b
  assert (got[1][3], got[2][3]) == (2, 4) and got[0][3] > 0.99
