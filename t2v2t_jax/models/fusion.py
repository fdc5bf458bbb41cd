"""Fusion encoder (BERT layers fusion_layer..num_layers-1) and the four fusion modes.

`model.fusion.mode` (SPEC 3):
  'v2t'          VindLU: each layer = self-attention over the text, cross-attention from the
                 text to all video tokens (flattened to [B, T*N, Dv], all unmasked), FFN.
  't2v2t'        the paper: a T2V bypass block (`bypass.BypassCrossAttention`) first
                 updates every frame's tokens, F_T2V[i] = X-Attn(F_V[i], F_T || F_V[i]);
                 the V2T layers then attend to F_T2V (all frames).
  't2v2t_naive'  as 't2v2t' but the T2V keys/values are the text alone.
  'joint'        text || video tokens through self-attention layers (text padding masked);
                 the text part is returned.

Options (DECISIONS, `model.fusion.*`):
  t2v_placement 'once': one T2V block (`t2v`) applied to the video tokens with the text
    state given to the fusion encoder (the layer fusion_layer-1 output).
    'per_layer': one T2V block per fusion layer (`t2v_blocks.{i}`), fed with that layer's
    text state as it enters the V2T cross-attention sub-block (after the self-attention in
    the 'vindlu' order, the layer input in 'cross_first'); every layer's block starts
    from the video encoder's tokens (the video stream does not accumulate across layers).
  layer_order 'vindlu' (self, cross, FFN) | 'cross_first' (cross, self, FFN).
  t2v_residual 'gated' (gates at 0: t2v2t == v2t at init) | 'post_ln'; t2v_ffn.
  keep_frame_cls: False drops each frame's token 0 before any fusion.

Parameter paths:
  layers.{i}.attention.*, .attention_output.*, .crossattention.*, .crossattention_output.*,
  .ffn.*, .ffn_layer_norm.*  (no crossattention* in 'joint'); i = 0 is BERT layer
  fusion_layer. 't2v2t'/'t2v2t_naive': t2v.* ('once') or t2v_blocks.{i}.* ('per_layer').
"""

from __future__ import annotations

import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from t2v2t_jax.models import layer_stack
from t2v2t_jax.models import layers as L
from t2v2t_jax.models.bypass import BypassCrossAttention
from t2v2t_jax.models.config import validate_model_config
from t2v2t_jax.models.text_encoder import BertLayer, apply_bert_layers

T2V_MODES = ("t2v2t", "t2v2t_naive")


def _layer_with_t2v(layer, block, x, key_mask, video, *, deterministic, rngs, return_weights):
  """One fusion layer whose V2T keys/values come from its own T2V block ('per_layer')."""
  video_t2v, weights = None, None
  for sub_block in layer.order:
    if sub_block == "self":
      x = layer.self_attention_block(x, key_mask, deterministic=deterministic, rngs=rngs)
    elif sub_block == "cross":
      video_t2v, weights = block(x, key_mask, video, deterministic=deterministic, rngs=rngs,
                                 return_weights=return_weights)
      x = layer.cross_attention_block(x, rearrange(video_t2v, "b t n d -> b (t n) d"),
                                      deterministic=deterministic, rngs=rngs)
    else:
      x = layer.ffn_block(x, deterministic=deterministic, rngs=rngs)
  return x, video_t2v, weights


class _LayerAndBlock(nnx.Module):
  """A fusion layer with its T2V block, as one unit of a scanned stack ('per_layer').

  Made at call time around the stored `layers[i]` and `t2v_blocks[i]`; it owns no
  parameters of its own, so the parameter paths stay `layers.{i}.*`, `t2v_blocks.{i}.*`.
  """

  def __init__(self, layer, block):
    self.layer = layer
    self.block = block


class FusionEncoder(nnx.Module):
  """BERT layers fusion_layer..num_layers-1 fusing text with video tokens.

  Attributes:
    mode, t2v_placement, keep_frame_cls: from `model.fusion`.
    layers: nnx.List of num_layers - fusion_layer BertLayers (with cross-attention to
      `model.vision.width`-wide tokens, except in 'joint').
    t2v / t2v_blocks: the T2V bypass block(s) in 't2v2t' and 't2v2t_naive'.
  """

  def __init__(self, model_cfg, *, dtype=None, remat="none", scan_layers: bool = False,
               attention_impl: str = "auto", rngs: nnx.Rngs):
    cfg_t, cfg_f = model_cfg.text, model_cfg.fusion
    dtype = L.as_dtype(dtype)
    validate_model_config(model_cfg)
    self.mode = cfg_f.mode
    self.t2v_placement = cfg_f.t2v_placement
    self.keep_frame_cls = bool(cfg_f.keep_frame_cls)
    self.remat = layer_stack.normalize_remat(remat)
    self.scan_layers = bool(scan_layers)
    num_layers = cfg_t.num_layers - cfg_t.fusion_layer
    kv_features = None if self.mode == "joint" else model_cfg.vision.width
    self.layers = nnx.List([
        BertLayer(cfg_t, kv_features=kv_features, layer_order=cfg_f.layer_order, dtype=dtype,
                  attention_impl=attention_impl, rngs=rngs)
        for _ in range(num_layers)])
    if self.mode in T2V_MODES:
      def make_block():
        return BypassCrossAttention(
            cfg_t.width, cfg_t.num_heads, cfg_t.mlp_dim, eps=cfg_t.layer_norm_eps,
            dropout_rate=cfg_t.dropout_rate, bypass=self.mode == "t2v2t",
            residual=cfg_f.t2v_residual, use_ffn=cfg_f.t2v_ffn, dtype=dtype,
            attention_impl=attention_impl, rngs=rngs)
      if self.t2v_placement == "once":
        self.t2v = make_block()
      else:
        self.t2v_blocks = nnx.List([make_block() for _ in range(num_layers)])

  def __call__(self, text_hidden, text_mask, video_tokens, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, return_aux: bool = False):
    """Fuse text with video.

    Args:
      text_hidden: [B, L, Dt], the text encoder output (layer fusion_layer-1).
      text_mask: [B, L], nonzero for real tokens (padding is masked everywhere).
      video_tokens: [V, T, N, Dv], the video encoder's tokens (N includes each frame's
        CLS; it is dropped here when keep_frame_cls=False). V = B, or B = k V: the k
        consecutive texts k v .. k v + k - 1 fuse with video v. In 'v2t' the k texts
        share the video's cross-attention keys and values, computed once (training fuses
        a video with its caption, a negative caption and its masked caption); the other
        modes fuse each text with its own copy of the video.
      return_aux: also return the T2V attention (t2v modes).

    Returns:
      (fused [B, L, Dt], aux). aux['hidden_states']: the input then every layer's text
      output. With return_aux in 't2v2t'/'t2v2t_naive', one entry per T2V block (1 for
      'once', one per layer for 'per_layer'):
        aux['t2v_attention']: tuple of float32 [B, T, H, N', K] attention probabilities
          of frame tokens (N' per frame after the optional CLS drop) over K keys: the
          L text keys first, then (t2v2t only) the frame's own N' tokens, K = L + N';
          naive: K = L. `w[..., :aux['t2v_text_keys']].sum(-1)` = mass on the text.
        aux['t2v_video']: tuple of F_T2V [B, T, N', Dv].
        aux['t2v_text_keys']: L.
    """
    key_mask = text_mask.astype(bool)
    if not self.keep_frame_cls:
      video_tokens = video_tokens[:, :, 1:]
    texts_per_video, rest = divmod(text_hidden.shape[0], video_tokens.shape[0])
    if rest:
      raise ValueError(f"{text_hidden.shape[0]} texts do not share {video_tokens.shape[0]} "
                       f"videos evenly (k texts a video)")
    if texts_per_video > 1 and self.mode != "v2t":
      # The T2V block changes each pair's video with its text; joint attention mixes them.
      video_tokens = jnp.repeat(video_tokens, texts_per_video, axis=0)
    b, t, n, _ = video_tokens.shape
    lt = text_hidden.shape[1]
    x = text_hidden
    t2v_weights, t2v_video = [], []
    stack_kw = dict(rngs=rngs, remat=self.remat, scan=self.scan_layers)

    if self.mode == "joint":
      video_flat = rearrange(video_tokens, "b t n d -> b (t n) d").astype(x.dtype)
      seq = jnp.concatenate([x, video_flat], axis=1)
      seq_mask = jnp.concatenate([key_mask, jnp.ones((b, t * n), bool)], axis=1)
      seq, outputs = apply_bert_layers(self.layers, seq, seq_mask, deterministic=deterministic,
                                       **stack_kw)
      x = seq[:, :lt]
      layer_outputs = [o[:, :lt] for o in outputs]

    elif self.mode == "v2t" or self.t2v_placement == "once":
      if self.mode in T2V_MODES:
        def call_t2v(block, video, rngs):
          return block(x, key_mask, video, deterministic=deterministic, rngs=rngs,
                       return_weights=return_aux)
        video_tokens, weights = layer_stack.apply_layer(self.t2v, call_t2v, video_tokens,
                                                        rngs=rngs, remat=self.remat)
        t2v_weights.append(weights)
        t2v_video.append(video_tokens)
      kv = rearrange(video_tokens, "b t n d -> b (t n) d")
      x, layer_outputs = apply_bert_layers(self.layers, x, key_mask, kv=kv,
                                           deterministic=deterministic, **stack_kw)

    else:  # T2V inside every fusion layer
      def call_pair(pair, x, rngs):
        x, video_t2v, weights = _layer_with_t2v(
            pair.layer, pair.block, x, key_mask, video_tokens, deterministic=deterministic,
            rngs=rngs, return_weights=return_aux)
        # The T2V outputs leave the stack only when asked for (scanned, they would be
        # stacked per layer).
        return x, ((x, video_t2v, weights) if return_aux else (x, None, None))
      pairs = [_LayerAndBlock(layer, block) for layer, block in zip(self.layers, self.t2v_blocks)]
      x, outputs = layer_stack.apply_layers(pairs, call_pair, x, outputs=True, **stack_kw)
      layer_outputs = [o[0] for o in outputs]
      t2v_video = [o[1] for o in outputs]
      t2v_weights = [o[2] for o in outputs]

    hidden_states = [text_hidden] + list(layer_outputs)
    aux = {"hidden_states": tuple(hidden_states)}
    if return_aux and self.mode in T2V_MODES:
      aux["t2v_attention"] = tuple(t2v_weights)
      aux["t2v_video"] = tuple(t2v_video)
      aux["t2v_text_keys"] = lt
    return x, aux
