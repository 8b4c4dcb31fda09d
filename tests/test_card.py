"""The model card: one format written by every writer of a model, older layouts still read, untrained rows
refused by `sample`."""

import json

import numpy as np
import pytest

from busgen_jax import generate
from busgen_jax.data import schema
from busgen_jax.models import card


def test_official_vocabulary_constants_match_the_schema():
  assert card.NULL == schema.UNKNOWN and card.OFFICIAL_PATHOLOGY == schema.PATHOLOGY


def test_card_round_trips_through_metadata():
  c = card.Card(model={"ch": 32}, image_size=64, vocab={"pathology": ["unknown", "benign"], "device": ["unknown"]},
                untrained={"device": ["Toshiba"]}, task={"field": "histology"})
  meta = json.loads(json.dumps(c.to_meta()))          # what Orbax's JSON metadata stores
  assert card.Card.from_meta(meta) == c


def test_layouts_written_before_the_card_still_read(tmp_path):
  config = {"data": {"image_size": 48, "sources": {"real": {"filters": {"device": ["unknown", "GE"]}}}}}
  train = card.Card.from_meta({"model": {"ch": 8}, "vocab": {"device": ["unknown", "GE", "Toshiba"]},
                               "config": json.dumps(config)})
  assert train.image_size == 48 and train.untrained == {"device": ["Toshiba"]}
  merged = card.Card.from_meta({"model": {"ch": 8}, "vocab": {}, "image_size": 32, "task": {"field": "birads"},
                                "config": "{}"})
  assert merged.image_size == 32 and merged.task == {"field": "birads"} and merged.untrained == {"device": []}
  base = {"checkpoint": "/b", "which": "ema", "step": 3, "device_names": []}
  adapters = card.Card.from_meta({"lora": {"rank": 4}, "base": base, "new_rows": {"pathology": 2}, "seed": 0,
                                  "vocab": {"pathology": ["a"]}, "image_size": 16, "task": None})
  assert adapters.adapters["base"] == base and adapters.adapters["lora"] == {"rank": 4}
  (tmp_path / card.OFFICIAL_CONFIG).write_text(json.dumps({"ch": 128}))
  official = card.Card.from_meta({"format": "official-busgen"}, tmp_path)
  assert official.model == {"ch": 128} and official.source["format"] == "official-busgen"
  assert card.with_defaults(official.vocab, ("A", "B")) == {"pathology": list(schema.PATHOLOGY),
                                                            "device": ["unknown", "A", "B"]}
  with pytest.raises(ValueError, match="no model card"):
    card.Card.from_meta({}, tmp_path / "nothing")


def test_sample_leaves_untrained_devices_out_of_all_and_refuses_them_by_name():
  vocab = {"pathology": list(schema.PATHOLOGY), "device": ["unknown", "GE", "Toshiba"]}
  cfg = generate.default_config()
  cfg.update(device=("all",), pathology=("benign",))
  untrained = {"device": ["Toshiba"]}
  assert [c["device"] for c in generate.conditions(cfg, vocab, None, untrained)] == ["GE"]
  assert [c["device"] for c in generate.conditions(cfg, vocab)] == ["GE", "Toshiba"]
  cfg.device = ("Toshiba",)
  with pytest.raises(ValueError, match="never trained"):
    generate.conditions(cfg, vocab, None, untrained)


def test_image_mean_statistics_per_device_with_fallbacks():
  means = np.array([-0.2, -0.4] * 10 + [0.1] * 4)
  devices = np.array(["GE"] * 20 + ["Toshiba"] * 4, object)
  stats = card.image_mean_stats(means, devices)
  assert stats["all"][2] == 24 and stats["device"]["GE"] == pytest.approx([-0.3, 0.1, 20])
  c = card.Card(model={}, image_size=64, vocab={}, image_mean=stats)
  assert c.start("GE") == pytest.approx((-0.3, 0.1))
  assert c.start("Toshiba") == pytest.approx((means.mean(), means.std()))   # 4 < MIN_START_IMAGES: all devices'
  assert c.start("unseen") == c.start("Toshiba")
  assert card.Card(model={}, image_size=64, vocab={}).start("GE") == (0.0, 0.0)   # no statistics: pure noise
  # An adapted model: the shots' devices replace the base's, the others keep the base's.
  site = card.image_mean_stats(np.full(32, -0.5), np.array(["Toshiba"] * 32, object), base=stats)
  assert site["device"]["GE"] == stats["device"]["GE"] and site["device"]["Toshiba"] == pytest.approx([-0.5, 0, 32])
  assert site["all"] == stats["all"]
  assert card.Card.from_meta(c.to_meta()).image_mean == stats


def test_start_rows_by_sampler_start_mode():
  stats = card.image_mean_stats(np.array([-0.2, -0.4] * 10), np.array(["GE"] * 20, object))
  c = card.Card(model={}, image_size=64, vocab={}, image_mean=stats)
  np.testing.assert_allclose(c.start_rows(["GE", "unseen"], "data"), [[-0.3, 0.1], [-0.3, 0.1]], rtol=1e-6)
  assert not c.start_rows(["GE"], "noise").any() and c.start_rows([], "data").shape == (0, 2)
  with pytest.raises(ValueError, match="sampler.start must be one of"):
    c.start_rows(["GE"], "mean")


def test_a_params_only_checkpoint_written_again_replaces_the_old_one(tmp_path):
  # A finished `adapt` run again re-exports its merged model: the rewrite must replace, not fail on the step.
  from busgen_jax import checkpoint
  checkpoint.save_params(tmp_path / "m", {"w": np.zeros(3, np.float32)}, {"v": 1})
  checkpoint.save_params(tmp_path / "m", {"w": np.ones(3, np.float32)}, {"v": 2})
  assert np.array_equal(checkpoint.load_params(tmp_path / "m")["w"], np.ones(3))
  assert checkpoint.load_meta(tmp_path / "m") == (0, {"v": 2})
