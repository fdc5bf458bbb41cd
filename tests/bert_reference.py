"""Test helpers shared by the text-encoder and fusion tests: a float64 NumPy reference of
BERT's post-LN layer (written from the BERT paper and transformers' BertLayer, not from
our modules), and one-program jit wrappers that keep the tiny models' tests fast."""

import jax
import numpy as np
from flax import nnx
from scipy.special import erf

from t2v2t_jax.checkpoints.params import assign_into, flatten_params


# -- a float64 numpy reference of one post-LN BERT layer -----------------------------------------

def ln(x, p, eps=1e-12):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def dense(x, p):
  return x @ p["kernel"] + p["bias"]


def gelu(x):
  return 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))


def mha(xq, xkv, key_mask, p, heads):
  q, k, v = dense(xq, p["query"]), dense(xkv, p["key"]), dense(xkv, p["value"])
  hd = q.shape[-1] // heads
  split = lambda t: t.reshape(t.shape[0], heads, hd).transpose(1, 0, 2)  # noqa: E731
  q, k, v = split(q), split(k), split(v)
  logits = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
  if key_mask is not None:
    logits = np.where(key_mask[None, None, :], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  return (w @ v).transpose(1, 0, 2).reshape(xq.shape[0], -1), w


def nested(flat, prefix):
  """{'a.b.c': x} -> nested dicts under `prefix`, as float64 numpy."""
  out = {}
  for key, value in flat.items():
    if not key.startswith(prefix):
      continue
    node = out
    parts = key[len(prefix):].split(".")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = np.asarray(value, np.float64)
  return out


def ref_bert_layer(p, x, key_mask, heads, kv=None, order=("self", "cross", "ffn")):
  """One sequence: x [L, D], key_mask [L] bool, kv [S, Dkv] or None."""
  for block in order:
    if block == "self":
      ctx, _ = mha(x, x, key_mask, p["attention"], heads)
      x = ln(x + dense(ctx, p["attention_output"]["dense"]), p["attention_output"]["layer_norm"])
    elif block == "cross" and kv is not None:
      ctx, _ = mha(x, kv, None, p["crossattention"], heads)
      x = ln(x + dense(ctx, p["crossattention_output"]["dense"]),
             p["crossattention_output"]["layer_norm"])
    elif block == "ffn":
      y = dense(gelu(dense(x, p["ffn"]["intermediate"])), p["ffn"]["output"])
      x = ln(x + y, p["ffn_layer_norm"])
  return x


def randomize(module, seed=0, scale=0.3):
  """Non-trivial values for every param (LayerNorms and biases included)."""
  rng = np.random.default_rng(seed)
  flat = flatten_params(module)
  new = {}
  for key, value in flat.items():
    noise = rng.normal(size=value.shape).astype(np.float32) * scale
    new[key] = np.asarray(value) + noise
  assign_into(module, new)


def flat_state(state):
  """An nnx.State (e.g. gradients) as {dotted path: numpy array}."""
  return {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(state)}


# XLA:CPU's backend optimisation dominates compile time of these tiny fwd+bwd programs
# (about 4x); level 0 keeps the tests fast and changes no semantics.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def jit_apply(model, *args, **static_kwargs):
  """`model(*args, **static_kwargs)` as one compiled program: much faster here than eager
  dispatch of hundreds of tiny ops, each compiled on first use."""
  graphdef, state = nnx.split(model)

  def apply(state, *args):
    return nnx.merge(graphdef, state)(*args, **static_kwargs)

  return jax.jit(apply, compiler_options=FAST_COMPILE)(state, *args)


def jit_value_and_grad(model, loss_fn, seed=7):
  """jax.jit(value_and_grad) of `loss_fn(model, rngs)` w.r.t. the model's params, with
  dropout drawn from `nnx.Rngs(dropout=key(seed))`. Returns (loss, {path: grad})."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def step(params, key):
    def inner(params):
      return loss_fn(nnx.merge(graphdef, params, rest), nnx.Rngs(dropout=key))
    return jax.value_and_grad(inner)(params)

  loss, grads = jax.jit(step, compiler_options=FAST_COMPILE)(params, jax.random.key(seed))
  return loss, flat_state(grads)
