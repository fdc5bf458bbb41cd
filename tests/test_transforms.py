"""Clip transforms: crop parameters by hand, one crop and flip per clip, exact shapes."""

import math

import numpy as np
import pytest
from PIL import Image

from input_pipeline.transforms import (eval_transform, random_resized_crop_params, resize_frames,
                                       train_transform)


class _ScriptedRng:
  """Returns scripted `uniform` values and `integers` = low + offset; records the calls."""

  def __init__(self, uniforms, offset=0, flip_draw=0.9):
    self.uniforms = list(uniforms)
    self.offset = offset
    self.flip_draw = flip_draw
    self.calls = []

  def uniform(self, lo, hi):
    self.calls.append(("uniform", lo, hi))
    return self.uniforms.pop(0)

  def integers(self, lo, hi):
    self.calls.append(("integers", lo, hi))
    return lo + min(self.offset, hi - 1 - lo)

  def random(self):
    return self.flip_draw


def test_crop_params_by_hand():
  # area fraction 0.5 of 100 x 200 = 10000, aspect log(1) = 0 -> 100 x 100; top in [0, 1), left in [0, 101)
  rng = _ScriptedRng([0.5, 0.0], offset=37)
  assert random_resized_crop_params(100, 200, rng) == (0, 37, 100, 100)
  assert rng.calls == [("uniform", 0.5, 1.0), ("uniform", math.log(3 / 4), math.log(4 / 3)),
                       ("integers", 0, 1), ("integers", 0, 101)]
  # area 0.72 * 120 * 90 = 7776, aspect 4/3 -> w = round(sqrt(10368)) = 102 > 90: retry;
  # then area 0.6 * 10800 = 6480, aspect 3/4 -> w = round(sqrt(4860)) = 70, h = round(sqrt(8640)) = 93
  rng = _ScriptedRng([0.72, math.log(4 / 3), 0.6, math.log(3 / 4)], offset=5)
  assert random_resized_crop_params(120, 90, rng) == (5, 5, 93, 70)


def test_crop_params_fallback_is_a_central_crop():
  # scale > 1: nothing fits in 10 tries (20 uniform draws), then the central fallback
  for (height, width), expected in {
      (100, 300): (0, 83, 100, 133),  # too wide: h = 100, w = round(100 * 4/3) = 133
      (300, 100): (83, 0, 133, 100),  # too tall: w = 100, h = round(100 / (3/4)) = 133
      (100, 110): (0, 0, 100, 110),  # ratio within range: whole frame
  }.items():
    rng = _ScriptedRng([2.0, 0.0] * 10)
    assert random_resized_crop_params(height, width, rng, scale=(2.0, 3.0)) == expected
    assert not rng.uniforms  # exactly 10 tries


def test_crop_params_statistics():
  rng = np.random.default_rng(0)
  for _ in range(500):
    top, left, h, w = random_resized_crop_params(72, 128, rng)
    assert 0 <= top and top + h <= 72 and 0 <= left and left + w <= 128
    assert 0.5 * 72 * 128 * 0.9 <= h * w <= 72 * 128
    assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


def _clip(num=6, height=40, width=56, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.integers(40, 120, (height, width, 3)).astype(np.uint8)
  return np.stack([base + np.uint8(12 * t) for t in range(num)])  # frame t = frame 0 + 12 t


def test_same_crop_and_flip_for_every_frame():
  clip = _clip()
  flips = set()
  for seed in range(12):
    out = train_transform(clip, 32, np.random.default_rng(seed))
    assert out.shape == (6, 32, 32, 3) and out.dtype == np.uint8
    # a constant offset survives a shared crop/resize/flip (to the rounding of PIL's
    # fixed-point weights); a different crop or flip per frame would not
    for t in range(1, 6):
      diff = out[t].astype(int) - out[0].astype(int)
      assert np.abs(diff - 12 * t).max() <= 1, (seed, t)
    # each frame alone, with the same generator state, gives the same output
    for t in range(6):
      np.testing.assert_array_equal(train_transform(clip[t:t + 1], 32, np.random.default_rng(seed))[0], out[t])
    # the reference: PIL crop, PIL bicubic resize, numpy flip, with the parameters drawn
    # in the documented order (crop, then one uniform for the flip)
    rng = np.random.default_rng(seed)
    top, left, h, w = random_resized_crop_params(40, 56, rng)
    flip = rng.random() < 0.5
    flips.add(flip)
    image = Image.fromarray(clip[3]).crop((left, top, left + w, top + h)).resize((32, 32), Image.BICUBIC)
    expected = np.asarray(image)[:, ::-1] if flip else np.asarray(image)
    np.testing.assert_array_equal(out[3], expected)
  assert flips == {True, False}


def test_eval_transform_shapes_and_values():
  clip = _clip(num=3, height=36, width=64)
  out = eval_transform(clip, 24)
  assert out.shape == (3, 24, 24, 3) and out.dtype == np.uint8
  for t in range(3):
    np.testing.assert_array_equal(out[t], np.asarray(Image.fromarray(clip[t]).resize((24, 24), Image.BICUBIC)))
  assert eval_transform(clip, 100).shape == (3, 100, 100, 3)  # upsampling too
  np.testing.assert_array_equal(eval_transform(clip[:, :20, :20], 20), clip[:, :20, :20])  # identity
  assert resize_frames(clip, (10, 30)).shape == (3, 10, 30, 3)
  with pytest.raises(ValueError):
    eval_transform(clip.astype(np.float32), 24)
