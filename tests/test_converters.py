"""Each converter on small fixture trees: labels, boxes, duplicates, splits and full accounting of inputs."""

import json

import numpy as np
import pytest
from PIL import Image

from busgen_jax.data import convert, reader
from helpers import (bomb_png, convert_config, gray, lesion_mask, make_busbra, make_busi, rejections_by_file,
                     save, truncated_png)


def _convert(cfg):
  ds_dir = convert.convert(cfg)
  report = json.loads((ds_dir / convert.REPORT).read_text())
  assert report["accounted"] and report["inputs"] == report["converted"] + report["rejected"]
  return reader.open_dataset(ds_dir), report


def _all(ds):
  return {ex["id"]: ex for split in ds.splits for ex in (ds.source(split)[i] for i in range(ds.splits[split]))}


def test_busi_layout_duplicates_and_boxes(tmp_path):
  make_busi(tmp_path / "in")
  ds, report = _convert(convert_config("busi", tmp_path / "in", tmp_path / "out"))
  rej = rejections_by_file(report)
  root = "Dataset_BUSI_with_GT/"
  # Same-class copy: first kept, second rejected; cross-class copies: both excluded.
  assert rej[root + "benign/benign (4).png"] == "duplicate"
  assert rej[root + "benign/benign (3).png"] == "label_conflict"
  assert rej[root + "malignant/malignant (2).png"] == "label_conflict"
  assert report["inputs"] == 7 and report["converted"] == 4 and report["rejected"] == 3
  assert {d["conflict"] for d in report["duplicates"]} == {True, False}
  ignored = {f["file"]: f["reason"] for f in report["ignored_files"]}
  assert "mask without a matching image" in ignored[root + "normal/normal (9)_mask.png"]
  assert "not an image" in ignored[root + "normal/readme.txt"]

  exs = _all(ds)
  b1 = exs["busi/benign/benign (1)"]
  assert ds.vocab("pathology")[b1["pathology"]] == "benign"
  np.testing.assert_allclose(b1["boxes"], [[10 / 56, 8 / 40, 30 / 56, 20 / 40]], atol=1e-6)
  assert b1["image"].shape == (40, 56, 1) and b1["has_mask"]
  np.testing.assert_array_equal(b1["image"][..., 0], gray(seed=1))  # RGB-of-gray becomes exact grayscale
  # Two mask files -> two boxes; the union is stored as the mask.
  assert len(exs["busi/benign/benign (2)"]["boxes"]) == 2
  assert exs["busi/benign/benign (2)"]["mask"].sum() == (100 + 320) * 255
  normal = exs["busi/normal/normal (1)"]
  assert len(normal["boxes"]) == 0 and ds.vocab("pathology")[normal["pathology"]] == "normal"


def test_busi_box_modes_and_keep_first(tmp_path):
  make_busi(tmp_path / "in")
  ds, report = _convert(convert_config("busi", tmp_path / "in", tmp_path / "out", **{
      "busi.on_conflict": "keep_first", "busi.box_mode": "mask_file"}))
  exs = _all(ds)
  # One mask file with two separate lesions: one box in mask_file mode.
  assert len(exs["busi/benign/benign (3)"]["boxes"]) == 1
  assert report["converted"] == 5 and report["rejections_by_code"] == {"duplicate": 2}


def test_busbra_fixture_folds_and_size_mismatch(tmp_path):
  make_busbra(tmp_path / "bra")
  (tmp_path / "bra/Images/bus_9999-l.png").write_bytes((tmp_path / "bra/Images/bus_0001-l.png").read_bytes())
  ds, report = _convert(convert_config("busbra", tmp_path / "bra", tmp_path / "out", **{"split.scheme": "folds"}))
  assert report["converted"] == 6 and report["rejected"] == 0
  assert ds.splits == {"test": 2, "train": 4}
  exs = _all(ds)
  assert {exs[k]["fold"] for k in ("bus_0001-l", "bus_0001-r")} == {1}
  ex = exs["bus_0002-s"]
  assert ds.vocab("histology")[ex["histology"]] == "invasive ductal carcinoma"
  assert ds.vocab("birads")[ex["birads"]] == "5"
  assert ds.vocab("device")[ex["device"]] == "GE Logiq 7 @10-14MHz"
  assert ex["case_id"] == "busbra/2"
  np.testing.assert_allclose(ex["boxes"], [[20 / 56, 10 / 40, 40 / 56, 35 / 40]], atol=1e-6)  # file size wins
  warnings = [w for w in report["warnings"] if w["code"] == "size_mismatch"]
  assert [w["file"] for w in warnings] == ["Images/bus_0002-s.png"]
  assert [f["file"] for f in report["ignored_files"]] == ["Images/bus_9999-l.png"]
  assert ds.vocab("device")[0] == "unknown" and len(ds.vocab("device")) == 5


def test_busbra_box_mask_disagreement_is_reported(tmp_path):
  make_busbra(tmp_path / "bra")
  save(tmp_path / "bra/Masks/mask_0003-l.png", lesion_mask(boxes=((40, 25, 55, 39),)))
  _, report = _convert(convert_config("busbra", tmp_path / "bra", tmp_path / "out"))
  assert [w["file"] for w in report["warnings"] if w["code"] == "box_mask_disagree"] == ["Images/bus_0003-l.png"]


def test_official_busgen_json_loads_as_is(tmp_path):
  root = tmp_path / "export"
  for i in range(4):
    save(root / f"img/{i}.png", gray(seed=i))
  entries = [
      {"file": "img/0.png", "pathology": 1, "is_valid": 1, "device_type": "GE-LOGIQ-E9",
       "lesion_box": {"1": [0.1, 0.2, 0.5, 0.6]}},
      {"file": "img/1.png", "pathology": 2, "is_valid": 1, "device_type": "Mindray-M9",
       "lesion_box": {"1": [0.1, 0.2, 0.3, 0.4], "2": [0.5, 0.5, 0.9, 0.9]}},
      {"file": "img/2.png", "pathology": "benign", "is_valid": 0, "device_type": "GE-LOGIQ-E9",
       "lesion_box": {"1": [0.0, 0.0, 0.0, 0.0]}},
      {"file": "img/3.png", "pathology": "malignant", "is_valid": True, "device_type": "Siemens-ACUSON-NX3-Elite",
       "lesion_box": {"1": [0.2, 0.2, 0.4, 0.4]}},
  ]
  (root / "dataset.json").write_text(json.dumps(entries))
  ds, report = _convert(convert_config("manifest", root / "dataset.json", tmp_path / "out"))
  assert report["converted"] == 4
  exs = _all(ds)
  assert ds.vocab("device") == ["unknown", "GE-LOGIQ-E9", "Mindray-M9", "Siemens-ACUSON-NX3-Elite"]
  np.testing.assert_allclose(exs["img/1.png"]["boxes"], [[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.9, 0.9]], atol=1e-6)
  assert len(exs["img/2.png"]["boxes"]) == 0  # is_valid 0: no valid box
  assert ds.vocab("pathology")[exs["img/0.png"]["pathology"]] == "benign"
  assert any(w["code"] == "no_case_ids" for w in report["warnings"])


def test_csv_manifest_pixel_boxes_masks_and_given_splits(tmp_path):
  root = tmp_path / "csv"
  for i in range(6):
    save(root / f"{i}.png", gray(seed=i))
  save(root / "m0.png", lesion_mask())
  rows = ["file,pathology,device,boxes,mask,case_id,birads,histology,split"]
  rows.append('0.png,benign,A,,m0.png,p1,3,Fibroadenoma,train')
  rows.append('1.png,malignant,B,"[[5, 4, 28, 20]]",,p2,4a,,test')
  for i in range(2, 6):
    rows.append(f'{i}.png,{"benign" if i % 2 else "malignant"},A,"[[1, 1, 10, 10]]",,p{i + 1},,,')
  (root / "m.csv").write_text("\n".join(rows) + "\n")
  ds, report = _convert(convert_config("manifest", root / "m.csv", tmp_path / "out", **{"split.scheme": "given"}))
  assert report["converted"] == 6, report["rejections"]
  exs = _all(ds)
  np.testing.assert_allclose(exs["0.png"]["boxes"], [[10 / 56, 8 / 40, 30 / 56, 20 / 40]], atol=1e-6)  # from mask
  np.testing.assert_allclose(exs["1.png"]["boxes"], [[5 / 56, 4 / 40, 28 / 56, 20 / 40]], atol=1e-6)
  assert exs["1.png"]["split"] == "test" and exs["0.png"]["split"] == "train"
  assert ds.vocab("birads")[exs["1.png"]["birads"]] == "4A"
  assert ds.vocab("histology")[exs["0.png"]["histology"]] == "fibroadenoma"


def test_every_bad_input_kind_is_rejected_with_its_reason(tmp_path):
  root = tmp_path / "bad"
  save(root / "ok.png", gray())
  save(root / "ok_mask.png", lesion_mask())
  truncated_png(root / "truncated.png")
  (root / "not_image.png").write_text("hello, I am text")
  save(root / "sixteen.png", Image.fromarray(np.full((40, 56), 4000, np.uint16)))
  save(root / "rgba.png", np.zeros((40, 56, 4), np.uint8))
  save(root / "cmyk.jpg", Image.new("CMYK", (56, 40)))
  save(root / "palette.png", Image.fromarray(gray()).convert("P"))
  save(root / "colour.png", np.random.default_rng(0).integers(0, 255, (40, 56, 3), dtype=np.uint8))
  save(root / "small_mask.png", lesion_mask(h=20, w=20, boxes=((1, 1, 5, 5),)))
  save(root / "empty_mask.png", np.zeros((40, 56), np.uint8))
  bomb_png(root / "bomb.png")
  (tmp_path / "outside.png").write_bytes((root / "ok.png").read_bytes())
  entries = [
      {"file": "ok.png", "pathology": "benign", "mask": "ok_mask.png", "case_id": "c0"},
      {"file": "truncated.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "not_image.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "sixteen.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "rgba.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "cmyk.jpg", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "palette.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "colour.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "ok.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},  # listed twice
      {"file": "bomb.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "missing.png", "pathology": "benign", "boxes": [[0.1, 0.1, 0.2, 0.2]]},
      {"file": "../outside.png", "pathology": "benign"},
      {"file": str(tmp_path / "outside.png"), "pathology": "benign"},
      {"file": "link.png", "pathology": "benign"},                            # a symlink out of the root
      {"file": "masked.png", "pathology": "benign", "mask": "../outside.png"},  # a mask outside it
      {"file": "small.png", "pathology": "benign", "mask": "small_mask.png"},
      {"file": "empty.png", "pathology": "malignant", "mask": "empty_mask.png"},
      {"file": "outbox.png", "pathology": "benign", "boxes": [[0.5, 0.5, 1.3, 0.9]]},
      {"file": "flipped.png", "pathology": "benign", "boxes": [[0.5, 0.5, 0.2, 0.9]]},
      {"file": "label.png", "pathology": "suspicious"},
      {"file": "birads.png", "pathology": "benign", "birads": "7"},
      {"pathology": "benign"},
      "just a string",
  ]
  for name in ("small.png", "empty.png", "outbox.png", "flipped.png", "label.png", "birads.png", "masked.png"):
    save(root / name, gray())
  (root / "link.png").symlink_to(tmp_path / "outside.png")
  (root / "manifest.json").write_text(json.dumps(entries))
  _, report = _convert(convert_config("manifest", root / "manifest.json", tmp_path / "out",
                                      **{"manifest.box_units": "normalized", "image.colour": "reject"}))
  assert report["inputs"] == len(entries) and report["converted"] == 1
  codes = rejections_by_file(report)
  expected = {
      "truncated.png": "truncated", "not_image.png": "not_an_image", "sixteen.png": "unsupported_mode",
      "rgba.png": "unsupported_mode", "cmyk.jpg": "unsupported_mode", "palette.png": "unsupported_mode",
      "colour.png": "unsupported_mode", "bomb.png": "too_large", "missing.png": "missing_file",
      "../outside.png": "path_escapes_root", str(tmp_path / "outside.png"): "path_escapes_root",
      "link.png": "path_escapes_root", "masked.png": "path_escapes_root",
      "small.png": "mask_size_mismatch", "empty.png": "empty_mask", "outbox.png": "box_outside_image",
      "flipped.png": "bad_box", "label.png": "unknown_label", "birads.png": "unknown_label"}
  for file, code in expected.items():
    assert codes.get(file) == code, (file, codes.get(file), report["rejections"])
  reasons = {r["file"]: r["reason"] for r in report["rejections"]}
  assert "16-bit" in reasons["sixteen.png"] and "alpha" in reasons["rgba.png"] and "CMYK" in reasons["cmyk.jpg"]
  assert "palette" in reasons["palette.png"] and "decompression bomb" in reasons["bomb.png"]
  assert "listed twice" in reasons["ok.png"]
  assert sum(1 for r in report["rejections"] if r["code"] == "bad_row") == 2  # no file, not an object


def _annotate(image: np.ndarray) -> np.ndarray:
  """A grayscale image as RGB with coloured annotation marks (a yellow cross and a green calliper line), as
  BUSI's colour-marked images carry."""
  rgb = np.stack([image] * 3, -1)
  rgb[18:22, 10:40] = (255, 255, 0)
  rgb[5:35, 24:26] = (0, 200, 0)
  return rgb


def test_colour_marked_images_become_luma_with_a_warning(tmp_path):
  make_busi(tmp_path / "in")
  b = tmp_path / "in" / "Dataset_BUSI_with_GT"
  marked = _annotate(gray(seed=11))
  save(b / "malignant/malignant (3).png", marked)
  save(b / "malignant/malignant (3)_mask.png", lesion_mask(boxes=((20, 10, 40, 35),)))
  ds, report = _convert(convert_config("busi", tmp_path / "in", tmp_path / "out"))
  assert report["converted"] == 5 and "unsupported_mode" not in report["rejections_by_code"]
  rel = "Dataset_BUSI_with_GT/malignant/malignant (3).png"
  warned = [w for w in report["warnings"] if w.get("code") == "colour_to_luma"]
  assert [w["file"] for w in warned] == [rel], report["warnings"]   # gray RGB files (benign (1)) are not warned
  ex = _all(ds)["busi/malignant/malignant (3)"]
  want = np.asarray(Image.fromarray(marked).convert("L"))            # ITU-R 601 luma, as PIL computes it
  np.testing.assert_array_equal(ex["image"][..., 0], want)
  assert ex["image"][0, 0, 0] == gray(seed=11)[0, 0]                 # unmarked pixels keep their gray value

  # image.colour=reject: the same file is rejected with its reason, and still accounted for.
  _, report = _convert(convert_config("busi", tmp_path / "in", tmp_path / "out2", **{"image.colour": "reject"}))
  assert rejections_by_file(report)[rel] == "unsupported_mode" and report["converted"] == 4
  with pytest.raises(ValueError, match="image.colour"):
    convert.convert(convert_config("busi", tmp_path / "in", tmp_path / "out3", **{"image.colour": "rgb"}))


def test_manifest_errors_name_the_file(tmp_path):
  bad = tmp_path / "broken.json"
  bad.write_text("{not json")
  with pytest.raises(ValueError, match="broken.json"):
    convert.convert(convert_config("manifest", bad, tmp_path / "out"))
  with pytest.raises(FileNotFoundError, match="no BUSI class folders"):
    convert.convert(convert_config("busi", tmp_path, tmp_path / "out"))
