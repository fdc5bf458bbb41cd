"""BERT text encoder: structure, padding, MLM head, dropout, remat, cross-attention layer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_reference import (dense, gelu, jit_apply, jit_value_and_grad, ln, nested, randomize,
                            ref_bert_layer)
from t2v2t_jax.checkpoints.params import flatten_params
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.text_encoder import BertLayer, TextEncoder

VOCAB = 50


def text_cfg(**overrides):
  cfg = model_config("test/16", "test").text
  cfg.vocab_size = VOCAB
  cfg.update(overrides)
  return cfg


def inputs():
  ids = np.array([[1, 7, 8, 9, 10, 11], [1, 12, 13, 0, 0, 0]], np.int32)
  return jnp.asarray(ids), jnp.asarray((ids > 0).astype(np.int32))


# -- tests ---------------------------------------------------------------------------------------

def test_structure_and_shapes():
  cfg = text_cfg()
  model = TextEncoder(cfg, rngs=nnx.Rngs(0))
  paths = set(flatten_params(model))
  assert len(model.layers) == cfg.fusion_layer == 2
  for path in ["embeddings.word_embeddings.embedding", "embeddings.layer_norm.scale",
               "layers.1.attention.query.kernel", "layers.1.attention_output.dense.kernel",
               "layers.1.attention_output.layer_norm.scale", "layers.1.ffn.intermediate.kernel",
               "layers.1.ffn.output.kernel", "layers.1.ffn_layer_norm.bias",
               "mlm_head.dense.kernel", "mlm_head.layer_norm.scale", "mlm_head.bias"]:
    assert path in paths, path
  assert not any("crossattention" in p for p in paths)
  ids, mask = inputs()
  hidden, aux = model(ids, mask)
  assert hidden.shape == (2, 6, 32)
  assert len(aux["hidden_states"]) == 3
  np.testing.assert_array_equal(aux["hidden_states"][-1], hidden)
  assert model.mlm_logits(hidden).shape == (2, 6, VOCAB)


def test_layers_match_numpy_reference():
  cfg = text_cfg()
  model = TextEncoder(cfg, rngs=nnx.Rngs(0))
  randomize(model)
  ids, mask = inputs()
  _, aux = model(ids, mask)
  flat = flatten_params(model)
  for i in range(cfg.fusion_layer):
    p = nested(flat, f"layers.{i}.")
    for b in range(2):
      x = np.asarray(aux["hidden_states"][i][b], np.float64)
      want = ref_bert_layer(p, x, np.asarray(mask[b]).astype(bool), cfg.num_heads)
      np.testing.assert_allclose(aux["hidden_states"][i + 1][b], want, atol=2e-5)


def test_embeddings_and_mlm_head_match_numpy_reference():
  cfg = text_cfg()
  model = TextEncoder(cfg, rngs=nnx.Rngs(0))
  randomize(model)
  ids, mask = inputs()
  token_types = jnp.asarray([[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]])
  hidden, aux = model(ids, mask, token_type_ids=token_types)
  p = nested(flatten_params(model), "")
  e = p["embeddings"]
  want = (e["word_embeddings"]["embedding"][np.asarray(ids)] + e["position_embeddings"]["embedding"][:6]
          + e["token_type_embeddings"]["embedding"][np.asarray(token_types)])
  np.testing.assert_allclose(aux["hidden_states"][0], ln(want, e["layer_norm"]), atol=2e-5)
  h = np.asarray(hidden, np.float64)
  m = p["mlm_head"]
  t = ln(gelu(dense(h, m["dense"])), m["layer_norm"])
  want_logits = t @ e["word_embeddings"]["embedding"].T + m["bias"]  # decoder tied
  np.testing.assert_allclose(model.mlm_logits(hidden), want_logits, rtol=1e-4, atol=1e-4)


def test_appended_padding_changes_nothing_at_real_positions():
  model = TextEncoder(text_cfg(), rngs=nnx.Rngs(0))
  randomize(model)
  ids, mask = inputs()
  hidden, _ = jit_apply(model, ids, mask)
  ids_pad = jnp.concatenate([ids, jnp.zeros((2, 5), ids.dtype)], 1)
  mask_pad = jnp.concatenate([mask, jnp.zeros((2, 5), mask.dtype)], 1)
  hidden_pad, _ = jit_apply(model, ids_pad, mask_pad)
  real = np.asarray(mask).astype(bool)
  np.testing.assert_allclose(np.asarray(hidden_pad[:, :6])[real], np.asarray(hidden)[real], atol=1e-5)


@pytest.mark.parametrize("order", ["vindlu", "cross_first"])
def test_cross_attention_layer_matches_reference(order):
  cfg = text_cfg()
  layer = BertLayer(cfg, kv_features=24, layer_order=order, rngs=nnx.Rngs(3))
  randomize(layer, seed=1)
  x = jax.random.normal(jax.random.key(0), (2, 6, 32))
  kv = jax.random.normal(jax.random.key(1), (2, 10, 24))
  _, mask = inputs()
  out = layer(x, mask.astype(bool), kv=kv)
  p = nested(flatten_params(layer), "")
  order_t = ("self", "cross", "ffn") if order == "vindlu" else ("cross", "self", "ffn")
  for b in range(2):
    want = ref_bert_layer(p, np.asarray(x[b], np.float64), np.asarray(mask[b]).astype(bool),
                          cfg.num_heads, kv=np.asarray(kv[b], np.float64), order=order_t)
    np.testing.assert_allclose(out[b], want, atol=2e-5)
  # kv=None: the text-only path (self-attention + FFN) of the same layer.
  text_only = layer(x, mask.astype(bool))
  want = ref_bert_layer(p, np.asarray(x[0], np.float64), np.asarray(mask[0]).astype(bool), cfg.num_heads)
  np.testing.assert_allclose(text_only[0], want, atol=2e-5)


def test_dropout_needs_rngs_and_is_active():
  model = TextEncoder(text_cfg(), rngs=nnx.Rngs(0))
  ids, mask = inputs()
  with pytest.raises(ValueError, match="rngs"):
    model(ids, mask, deterministic=False)
  a, _ = model(ids, mask)
  b, _ = model(ids, mask, deterministic=False, rngs=nnx.Rngs(dropout=0))
  assert not np.allclose(a, b)


def test_jit_grad_finite_and_remat_equal():
  cfg = text_cfg()
  ids, mask = inputs()

  def loss_fn(model, rngs):
    hidden, _ = model(ids, mask, deterministic=False, rngs=rngs)
    return jnp.mean(model.mlm_logits(hidden) ** 2)

  def run(remat):
    return jit_value_and_grad(TextEncoder(cfg, remat=remat, rngs=nnx.Rngs(0)), loss_fn)

  loss_a, grads_a = run(False)
  loss_b, grads_b = run(True)
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
  assert grads_a.keys() == grads_b.keys() == set(flatten_params(TextEncoder(cfg, rngs=nnx.Rngs(0))))
  for key in grads_a:
    assert np.isfinite(grads_a[key]).all(), key
    assert np.abs(grads_a[key]).sum() > 0, key
    np.testing.assert_allclose(grads_a[key], grads_b[key], rtol=1e-4, atol=1e-7, err_msg=key)


def test_bfloat16_compute_float32_params():
  model = TextEncoder(text_cfg(), dtype="bfloat16", rngs=nnx.Rngs(0))
  ids, mask = inputs()
  hidden, _ = model(ids, mask)
  assert hidden.dtype == jnp.bfloat16
  assert model.mlm_logits(hidden).dtype == jnp.bfloat16
  assert all(v.dtype == jnp.float32 for v in flatten_params(model).values())
  ref, _ = TextEncoder(text_cfg(), rngs=nnx.Rngs(0))(ids, mask)
  np.testing.assert_allclose(np.asarray(hidden, np.float32), ref, atol=0.1)
