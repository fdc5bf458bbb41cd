"""Key-map transforms (`checkpoints/key_mapping.py`): PyTorch layouts into ours and back,
on hand-made arrays."""

import numpy as np
import pytest

from t2v2t_jax.checkpoints.key_mapping import (KeyMapping, apply_transform, infer_square_grid,
                                               inverse_transform, layer_norm, linear)


def test_transforms():
  w = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)     # packed in_proj [3D, D], D = 2
  np.testing.assert_array_equal(apply_transform("in_proj_q", w), w[:2].T)
  np.testing.assert_array_equal(apply_transform("in_proj_v", w), w[4:].T)
  np.testing.assert_array_equal(apply_transform("in_proj_k", np.arange(6.0)), [2.0, 3.0])
  conv = np.random.default_rng(0).normal(size=(5, 3, 2, 2)).astype(np.float32)
  np.testing.assert_array_equal(apply_transform("conv", conv)[1, 0, 2, 4], conv[4, 2, 1, 0])
  np.testing.assert_array_equal(apply_transform("linear", w), w.T)
  emb = np.ones((1, 4, 1, 2), np.float32)
  assert apply_transform("temporal_zero_pad", emb, target_shape=(1, 6, 1, 2))[0, 4:].sum() == 0
  assert infer_square_grid(732) == 14
  with pytest.raises(ValueError):
    infer_square_grid(100)


def test_inverse_transforms_undo_the_layout_changes():
  rng = np.random.default_rng(0)
  w, conv = rng.normal(size=(6, 2)), rng.normal(size=(5, 3, 2, 2))
  np.testing.assert_array_equal(inverse_transform("linear", apply_transform("linear", w)), w)
  np.testing.assert_array_equal(inverse_transform("conv", apply_transform("conv", conv)), conv)
  np.testing.assert_array_equal(inverse_transform("copy", w), w)
  with pytest.raises(ValueError):
    inverse_transform("in_proj_q", w)


def test_row_helpers_and_unknown_transform():
  assert linear("a.dense", "b.dense") == [KeyMapping("a.dense.weight", "b.dense.kernel", "linear"),
                                          KeyMapping("a.dense.bias", "b.dense.bias")]
  assert [m.target for m in layer_norm("a.LayerNorm", "b.norm", group="g")] == ["b.norm.scale",
                                                                               "b.norm.bias"]
  assert all(m.group == "g" for m in layer_norm("a", "b", group="g"))
  with pytest.raises(ValueError, match="unknown transform"):
    KeyMapping("x", "y", "transpose")
