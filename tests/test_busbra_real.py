"""The real BUS-BRA dataset from ../shared (skipped when absent): every image accounted for, boxes agree with
masks, 4 devices, the CSV's known size defects reported, no case in two splits."""

import collections
import json

import numpy as np
import pytest

from busgen_jax.data import convert, reader
from busgen_jax.data.sources import base
from helpers import convert_config

pytestmark = pytest.mark.shared


@pytest.fixture(scope="module")
def busbra(busbra_dir, tmp_path_factory):
  out = tmp_path_factory.mktemp("busbra")
  cfg = convert_config("busbra", busbra_dir, out, num_workers=2, **{
      "split.scheme": "folds", "split.test_fold": 1, "image.size": 128})
  ds_dir = convert.convert(cfg)
  return reader.open_dataset(ds_dir), json.loads((ds_dir / convert.REPORT).read_text())


def test_every_image_accounted_for(busbra):
  ds, rep = busbra
  assert rep["inputs"] == 1875 and rep["converted"] == 1875 and rep["rejected"] == 0 and rep["accounted"]
  assert rep["counts"]["pathology"] == {"benign": 1268, "malignant": 607}
  assert sum(ds.splits.values()) == 1875
  assert rep["ignored_files"] == []


def test_four_devices_and_known_csv_defects(busbra):
  ds, rep = busbra
  assert len(ds.vocab("device")) == 5 and len(rep["counts"]["device"]) == 4  # + "unknown" (null) row
  mismatched = sorted(w["file"] for w in rep["warnings"] if w["code"] == "size_mismatch")
  assert mismatched == [f"Images/bus_{i}.png" for i in ("0856-l", "0857-r", "0912-l", "0990-l")]


def test_boxes_agree_with_masks_and_cases_do_not_leak(busbra):
  ds, _ = busbra
  ious, cases = [], collections.defaultdict(set)
  for split in ds.splits:
    src = ds.source(split)
    for i in range(len(src)):
      ex = src[i]
      cases[ex["case_id"]].add(split)
      mask_box = base.boxes_from_mask(ex["mask"][..., 0] > 127, per_component=False)
      assert len(ex["boxes"]) == 1 and len(mask_box) == 1
      ious.append(base.box_iou(ex["boxes"][0], mask_box[0]))
  assert np.median(ious) > 0.9 and np.mean(np.array(ious) > 0.7) > 0.99
  assert all(len(s) == 1 for s in cases.values())
