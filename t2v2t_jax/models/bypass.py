"""The paper's T2V bypass cross-attention (and the naive T2V variant of its ablation).

Poster, "Text-to-Video Fusion":

    F_T2V[i] = X-Attn(F_V[i], F_T || F_V[i])

"Bypass CA incorporates video features into keys and values to prevent modulation by
irrelevant text": every frame i's tokens F_V[i] (queries) attend to the text tokens F_T
*and to the frame's own tokens*, so a frame that is irrelevant to the sentence can attend
to itself instead of to the text. Frames never see each other. The naive T2V of the
poster's ablation (`bypass=False`) uses the text alone as keys/values.

Block form (SPEC 3, DECISION, `model.fusion.t2v_residual`):
  'gated' (default):
      x = F_V + gate * dropout(dense(MHA(q=LN_v(F_V), kv=LN_t(F_T) || LN_v(F_V))))
      x = x + ffn_gate * dropout(FFN(LN_ffn(x)))                       (if t2v_ffn)
    with `gate` and `ffn_gate` learnable scalars initialised to 0, so that at init the
    block is the identity and t2v2t == v2t exactly. LayerNorm acts per token, so
    LN(F_T || F_V) = LN(F_T) || LN(F_V); we give the text and the video tokens their own
    LN parameters (`text_norm`, `video_norm`) since they come from different encoders; both
    start as the identity affine map, i.e. as one shared LN.
  'post_ln': plain BERT post-LN residuals, no gates:
      x = LN(F_V + dropout(dense(MHA(q=F_V, kv=F_T || F_V))));  x = LN(x + dropout(FFN(x)))

Efficiency: the text keys/values are projected once ([B, L, H, hd]) and shared by all
frames (broadcast, never re-projected per frame). The fused-kernel path concatenates
them with each frame's own keys/values and runs one batched attention over B*T groups of
L + N keys; the explicit path (attention weights requested or attention dropout active)
computes text and self logits separately with einsums, so nothing is tiled there at all.
For the naive variant every frame has the same keys, so it is one attention from the
T*N video queries to the L text keys.

Parameter paths: attention.{query,key,value}.*, output.* (dense); gated: text_norm.*,
video_norm.*, gate, ffn_norm.*, ffn.{intermediate,output}.*, ffn_gate; post_ln:
output_norm.*, ffn.*, ffn_output_norm.*.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t2v2t_jax.models import layers as L
from t2v2t_jax.models.config import T2V_RESIDUALS, check_choice


class BypassCrossAttention(nnx.Module):
  """T2V block: each frame's tokens attend to the text (and, with the bypass, to themselves).

  Attributes:
    bypass: True = the paper's bypass CA (keys = text || frame i's tokens);
      False = 't2v2t_naive' (keys = text only).
    residual: 'gated' or 'post_ln' (see the module docstring).
    use_ffn: whether an FFN sub-block follows the attention.
    attention: MultiHeadAttention whose query/key/value projections are used here (the
      attention itself is computed by this block, per frame).
    output: the dense after the attention.
  """

  def __init__(self, width: int, num_heads: int, mlp_dim: int, *, eps: float,
               dropout_rate: float, bypass: bool = True, residual: str = "gated",
               use_ffn: bool = True, dtype=None, attention_impl: str = "auto", rngs: nnx.Rngs):
    check_choice("fusion.t2v_residual", residual, T2V_RESIDUALS)
    self.bypass = bool(bypass)
    self.residual = residual
    self.use_ffn = bool(use_ffn)
    self.dropout_rate = float(dropout_rate)
    self.dtype = dtype
    gated = residual == "gated"
    if gated:
      self.text_norm = L.layer_norm(width, eps=eps, dtype=dtype, rngs=rngs)
      self.video_norm = L.layer_norm(width, eps=eps, dtype=dtype, rngs=rngs)
    self.attention = L.MultiHeadAttention(
        width, width, num_heads, attn_dropout_rate=dropout_rate, dtype=dtype,
        attention_impl=attention_impl, rngs=rngs)
    self.output = L.linear(width, width, dtype=dtype, rngs=rngs)
    if gated:
      self.gate = nnx.Param(jnp.zeros((), jnp.float32))
    else:
      self.output_norm = L.layer_norm(width, eps=eps, dtype=dtype, rngs=rngs)
    if self.use_ffn:
      if gated:
        self.ffn_norm = L.layer_norm(width, eps=eps, dtype=dtype, rngs=rngs)
      self.ffn = L.FeedForward(width, mlp_dim, dtype=dtype, rngs=rngs)
      if gated:
        self.ffn_gate = nnx.Param(jnp.zeros((), jnp.float32))
      else:
        self.ffn_output_norm = L.layer_norm(width, eps=eps, dtype=dtype, rngs=rngs)

  def attend(self, video_q, text_kv, text_mask, *, deterministic: bool,
             rngs: nnx.Rngs | None, return_weights: bool = False):
    """Per-frame attention, before the output dense.

    Args:
      video_q: [B, T, N, D] frame tokens: the queries and (with the bypass) the frame's
        own keys/values.
      text_kv: [B, L, D] text tokens (keys/values shared by every frame).
      text_mask: [B, L], nonzero/True for real text tokens; padding is masked out.
      return_weights: also return the attention probabilities.

    Returns:
      context [B, T, N, D]; with return_weights also weights float32 [B, T, H, N, K],
      K = L + N with the text keys first then frame i's own N tokens (bypass), or K = L
      (naive). weights[..., :L].sum(-1) is the attention mass each query puts on the text.
    """
    mha = self.attention
    b, t, n, _ = video_q.shape
    lt = text_kv.shape[1]
    h, hd = mha.num_heads, mha.head_dim
    text_mask = text_mask.astype(bool)
    q = mha.query(video_q).reshape(b, t, n, h, hd)
    k_text = mha.key(text_kv).reshape(b, lt, h, hd)
    v_text = mha.value(text_kv).reshape(b, lt, h, hd)
    if self.bypass:
      k_self = mha.key(video_q).reshape(b, t, n, h, hd)
      v_self = mha.value(video_q).reshape(b, t, n, h, hd)

    dropout_active = mha.attn_dropout_rate > 0.0 and not deterministic
    if not (return_weights or dropout_active or mha.attention_impl == "explicit"):
      impl = None if mha.attention_impl == "auto" else mha.attention_impl
      if self.bypass:
        # Keys per frame: the shared text keys (broadcast, projected once) || own tokens.
        k = jnp.concatenate([jnp.broadcast_to(k_text[:, None], (b, t, lt, h, hd)), k_self], 2)
        v = jnp.concatenate([jnp.broadcast_to(v_text[:, None], (b, t, lt, h, hd)), v_self], 2)
        mask = jnp.concatenate([jnp.broadcast_to(text_mask[:, None, :], (b, t, lt)),
                                jnp.ones((b, t, n), bool)], axis=-1)
        ctx = jax.nn.dot_product_attention(
            q.reshape(b * t, n, h, hd), k.reshape(b * t, lt + n, h, hd),
            v.reshape(b * t, lt + n, h, hd), mask=mask.reshape(b * t, 1, 1, lt + n),
            implementation=impl)
      else:
        # Every frame has the same keys (the text): one attention from all T*N queries.
        ctx = jax.nn.dot_product_attention(
            q.reshape(b, t * n, h, hd), k_text, v_text, mask=text_mask[:, None, None, :],
            implementation=impl)
      return ctx.reshape(b, t, n, h * hd)

    # Explicit path: float32 softmax over [text keys || own keys], probability dropout.
    scale = hd ** -0.5
    logits = jnp.einsum("btnhd,blhd->bthnl", q, k_text).astype(jnp.float32) * scale
    logits = jnp.where(text_mask[:, None, None, None, :], logits, jnp.finfo(jnp.float32).min)
    if self.bypass:
      logits_self = jnp.einsum("btnhd,btmhd->bthnm", q, k_self).astype(jnp.float32) * scale
      logits = jnp.concatenate([logits, logits_self], axis=-1)
    weights = jax.nn.softmax(logits, axis=-1)
    probs = L.dropout(weights, mha.attn_dropout_rate, deterministic=deterministic, rngs=rngs)
    probs = probs.astype(v_text.dtype)
    ctx = jnp.einsum("bthnl,blhd->btnhd", probs[..., :lt], v_text)
    if self.bypass:
      ctx = ctx + jnp.einsum("bthnm,btmhd->btnhd", probs[..., lt:], v_self)
    ctx = ctx.reshape(b, t, n, h * hd)
    return (ctx, weights) if return_weights else ctx

  def __call__(self, text, text_mask, video, *, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, return_weights: bool = False):
    """text [B, L, D], text_mask [B, L], video [B, T, N, D] -> (F_T2V [B, T, N, D], weights).

    `weights` is None unless return_weights (then as in `attend`).

    Training (deterministic=False) runs the block one frame at a time, each frame
    recomputed in the backward pass. Why: the block's activations over all frames at once
    are the largest tensors of the training step (its attention scores [B, T, H, N, L + N]
    and FFN activations [B, T, N, 4D] over the 3 x 64 VTM pairs of a v5e chip at 4
    frames: 0.9-1.7 GB each), and a frame's are 1/T of that. The frames are independent
    (every token attends to the text and its own frame, the rest is per token), so the
    result is the same; each frame draws its dropout from its own key.
    """
    text_in = self.text_norm(text) if self.residual == "gated" else text
    if deterministic:
      return self._block(text_in, text_mask, video, deterministic=True, rngs=None,
                         return_weights=return_weights)
    t = video.shape[1]
    keys = None if rngs is None else jax.random.split(rngs.dropout(), t)

    @jax.checkpoint
    def one_frame(_, xs):
      frame, key = xs
      out, weights = self._block(text_in, text_mask, frame[:, None], deterministic=False,
                                 rngs=None if key is None else nnx.Rngs(dropout=key),
                                 return_weights=return_weights)
      return None, (out[:, 0], None if weights is None else weights[:, 0])

    _, (out, weights) = jax.lax.scan(one_frame, None, (jnp.swapaxes(video, 0, 1), keys))
    return jnp.swapaxes(out, 0, 1), None if weights is None else jnp.swapaxes(weights, 0, 1)

  def _block(self, text_in, text_mask, video, *, deterministic: bool, rngs: nnx.Rngs | None,
             return_weights: bool):
    """The block over all of `video`'s frames at once (`text_in`: normed when gated)."""
    def drop(y):
      return L.dropout(y, self.dropout_rate, deterministic=deterministic, rngs=rngs)

    gated = self.residual == "gated"
    video_in = self.video_norm(video) if gated else video
    out = self.attend(video_in, text_in, text_mask, deterministic=deterministic, rngs=rngs,
                      return_weights=return_weights)
    ctx, weights = out if return_weights else (out, None)
    y = drop(self.output(ctx))
    if gated:
      x = video + self.gate[...].astype(y.dtype) * y
    else:
      x = self.output_norm(video + y)
    if self.use_ffn:
      if gated:
        y = drop(self.ffn(self.ffn_norm(x)))
        x = x + self.ffn_gate[...].astype(y.dtype) * y
      else:
        x = self.ffn_output_norm(x + drop(self.ffn(x)))
    return x, weights
