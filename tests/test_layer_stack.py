"""Scanned layer stacks compute what the unrolled layers compute, for every remat policy.

The reference is the plain Python loop over the stored layers (the form the Hugging Face
and VindLU parity tests check); the scanned stack must give the same loss and gradients
in training mode, with dropout and stochastic depth active: each layer draws its own key
in both forms, so the random masks are the same too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t2v2t_jax.models import layer_stack, layers
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.fusion import FusionEncoder
from t2v2t_jax.models.t2v2t import create_model
from t2v2t_jax.training.objective import compute_losses

B, T, L = 4, 2, 8


def tiny_model(scan, remat, placement):
  c = model_config("test/16", "test", "t2v2t")
  c.vision.image_size, c.vision.num_frames = 32, T
  c.vision.drop_path_rate = 0.3   # distinct per-layer rates: data of the scanned body
  c.fusion.t2v_placement = placement
  c.scan_layers, c.remat = scan, remat
  return create_model(c, seed=0)


def batch():
  rng = np.random.default_rng(0)
  return {"frames": jnp.asarray(rng.integers(0, 255, (B, T, 32, 32, 3)), jnp.uint8),
          "input_ids": jnp.asarray(rng.integers(5, 500, (B, L)), jnp.int32),
          "attention_mask": jnp.asarray([[1] * L] * 3 + [[1] * 5 + [0] * 3], jnp.int32),
          "video_idx": jnp.arange(B, dtype=jnp.int32)}


def loss_and_grads(model):
  graphdef, params = nnx.split(model, nnx.Param)
  special = {"cls": 1, "pad": 0, "mask": 2, "vocab_size": 512}

  @jax.jit
  def run(params, batch):
    def loss(p):
      return compute_losses(nnx.merge(graphdef, p), batch, jax.random.key(3, impl="rbg"),
                            loss_weights={"vtc": 1.0, "vtm": 1.0, "mlm": 1.0},
                            special_ids=special)
    return jax.value_and_grad(loss, has_aux=True)(params)

  (total, _), grads = run(params, batch())
  return float(total), {"/".join(map(str, k)): np.asarray(v.get_value() if hasattr(v, "get_value") else v)
                        for k, v in nnx.to_flat_state(grads)}


def test_scanned_model_equals_unrolled_in_training_mode():
  # 'per_layer' T2V scans the fusion layers with their T2V blocks; the video and text
  # stacks are scanned in every mode. Unrolled with full remat, scanned saving the dots.
  loss_a, grads_a = loss_and_grads(tiny_model("off", "full", "per_layer"))
  loss_b, grads_b = loss_and_grads(tiny_model("on", "save_dots", "per_layer"))
  # Same parameters under the same per-layer paths (checkpoints and importers see no change).
  assert grads_a.keys() == grads_b.keys()
  assert any(k.startswith("vision_encoder/layers/1/") for k in grads_a)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  for k in grads_a:
    scale = np.abs(grads_a[k]).max() + 1e-6
    np.testing.assert_allclose(grads_b[k] / scale, grads_a[k] / scale, atol=2e-5, err_msg=k)
  assert np.abs(grads_a["vision_encoder/layers/1/temporal/scale"]).sum() > 0


@pytest.mark.parametrize("mode", ["t2v2t", "joint"])
def test_scanned_fusion_encoder_equals_unrolled(mode):
  c = model_config("test/16", "test", mode)
  rng = np.random.default_rng(1)
  text = jnp.asarray(rng.normal(size=(2, L, 32)), jnp.float32)
  mask = jnp.asarray([[1] * L, [1] * 3 + [0] * (L - 3)], jnp.int32)
  video = jnp.asarray(rng.normal(size=(2, T, 5, 32)), jnp.float32)

  def run(scan):
    model = FusionEncoder(c, scan_layers=scan, rngs=nnx.Rngs(0))
    def loss(model):
      fused, aux = model(text, mask, video, deterministic=False, rngs=nnx.Rngs(dropout=7))
      return jnp.mean(fused ** 2), aux["hidden_states"]
    (value, hidden), grads = nnx.jit(nnx.value_and_grad(loss, has_aux=True))(model)
    return value, hidden, {k: v.get_value() for k, v in nnx.to_flat_state(grads)}

  (la, ha, ga), (lb, hb, gb) = run(False), run(True)
  np.testing.assert_allclose(la, lb, rtol=1e-6)
  assert len(ha) == len(hb) == 1 + c.text.num_layers - c.text.fusion_layer
  for a, b in zip(ha, hb):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert ga.keys() == gb.keys()
  for k in ga:
    np.testing.assert_allclose(gb[k], ga[k], atol=1e-5, rtol=1e-4, err_msg=str(k))


def test_layers_of_different_structure_are_refused():
  a = layers.FeedForward(8, 16, rngs=nnx.Rngs(0))
  b = layers.FeedForward(8, 32, rngs=nnx.Rngs(1))
  x = jnp.ones((2, 8))
  with pytest.raises(ValueError, match="layer 1 differs in structure.*scan_layers"):
    layer_stack.apply_layers([a, b], lambda m, h, rngs: m(h), x, rngs=None, scan=True)
  # Unrolled, the same layers run.
  assert layer_stack.apply_layers([a, b], lambda m, h, rngs: m(h), x, rngs=None, scan=False).shape == (2, 8)


def test_scan_setting_resolution():
  assert layer_stack.resolve_scan("auto", "tpu")
  assert not layer_stack.resolve_scan("auto", "gpu") and not layer_stack.resolve_scan("auto", "cpu")
  assert layer_stack.resolve_scan("on", "gpu") and not layer_stack.resolve_scan("off", "tpu")
  with pytest.raises(ValueError, match="scan_layers='yes'"):
    layer_stack.resolve_scan("yes", "cpu")
  assert layer_stack.normalize_remat(True) == "full" and layer_stack.normalize_remat(False) == "none"
  with pytest.raises(ValueError, match="model.remat='some'"):
    layer_stack.normalize_remat("some")


def test_drop_path_with_a_traced_rate_draws_the_python_rate_mask():
  x = jnp.ones((64, 3, 4))
  eager = layers.drop_path(x, 0.25, deterministic=False, rngs=nnx.Rngs(dropout=5))
  traced = jax.jit(lambda r: layers.drop_path(x, r, deterministic=False,
                                              rngs=nnx.Rngs(dropout=5)))(jnp.float32(0.25))
  np.testing.assert_array_equal(eager, traced)
  kept = np.asarray(eager[:, 0, 0]) != 0
  assert 0 < kept.sum() < 64 and np.allclose(eager[kept], 1 / 0.75)
  zero = jax.jit(lambda r: layers.drop_path(x, r, deterministic=False,
                                            rngs=nnx.Rngs(dropout=5)))(jnp.float32(0.0))
  np.testing.assert_array_equal(zero, x)
