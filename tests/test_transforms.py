"""Worker-side transforms: the crop keeps every box, flips flip boxes, rasterisation is the official rule."""

import numpy as np
import pytest

from busgen_jax.data import transforms


def _reference_rule(boxes, h, w):
  """../shared/reference/README.md, literally: ones on rows int(y1*H):int(y2*H), cols int(x1*W):int(x2*W)."""
  out = np.zeros((h, w), np.float32)
  for x1, y1, x2, y2 in boxes:
    for r in range(int(y1 * h), int(y2 * h)):
      for c in range(int(x1 * w), int(x2 * w)):
        out[r, c] = 1
  return out


def test_rasterisation_equals_the_reference_rule():
  rng = np.random.default_rng(0)
  for _ in range(200):
    n = int(rng.integers(0, 3))
    a, b = np.sort(rng.uniform(size=(2, n, 2)), axis=-1)
    boxes = np.stack([a[:, 0], b[:, 0], a[:, 1], b[:, 1]], -1).astype(np.float32)
    h, w = int(rng.integers(8, 40)), int(rng.integers(8, 40))
    np.testing.assert_array_equal(transforms.rasterize_boxes(boxes, h, w), _reference_rule(boxes, h, w))
  # Pixel-edge boxes stored as float32 still cover exactly their pixels.
  edges = np.array([[3 / 20, 2 / 10, 7 / 20, 5 / 10]], np.float32)
  assert transforms.rasterize_boxes(edges, 10, 20)[2:5, 3:7].all() and transforms.rasterize_boxes(edges, 10, 20).sum() == 12
  # Truncation at exact edges, e.g. 0.1 * 16 = 1.6 -> row 1, 0.7 * 16 = 11.2 -> stop 11.
  r = transforms.rasterize_boxes(np.array([[0.1, 0.2, 0.6, 0.7]], np.float32), 16, 16)
  assert r[3:11, 1:9].all() and r.sum() == 8 * 8
  assert transforms.rasterize_boxes(np.zeros((0, 4)), 5, 5).sum() == 0  # unconditional: all zeros


def test_reference_vector_boxes(shared_dir):
  d = np.load(shared_dir / "reference" / "busgen_unet_tiny.npz")
  box = d["input/box"]  # (B, 1, 5): x1, y1, x2, y2, valid
  for b in box[:, 0]:
    boxes = b[None, :4] if b[4] > 0 else np.zeros((0, 4))
    np.testing.assert_array_equal(transforms.rasterize_boxes(boxes, 16, 16), _reference_rule(boxes, 16, 16))


@pytest.mark.parametrize("shape", [(40, 100), (100, 40), (50, 50)])
def test_random_square_crop_keeps_every_box(shape):
  rng = np.random.default_rng(1)
  h, w = shape
  image = np.arange(h * w, dtype=np.int64).reshape(h, w)
  for _ in range(100):
    boxes = np.array([[0.3, 0.3, 0.45, 0.5], [0.5, 0.45, 0.6, 0.6]], np.float32)  # fit in the square
    top, left, side = transforms.square_crop_window(h, w, boxes, rng)
    assert side == min(h, w) and 0 <= top <= h - side and 0 <= left <= w - side
    cropped, new_boxes, _ = transforms.crop(image, boxes, None, (top, left, side))
    assert cropped.shape == (side, side) and len(new_boxes) == 2
    # The same lesion pixels, before and after the crop.
    for old, new in zip(boxes, new_boxes):
      px_old = old * [w, h, w, h]
      px_new = new * side + [left, top, left, top]
      np.testing.assert_allclose(px_new, px_old, atol=1e-3)
      assert (new >= 0).all() and (new <= 1).all()


def test_crop_is_random_and_falls_back_to_centre():
  rng = np.random.default_rng(0)
  lefts = {transforms.square_crop_window(40, 100, np.array([[0.45, 0.1, 0.55, 0.9]]), rng)[1] for _ in range(50)}
  assert len(lefts) > 5
  # Boxes spanning more than the square: the centre crop, not a crop that cuts a lesion at random.
  wide = np.array([[0.05, 0.1, 0.2, 0.3], [0.8, 0.1, 0.95, 0.3]])
  assert transforms.square_crop_window(40, 100, wide, rng) == (0, 30, 40)
  assert transforms.square_crop_window(40, 100, wide, None) == (0, 30, 40)


def test_hflip_flips_boxes_and_masks():
  image = np.zeros((10, 20), np.uint8)
  mask = np.zeros((10, 20), bool)
  mask[2:5, 1:4] = True
  boxes = np.array([[0.05, 0.2, 0.2, 0.5]], np.float32)
  img2, b2, m2 = transforms.hflip(image, boxes, mask)
  np.testing.assert_allclose(b2, [[0.8, 0.2, 0.95, 0.5]], atol=1e-6)
  np.testing.assert_array_equal(transforms.rasterize_boxes(b2, 10, 20), m2.astype(np.float32))


def test_model_range_and_augmentations():
  img = np.array([[0, 255], [128, 64]], np.uint8)
  x = transforms.to_model_range(img)
  assert x.shape == (2, 2, 3) and x.min() == -1 and x.max() == 1
  rng = np.random.default_rng(0)
  base = np.full((64, 64), 100, np.uint8)
  for name, fn in transforms.US_AUGMENTATIONS.items():
    out = fn(base, rng)
    assert out.dtype == np.uint8 and out.shape == base.shape, name
    assert abs(float(out.mean()) - 100) < 20, name
  att = transforms.depth_attenuation(base, np.random.default_rng(3))
  assert att[0].mean() == 100 and att[-1].mean() != 100
