"""Building blocks shared by the video, text and fusion encoders.

Conventions used by every module in `t2v2t_jax.models`:
- Parameters are float32; `dtype` is the compute dtype (bf16 on accelerators).
- Calls take `deterministic: bool` and `rngs: nnx.Rngs | None`; dropout and stochastic
  depth draw from the `dropout` stream, so the caller owns all randomness (the train step
  builds `nnx.Rngs(dropout=key)` from a step-folded key).
- Attention output projections are not part of `MultiHeadAttention`: BERT and BEiT keep
  them in an `output` sub-module with their own LayerNorm, and so do we, so that weight
  import maps one source module to one of ours.
- Dense layers, LayerNorm, GELU and the biased attention of the video layers take the
  forms of `cpu_ops` when JAX's backend is the CPU (same mathematics, a faster train step
  on XLA:CPU) and their portable forms (flax, `jax.nn`) on GPU and TPU (unless an op is
  named in `cpu_ops.ACCELERATOR_FORMS`, empty: measured there, no form helped).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from t2v2t_jax.models import cpu_ops

DEFAULT_INIT = jax.nn.initializers.normal(stddev=0.02)  # BERT/BEiT/VindLU initialiser for new weights


def as_dtype(name: str | jnp.dtype | None) -> jnp.dtype | None:
  if name is None:
    return None
  return jnp.dtype(name)


class Linear(nnx.Linear):
  """nnx.Linear (same parameters, same paths) whose product is `cpu_ops.dense` on a CPU."""

  def __call__(self, inputs, out_sharding=None):
    def portable(x):
      return super(Linear, self).__call__(x, out_sharding=out_sharding)

    def cpu(x):
      kernel = self.kernel[...]
      bias = self.bias[...] if self.bias is not None else None
      dtype = self.dtype or jnp.result_type(x.dtype, kernel.dtype)
      return cpu_ops.dense_nd(x.astype(dtype), kernel.astype(dtype),
                              None if bias is None else bias.astype(dtype))

    if out_sharding is not None:
      return portable(inputs)
    return cpu_ops.per_backend(inputs, cpu=cpu, default=portable, name="dense")


class LayerNorm(nnx.LayerNorm):
  """nnx.LayerNorm (same parameters, same paths) computed by `cpu_ops.layer_norm` on a CPU."""

  def __call__(self, x, *, mask=None):
    def portable(x):
      return super(LayerNorm, self).__call__(x, mask=mask)

    def cpu(x):
      # Statistics in float32 whatever the compute dtype, as flax computes them.
      y = cpu_ops.layer_norm(x.astype(jnp.float32), self.scale[...].astype(jnp.float32),
                             self.bias[...].astype(jnp.float32), self.epsilon)
      return y.astype(self.dtype or jnp.result_type(x.dtype, self.scale[...].dtype))

    if mask is not None:
      return portable(x)
    return cpu_ops.per_backend(x, cpu=cpu, default=portable, name="layer_norm")


def linear(in_features: int, out_features: int, *, rngs: nnx.Rngs, use_bias: bool = True,
           dtype=None, kernel_init=DEFAULT_INIT) -> Linear:
  """Linear with the project's initialiser (normal 0.02, zero bias) and float32 params."""
  return Linear(in_features, out_features, use_bias=use_bias, dtype=dtype,
                param_dtype=jnp.float32, kernel_init=kernel_init, rngs=rngs)


def layer_norm(features: int, *, eps: float, rngs: nnx.Rngs, dtype=None) -> LayerNorm:
  # use_fast_variance=False: E[(x-mean)^2] as PyTorch computes it, for 1e-4 parity.
  return LayerNorm(features, epsilon=eps, dtype=dtype, param_dtype=jnp.float32,
                   use_fast_variance=False, rngs=rngs)


def gelu(x):
  """Exact GELU (BERT, BEiT): `cpu_ops.gelu` on a CPU, `jax.nn.gelu` elsewhere."""
  return cpu_ops.per_backend(x, cpu=cpu_ops.gelu,
                             default=lambda x: jax.nn.gelu(x, approximate=False), name="gelu")


def drop_path(x, rate, *, deterministic: bool, rngs: nnx.Rngs | None):
  """Stochastic depth: drop the whole residual branch per sample (leading axis).

  `rate` is a Python float or a traced scalar (a scanned layer stack passes each layer's
  rate as data, so that all layers share one compiled body). A key is drawn in training
  mode whatever the rate, so that the draws that follow are the same whether a zero rate
  arrives as a Python 0.0 (unrolled layers) or as data (scanned layers).
  """
  if deterministic:
    return x
  if rngs is None:
    raise ValueError("drop_path needs rngs when deterministic=False")
  key = rngs.dropout()
  if isinstance(rate, (int, float)) and rate == 0.0:
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  shape = (x.shape[0],) + (1,) * (x.ndim - 1)
  mask = jax.random.bernoulli(key, keep, shape)
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def dropout(x, rate: float, *, deterministic: bool, rngs: nnx.Rngs | None):
  """Functional dropout drawing from the `dropout` stream (no module state needed)."""
  if rate == 0.0 or deterministic:
    return x
  if rngs is None:
    raise ValueError("dropout needs rngs when deterministic=False")
  keep = 1.0 - rate
  mask = jax.random.bernoulli(rngs.dropout(), keep, x.shape)
  return jnp.where(mask, x / keep, jnp.zeros_like(x))


class MultiHeadAttention(nnx.Module):
  """q/k/v projections plus scaled dot-product attention (no output projection).

  Attributes:
    query, key, value: nnx.Linear projections (`key` may have no bias, as in BEiT).
    num_heads: number of heads; head_dim = projected width / num_heads.
    attn_dropout_rate: dropout on attention probabilities (BERT: 0.1).
    attention_impl: 'auto' | 'xla' | 'cudnn' | 'explicit'. The fused
      `jax.nn.dot_product_attention` is used unless attention dropout is active, weights
      are requested, or 'explicit' is chosen.
  """

  def __init__(self, q_features: int, kv_features: int, num_heads: int, *,
               rngs: nnx.Rngs, out_features: int | None = None,
               qkv_bias: tuple[bool, bool, bool] = (True, True, True),
               attn_dropout_rate: float = 0.0, dtype=None, attention_impl: str = "auto"):
    out_features = out_features or q_features
    if out_features % num_heads:
      raise ValueError(f"attention width {out_features} not divisible by {num_heads} heads")
    self.num_heads = num_heads
    self.head_dim = out_features // num_heads
    self.attn_dropout_rate = float(attn_dropout_rate)
    self.attention_impl = attention_impl
    self.dtype = dtype
    self.query = linear(q_features, out_features, use_bias=qkv_bias[0], dtype=dtype, rngs=rngs)
    self.key = linear(kv_features, out_features, use_bias=qkv_bias[1], dtype=dtype, rngs=rngs)
    self.value = linear(kv_features, out_features, use_bias=qkv_bias[2], dtype=dtype, rngs=rngs)

  def __call__(self, x_q, x_kv, *, bias=None, key_mask=None, deterministic: bool = True,
               rngs: nnx.Rngs | None = None, return_weights: bool = False):
    """Attend from `x_q` [B, Lq, Dq] to `x_kv` [B, Lk, Dk].

    Args:
      bias: additive bias broadcastable to [B, H, Lq, Lk] (BEiT relative position bias).
      key_mask: bool [B, Lk], True where a key may be attended (text padding is False).
      return_weights: also return the attention probabilities [B, H, Lq, Lk] (float32).

    Returns:
      context [B, Lq, H * head_dim], or (context, weights) if return_weights.
    """
    b, lq, _ = x_q.shape
    lk = x_kv.shape[1]
    q = self.query(x_q).reshape(b, lq, self.num_heads, self.head_dim)
    k = self.key(x_kv).reshape(b, lk, self.num_heads, self.head_dim)
    v = self.value(x_kv).reshape(b, lk, self.num_heads, self.head_dim)

    attn_dropout_active = self.attn_dropout_rate > 0.0 and not deterministic
    explicit = return_weights or attn_dropout_active or self.attention_impl == "explicit"
    if not explicit:
      mask = None if key_mask is None else key_mask[:, None, None, :].astype(bool)
      impl = None if self.attention_impl == "auto" else self.attention_impl
      if bias is not None:
        bias = bias.astype(q.dtype)

      def portable(q, k, v, bias):
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, implementation=impl)

      if bias is not None and bias.shape[0] == 1 and mask is None and impl is None:
        # BEiT's relative position bias, shared by every frame.
        ctx = cpu_ops.per_backend(q, k, v, bias, cpu=cpu_ops.attention_shared_bias,
                                  default=portable, name="attention")
      else:
        ctx = portable(q, k, v, bias)
      return ctx.reshape(b, lq, self.num_heads * self.head_dim)

    # Explicit path: softmax in float32, attention-probability dropout, optional weights.
    scale = self.head_dim ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    if bias is not None:
      logits = logits + bias.astype(jnp.float32)
    if key_mask is not None:
      big_neg = jnp.finfo(jnp.float32).min
      logits = jnp.where(key_mask[:, None, None, :].astype(bool), logits, big_neg)
    weights = jax.nn.softmax(logits, axis=-1)
    probs = dropout(weights, self.attn_dropout_rate, deterministic=deterministic, rngs=rngs)
    ctx = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    ctx = ctx.reshape(b, lq, self.num_heads * self.head_dim)
    return (ctx, weights) if return_weights else ctx


class FeedForward(nnx.Module):
  """Dense -> exact GELU -> dense (BERT `intermediate` + `output.dense`, BEiT MLP)."""

  def __init__(self, features: int, hidden: int, *, rngs: nnx.Rngs, dtype=None):
    self.intermediate = linear(features, hidden, dtype=dtype, rngs=rngs)
    self.output = linear(hidden, features, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.output(gelu(self.intermediate(x)))
