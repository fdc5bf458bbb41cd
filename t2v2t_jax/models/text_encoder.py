"""BERT text encoder: embeddings, post-LN layers 0..fusion_layer-1 and the MLM head.

The same `BertLayer` also builds the fusion encoder's layers (`fusion.py`): there it gets
an extra cross-attention sub-block whose keys/values are video tokens. Layer structure
(post-LN BERT, SPEC 2-3), for the default 'vindlu' order:

  x = LN(x + dropout(dense(SelfAttn(x, key_mask=text padding))))
  x = LN(x + dropout(dense(CrossAttn(q=x, kv=video))))          # fusion layers only
  x = LN(x + dropout(FFN(x)))                                      # FFN = dense, GELU, dense

'cross_first' swaps the first two sub-blocks (the poster's literal order).

Parameter paths (`nnx.state` flattened with dots), for a Hugging Face key
`encoder.layer.{i}.<src>` the table in `checkpoints/hf_bert.py` gives ours:
  embeddings.{word,position,token_type}_embeddings.embedding, embeddings.layer_norm.{scale,bias}
  layers.{i}.attention.{query,key,value}.{kernel,bias}
  layers.{i}.attention_output.dense.{kernel,bias}, layers.{i}.attention_output.layer_norm.*
  layers.{i}.crossattention.*, layers.{i}.crossattention_output.*     (fusion layers)
  layers.{i}.ffn.intermediate.*, layers.{i}.ffn.output.*, layers.{i}.ffn_layer_norm.*
  mlm_head.dense.*, mlm_head.layer_norm.*, mlm_head.bias   (decoder = word embeddings)
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from t2v2t_jax.models import layer_stack
from t2v2t_jax.models import layers as L

SUB_BLOCK_ORDERS = {
    "vindlu": ("self", "cross", "ffn"),
    "cross_first": ("cross", "self", "ffn"),
}


def embed(num: int, features: int, *, rngs: nnx.Rngs, dtype=None) -> nnx.Embed:
  return nnx.Embed(num, features, dtype=dtype, param_dtype=jnp.float32,
                   embedding_init=L.DEFAULT_INIT, rngs=rngs)


class BertEmbeddings(nnx.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""

  def __init__(self, cfg_text, *, dtype=None, rngs: nnx.Rngs):
    d = cfg_text.width
    self.dropout_rate = float(cfg_text.dropout_rate)
    self.word_embeddings = embed(cfg_text.vocab_size, d, dtype=dtype, rngs=rngs)
    self.position_embeddings = embed(cfg_text.max_position, d, dtype=dtype, rngs=rngs)
    self.token_type_embeddings = embed(cfg_text.type_vocab_size, d, dtype=dtype, rngs=rngs)
    self.layer_norm = L.layer_norm(d, eps=cfg_text.layer_norm_eps, dtype=dtype, rngs=rngs)

  def __call__(self, input_ids, token_type_ids=None, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    seq_len = input_ids.shape[1]
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = (self.word_embeddings(input_ids)
         + self.position_embeddings(jnp.arange(seq_len)[None, :])
         + self.token_type_embeddings(token_type_ids))
    x = self.layer_norm(x)
    return L.dropout(x, self.dropout_rate, deterministic=deterministic, rngs=rngs)


class ResidualOutput(nnx.Module):
  """BERT's `*.output`: dense, dropout, `LN(residual + .)` (post-LN)."""

  def __init__(self, in_features: int, features: int, *, eps: float, dropout_rate: float,
               dtype=None, rngs: nnx.Rngs):
    self.dropout_rate = float(dropout_rate)
    self.dense = L.linear(in_features, features, dtype=dtype, rngs=rngs)
    self.layer_norm = L.layer_norm(features, eps=eps, dtype=dtype, rngs=rngs)

  def __call__(self, y, residual, *, deterministic: bool, rngs: nnx.Rngs | None):
    y = L.dropout(self.dense(y), self.dropout_rate, deterministic=deterministic, rngs=rngs)
    return self.layer_norm(residual + y)


class BertLayer(nnx.Module):
  """One post-LN BERT layer, with an optional cross-attention sub-block.

  Attributes:
    attention / attention_output: self-attention (q, k, v) and its dense + LN.
    crossattention / crossattention_output: present when `kv_features` is given; queries
      from the text (width D), keys/values from `kv_features`-wide tokens (all unmasked).
    ffn / ffn_layer_norm: intermediate dense, exact GELU, output dense; then LN(x + .).
    order: the sub-block order, ('self', 'cross', 'ffn') for 'vindlu'.
  """

  def __init__(self, cfg_text, *, kv_features: int | None = None, layer_order: str = "vindlu",
               dtype=None, attention_impl: str = "auto", rngs: nnx.Rngs):
    if layer_order not in SUB_BLOCK_ORDERS:
      raise ValueError(f"layer_order={layer_order!r} is not one of {list(SUB_BLOCK_ORDERS)}")
    d, eps, rate = cfg_text.width, cfg_text.layer_norm_eps, float(cfg_text.dropout_rate)
    self.order = SUB_BLOCK_ORDERS[layer_order]
    self.dropout_rate = rate
    self.attention = L.MultiHeadAttention(
        d, d, cfg_text.num_heads, attn_dropout_rate=rate, dtype=dtype,
        attention_impl=attention_impl, rngs=rngs)
    self.attention_output = ResidualOutput(d, d, eps=eps, dropout_rate=rate, dtype=dtype, rngs=rngs)
    self.has_cross_attention = kv_features is not None
    if self.has_cross_attention:
      self.crossattention = L.MultiHeadAttention(
          d, kv_features, cfg_text.num_heads, attn_dropout_rate=rate, dtype=dtype,
          attention_impl=attention_impl, rngs=rngs)
      self.crossattention_output = ResidualOutput(d, d, eps=eps, dropout_rate=rate, dtype=dtype,
                                                  rngs=rngs)
    self.ffn = L.FeedForward(d, cfg_text.mlp_dim, dtype=dtype, rngs=rngs)
    self.ffn_layer_norm = L.layer_norm(d, eps=eps, dtype=dtype, rngs=rngs)

  def self_attention_block(self, x, key_mask, *, deterministic: bool, rngs: nnx.Rngs | None):
    y = self.attention(x, x, key_mask=key_mask, deterministic=deterministic, rngs=rngs)
    return self.attention_output(y, x, deterministic=deterministic, rngs=rngs)

  def cross_attention_block(self, x, kv, *, deterministic: bool, rngs: nnx.Rngs | None):
    """x [P, L, D] attends to kv [V, S, Dkv]; P = k V: text p attends to kv[p // k].

    With k > 1 the k texts of a video are one query sequence of k L tokens: the video's
    keys and values are projected once, not once per text. The cross-attention has no
    key mask and every query attends on its own, so this is the same attention as k
    copies of the video would give.
    """
    p, l, d = x.shape
    v = kv.shape[0]   # FusionEncoder checks that v divides p
    q = x if p == v else x.reshape(v, (p // v) * l, d)
    y = self.crossattention(q, kv, deterministic=deterministic, rngs=rngs)
    return self.crossattention_output(y.reshape(p, l, -1), x, deterministic=deterministic,
                                      rngs=rngs)

  def ffn_block(self, x, *, deterministic: bool, rngs: nnx.Rngs | None):
    y = L.dropout(self.ffn(x), self.dropout_rate, deterministic=deterministic, rngs=rngs)
    return self.ffn_layer_norm(x + y)

  def __call__(self, x, key_mask, *, kv=None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None):
    """x [B, L, D]; key_mask bool [B, L] (False = padding); kv [B / k, S, Dkv] or None
    (k texts a video: `cross_attention_block`).

    With `kv=None` the cross-attention sub-block is skipped (text-only path: a fusion
    layer then computes exactly the BERT layer it was initialised from).
    """
    for block in self.order:
      if block == "self":
        x = self.self_attention_block(x, key_mask, deterministic=deterministic, rngs=rngs)
      elif block == "cross":
        if kv is not None:
          if not self.has_cross_attention:
            raise ValueError("this BertLayer was built without cross-attention (kv_features=None)")
          x = self.cross_attention_block(x, kv, deterministic=deterministic, rngs=rngs)
      else:
        x = self.ffn_block(x, deterministic=deterministic, rngs=rngs)
    return x


def apply_bert_layers(layers, x, key_mask, *, kv=None, deterministic: bool,
                      rngs: nnx.Rngs | None, remat: str, scan: bool):
  """Runs `x` through BertLayers in order; returns (x, [every layer's output])."""
  def call(layer, h, rngs):
    h = layer(h, key_mask, kv=kv, deterministic=deterministic, rngs=rngs)
    return h, h
  return layer_stack.apply_layers(layers, call, x, rngs=rngs, remat=remat, scan=scan,
                                  outputs=True)


class MlmHead(nnx.Module):
  """BERT `cls.predictions`: dense, GELU, LN, then the tied decoder plus its own bias."""

  def __init__(self, cfg_text, *, dtype=None, rngs: nnx.Rngs):
    d = cfg_text.width
    self.dtype = dtype
    self.dense = L.linear(d, d, dtype=dtype, rngs=rngs)
    self.layer_norm = L.layer_norm(d, eps=cfg_text.layer_norm_eps, dtype=dtype, rngs=rngs)
    self.bias = nnx.Param(jnp.zeros((cfg_text.vocab_size,), jnp.float32))

  def __call__(self, hidden, word_embeddings):
    """hidden [B, L, D], word_embeddings [V, D] (the tied decoder) -> logits [B, L, V]."""
    h = self.layer_norm(L.gelu(self.dense(hidden)))
    dtype = self.dtype or h.dtype
    logits = jnp.einsum("bld,vd->blv", h.astype(dtype), word_embeddings.astype(dtype))
    return logits + self.bias[...].astype(dtype)


class TextEncoder(nnx.Module):
  """BERT embeddings + layers 0..fusion_layer-1, and the MLM head.

  Attributes:
    embeddings: BertEmbeddings.
    layers: nnx.List of `fusion_layer` BertLayers (self-attention + FFN).
    mlm_head: MlmHead; its decoder is `embeddings.word_embeddings.embedding`.
  """

  def __init__(self, cfg_text, *, dtype=None, remat="none", scan_layers: bool = False,
               attention_impl: str = "auto", rngs: nnx.Rngs):
    dtype = L.as_dtype(dtype)
    self.dtype = dtype
    self.remat = layer_stack.normalize_remat(remat)
    self.scan_layers = bool(scan_layers)
    self.embeddings = BertEmbeddings(cfg_text, dtype=dtype, rngs=rngs)
    self.layers = nnx.List([
        BertLayer(cfg_text, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
        for _ in range(cfg_text.fusion_layer)])
    self.mlm_head = MlmHead(cfg_text, dtype=dtype, rngs=rngs)

  def __call__(self, input_ids, attention_mask, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, token_type_ids=None):
    """input_ids, attention_mask [B, L] -> (hidden [B, L, D], aux).

    `hidden` is the output of layer fusion_layer-1 (the VTC text feature is its [CLS]).
    aux['hidden_states']: tuple of fusion_layer + 1 arrays [B, L, D], the embeddings
    output then each layer's output (as Hugging Face's `output_hidden_states`).
    """
    key_mask = attention_mask.astype(bool)
    embedded = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)
    x, outputs = apply_bert_layers(self.layers, embedded, key_mask, deterministic=deterministic,
                                   rngs=rngs, remat=self.remat, scan=self.scan_layers)
    return x, {"hidden_states": (embedded,) + tuple(outputs)}

  def mlm_logits(self, hidden):
    """hidden [B, L, D] (text encoder or fusion output) -> MLM logits [B, L, V]."""
    return self.mlm_head(hidden, self.embeddings.word_embeddings.embedding[...])
