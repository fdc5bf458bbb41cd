"""Forms of the model's basic ops that XLA:CPU runs faster, chosen per backend.

Same mathematics as the portable forms in `layers.py`, written so that the CPU compiler
gets what it handles well. Measured on the project's 2-core CPU at the TARGETS.md small
size (docs/benchmarks.md, "CPU: side by side with VindLU"), each against the portable form
in one process:
  - `dense`: matrix products on 2-D `[tokens, width]` operands with a hand-written
    backward pass. The bias gradient is a product with a vector of ones: XLA:CPU lowered
    the reduction over tokens it gets from autodiff into slow loop fusions.
  - `layer_norm`: the backward pass from the saved normalised input and 1/std, instead
    of autodiff's chain through mean and variance (recomputed inside several fusions).
  - `gelu`: exact GELU with erf (as PyTorch computes it) and a backward pass from the
    saved input; `jax.nn.gelu(approximate=False)` goes through erfc, whose expansion
    XLA:CPU evaluates with an exponential per element in both passes.
  - `attention_shared_bias`: attention with a bias shared by all groups (BEiT's relative
    position bias), heads-major: the bias gradient is a product with ones, not XLA's
    reduction over the 16 frames of a [16, heads, 197, 197] tensor (11 ms a layer alone).
Together, small-size v2t train step on one core: 1.48 -> 1.20 CPU s a step (-19%; the
demo recipe's step -17%).

`per_backend(args, cpu=..., default=...)` picks the CPU form when JAX's default backend
is the CPU and the portable form otherwise, at trace time: a GPU or TPU run traces
the portable program (`ACCELERATOR_FORMS`, empty, can add CPU forms op by op).
(`jax.lax.platform_dependent`, which decides at lowering time, was tried: its
conditional's autodiff kept zero-filled residuals of the unused branch in the TPU
program, 29 extra copies at test size.) Code that compiles for another
platform than the host's (the TPU fit planner on a CPU host) traces inside
`portable_forms()`, which also lets tests and benchmarks compare the two forms on a CPU.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax
import jax.numpy as jnp

SQRT_HALF = 0.7071067811865476
INV_SQRT_2PI = 0.3989422804014327


_state = threading.local()


@contextlib.contextmanager
def portable_forms():
  """Trace what an accelerator traces (the portable forms, and the CPU forms of the ops in
  `ACCELERATOR_FORMS`) on every backend, the CPU included, inside this block."""
  with _thread_setting("portable", True):
    yield


def cpu_forms_active() -> bool:
  """Whether code traced now takes the CPU forms."""
  return not getattr(_state, "portable", False) and jax.default_backend() == "cpu"


# The ops whose CPU form a program traced for an accelerator takes as well (names as
# passed to `per_backend`; `accelerator_forms` overrides it for one block). Empty: the
# accelerator programs are the portable ones. Measured for issue 26 with
# benchmarks/bytes_probe.py on TPU v5e programs (bf16, full remat, 8 clips x 4 frames):
# on one paper-width video layer (fwd + bwd) XLA's bytes accessed went 7.91 GB ->
# layer_norm 7.63, gelu 7.81, both 7.52, dense 10.01 (temps 0.37 -> 0.54), attention
# (heads-major, bias gradient as a product) 1.065 -> 1.057 GB for the attention alone once
# its scores stay float32. On the whole proxy train step (2 + 2 + 1 layers) the LayerNorm
# form left the bytes unchanged (458.53 -> 458.58 GB; the kernels' operands and results
# 27.47 -> 27.46 GB), cut fusions 1354 -> 1248 and top-level reductions 17 -> 4, and
# raised the temporaries 0.97 -> 1.00 GiB: not taken, nor the others.
ACCELERATOR_FORMS: frozenset = frozenset()
FORM_NAMES = ("dense", "layer_norm", "gelu", "attention")


@contextlib.contextmanager
def accelerator_forms(names):
  """Inside this block, accelerator programs take the CPU forms of the ops `names` (and
  the portable forms of the others): `accelerator_forms(())` traces the programs as they
  were before `ACCELERATOR_FORMS`.

  Why: issue 26 measures each form on the compiled TPU program (benchmarks/bytes_probe.py
  `--forms`); this selects them per op without touching the defaults.
  """
  names = frozenset(names)
  unknown = names - set(FORM_NAMES)
  if unknown:
    raise ValueError(f"unknown op forms {sorted(unknown)}: expected some of {FORM_NAMES}")
  with _thread_setting("accel", names):
    yield


@contextlib.contextmanager
def _thread_setting(name: str, value):
  """`_state.<name> = value` inside the block (this thread only), the old value after."""
  previous = getattr(_state, name, None)
  setattr(_state, name, value)
  try:
    yield
  finally:
    setattr(_state, name, previous)


def per_backend(*args, cpu, default, name: str | None = None):
  """`cpu(*args)` when tracing for the CPU backend (or, for an op `name` chosen by
  `accelerator_forms`, for any backend), else `default(*args)`."""
  accel = getattr(_state, "accel", None)
  accel = ACCELERATOR_FORMS if accel is None else accel
  use_cpu = cpu_forms_active() or (name is not None and name in accel)
  return (cpu if use_cpu else default)(*args)


def _sum_rows(x):
  """Sum over the leading axis of a 2-D array, as a matrix product with ones."""
  return jnp.dot(jnp.ones((x.shape[0],), x.dtype), x)


# ----------------------------------------------------------------------------------------
# Dense layer on 2-D operands.
# ----------------------------------------------------------------------------------------

@jax.custom_vjp
def _dense_bias(x, kernel, bias):
  return jnp.dot(x, kernel) + bias


def _dense_bias_fwd(x, kernel, bias):
  return _dense_bias(x, kernel, bias), (x, kernel)


def _dense_bias_bwd(residuals, g):
  x, kernel = residuals
  return jnp.dot(g, kernel.T), jnp.dot(x.T, g), _sum_rows(g)


_dense_bias.defvjp(_dense_bias_fwd, _dense_bias_bwd)


@jax.custom_vjp
def _dense_no_bias(x, kernel):
  return jnp.dot(x, kernel)


def _dense_no_bias_fwd(x, kernel):
  return _dense_no_bias(x, kernel), (x, kernel)


def _dense_no_bias_bwd(residuals, g):
  x, kernel = residuals
  return jnp.dot(g, kernel.T), jnp.dot(x.T, g)


_dense_no_bias.defvjp(_dense_no_bias_fwd, _dense_no_bias_bwd)


def dense(x, kernel, bias=None):
  """`x @ kernel (+ bias)` for x [tokens, in], kernel [in, out], bias [out] or None.

  Backward: dx = g kernel^T, dkernel = x^T g (both 2-D products), dbias = ones^T g.
  """
  return _dense_no_bias(x, kernel) if bias is None else _dense_bias(x, kernel, bias)


def dense_nd(x, kernel, bias):
  """`dense` over the last axis of an array of any rank."""
  lead = x.shape[:-1]
  y = dense(x.reshape(-1, x.shape[-1]), kernel, bias)
  return y.reshape(lead + (y.shape[-1],))


# ----------------------------------------------------------------------------------------
# LayerNorm over the last axis.
# ----------------------------------------------------------------------------------------

def _normalize(x, eps):
  mean = x.mean(-1, keepdims=True)
  centred = x - mean
  # E[(x - mean)^2], as PyTorch computes the variance.
  inv_std = jax.lax.rsqrt((centred * centred).mean(-1, keepdims=True) + eps)
  return centred * inv_std, inv_std


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x, scale, bias, eps):
  """LayerNorm of x [..., D] with scale and bias [D]."""
  normed, _ = _normalize(x, eps)
  return normed * scale + bias


def _layer_norm_fwd(x, scale, bias, eps):
  normed, inv_std = _normalize(x, eps)
  return normed * scale + bias, (normed, inv_std, scale)


def _layer_norm_bwd(eps, residuals, g):
  del eps
  normed, inv_std, scale = residuals
  d = normed.shape[-1]
  g2, normed2 = g.reshape(-1, d), normed.reshape(-1, d)
  dscale = _sum_rows(g2 * normed2)
  dbias = _sum_rows(g2)
  gn = g * scale
  dx = inv_std * (gn - gn.mean(-1, keepdims=True)
                  - normed * (gn * normed).mean(-1, keepdims=True))
  return dx, dscale, dbias


layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# ----------------------------------------------------------------------------------------
# Exact GELU.
# ----------------------------------------------------------------------------------------

@jax.custom_vjp
def gelu(x):
  """Exact GELU, `x * Phi(x)` with `Phi(x) = (1 + erf(x / sqrt 2)) / 2`."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * SQRT_HALF))


def _gelu_fwd(x):
  return gelu(x), x


def _gelu_bwd(x, g):
  cdf = 0.5 * (1.0 + jax.lax.erf(x * SQRT_HALF))
  pdf = INV_SQRT_2PI * jnp.exp(-0.5 * x * x)
  return (g * (cdf + x * pdf),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


# ----------------------------------------------------------------------------------------
# Attention with a bias shared by every group.
# ----------------------------------------------------------------------------------------

@jax.custom_vjp
def add_shared_bias(logits, bias):
  """`logits [G, ...] + bias [1, ...]`, the bias gradient summed with a product."""
  return logits + bias


def _add_shared_bias_fwd(logits, bias):
  return logits + bias, None


def _add_shared_bias_bwd(_, g):
  n = g.shape[0]
  return g, _sum_rows(g.reshape(n, -1)).reshape((1,) + g.shape[1:])


add_shared_bias.defvjp(_add_shared_bias_fwd, _add_shared_bias_bwd)


def attention_shared_bias(q, k, v, bias):
  """Softmax attention of q [G, Lq, H, d] over k, v [G, Lk, H, d] with a bias [1, H, Lq, Lk].

  Heads-major inside ([G, H, L, d]): each head's score and context products are plain
  batched matrix products. Returns [G, Lq, H, d].
  """
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
  # Scores accumulated and kept in float32 (as `jax.nn.dot_product_attention` keeps them),
  # not rounded to a bfloat16 compute dtype before the softmax.
  logits = jnp.einsum("ghqd,ghkd->ghqk", q, k,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  weights = jax.nn.softmax(add_shared_bias(logits, bias.astype(jnp.float32)), axis=-1)
  return jnp.einsum("ghqk,ghkd->ghqd", weights.astype(v.dtype), v).transpose(0, 2, 1, 3)
