"""The CPU forms of `cpu_ops` against the portable forms they replace: values and gradients.

The portable forms are flax's Linear and LayerNorm, `jax.nn.gelu` and
`jax.nn.dot_product_attention` (what GPU and TPU programs run); the parity tests against
transformers run the CPU forms, since the tests run on a CPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from t2v2t_jax.models import cpu_ops
from t2v2t_jax.models import layers as L
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.vision_encoder import VideoEncoder

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu",
                                reason="the CPU forms are only taken on a CPU backend")


def both_forms(fn, *args):
  """(fn(*args) with the CPU forms, fn(*args) with the portable forms), each jitted.

  Each is a fresh function: jax caches traces by function, and the form is chosen when
  tracing.
  """
  fast = jax.jit(lambda *a: fn(*a))(*args)
  with cpu_ops.portable_forms():
    portable = jax.jit(lambda *a: fn(*a))(*args)
  return fast, portable


def assert_trees_close(a, b, *, rtol=1e-5, atol=1e-6):
  """Close leaf by leaf; `atol` is relative to each leaf's largest magnitude.

  The two forms sum in different orders, so float32 rounding scales with the largest terms
  of a leaf: an element of 4.1 in a gradient whose entries reach 946 differed by 8e-4
  (1e-6 of 946) on one CI machine.
  """
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(1.0, float(np.abs(y).max())) if y.size else 1.0
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * scale)


def random(shape, seed, scale=1.0):
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def test_cpu_forms_are_chosen_on_cpu_and_portable_inside_the_block():
  assert cpu_ops.cpu_forms_active()
  with cpu_ops.portable_forms():
    assert not cpu_ops.cpu_forms_active()
    with cpu_ops.portable_forms():
      assert not cpu_ops.cpu_forms_active()
    assert not cpu_ops.cpu_forms_active()
  assert cpu_ops.cpu_forms_active()
  # The choice is made when tracing: the CPU program has no erfc (the portable GELU's).
  assert "erfc" not in jax.jit(lambda x: L.gelu(x)).lower(jnp.ones((4,))).as_text()
  with cpu_ops.portable_forms():
    assert "erfc" in jax.jit(lambda x: L.gelu(x)).lower(jnp.ones((4,))).as_text()


def test_accelerator_forms_select_cpu_forms_per_op_inside_portable_forms():
  # What benchmarks/bytes_probe.py --forms relies on: a named op's CPU form in a program
  # traced for an accelerator, the other ops portable, and the default restored after.
  gelu_hlo = lambda: jax.jit(lambda x: L.gelu(x)).lower(jnp.ones((4,))).as_text()
  with cpu_ops.portable_forms():
    with cpu_ops.accelerator_forms({"gelu"}):
      assert "erfc" not in gelu_hlo()
    with cpu_ops.accelerator_forms({"dense"}):
      assert "erfc" in gelu_hlo()
    # The default: the forms adopted for accelerators (`ACCELERATOR_FORMS`).
    assert ("erfc" in gelu_hlo()) == ("gelu" not in cpu_ops.ACCELERATOR_FORMS)
  with pytest.raises(ValueError, match="unknown op forms"):
    with cpu_ops.accelerator_forms({"softmax"}):
      pass


@pytest.mark.parametrize("use_bias", [True, False])
def test_linear_values_and_gradients(use_bias):
  layer = L.linear(6, 5, use_bias=use_bias, rngs=nnx.Rngs(0))
  if use_bias:
    layer.bias.set_value(random((5,), 1))
  graphdef, params = nnx.split(layer, nnx.Param)
  x = random((2, 3, 6), 2)
  g = random((2, 3, 5), 3)

  def f(params, x):
    y = nnx.merge(graphdef, params)(x)
    return y, jax.grad(lambda p, x: (nnx.merge(graphdef, p)(x) * g).sum(), argnums=(0, 1))(params, x)

  assert_trees_close(*both_forms(f, params, x))


def test_layer_norm_values_and_gradients():
  norm = L.layer_norm(8, eps=1e-12, rngs=nnx.Rngs(0))
  norm.scale.set_value(1.0 + random((8,), 1, 0.1))
  norm.bias.set_value(random((8,), 2, 0.1))
  graphdef, params = nnx.split(norm, nnx.Param)
  # An offset and spread that make the variance computation matter.
  x = 3.0 + 2.0 * random((4, 5, 8), 3)
  g = random((4, 5, 8), 4)

  def f(params, x):
    y = nnx.merge(graphdef, params)(x)
    return y, jax.grad(lambda p, x: (nnx.merge(graphdef, p)(x) * g).sum(), argnums=(0, 1))(params, x)

  assert_trees_close(*both_forms(f, params, x), rtol=1e-4, atol=1e-5)


def test_gelu_values_and_gradients():
  x = jnp.linspace(-8.0, 8.0, 257)
  fast, portable = both_forms(lambda x: (L.gelu(x), jax.grad(lambda x: L.gelu(x).sum())(x)), x)
  # erf, as PyTorch computes GELU: in the far negative tail 1 + erf(x / sqrt 2) cancels to
  # float32 rounding of 1 (the portable erfc form keeps relative accuracy there), so the
  # forms agree to an absolute 1e-6, not relatively.
  assert_trees_close(fast, portable, rtol=1e-5, atol=1e-6)
  # Against the definition x * Phi(x) in float64.
  from math import erf, exp, pi, sqrt
  xs = np.asarray(x, np.float64)
  want = np.array([v * 0.5 * (1 + erf(v / sqrt(2))) for v in xs])
  dwant = np.array([0.5 * (1 + erf(v / sqrt(2))) + v * exp(-v * v / 2) / sqrt(2 * pi) for v in xs])
  np.testing.assert_allclose(np.asarray(fast[0]), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(fast[1]), dwant, rtol=1e-5, atol=1e-6)


def test_attention_with_shared_bias_values_and_gradients():
  mha = L.MultiHeadAttention(12, 12, 3, qkv_bias=(True, False, True), rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(mha, nnx.Param)
  x = random((5, 7, 12), 1)
  bias = random((1, 3, 7, 7), 2)
  g = random((5, 7, 12), 3)

  def loss(params, x, bias):
    return (nnx.merge(graphdef, params)(x, x, bias=bias) * g).sum()

  def f(params, x, bias):
    return (nnx.merge(graphdef, params)(x, x, bias=bias),
            jax.grad(loss, argnums=(0, 1, 2))(params, x, bias))

  assert_trees_close(*both_forms(f, params, x, bias), rtol=1e-4, atol=1e-6)


def test_video_encoder_training_pass_is_the_same_with_both_forms():
  cfg = model_config("test/16", "test", "v2t")
  cfg.vision.image_size = 32
  cfg.vision.layer_scale_init = 0.5
  encoder = VideoEncoder(cfg.vision, scan_layers=True, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(encoder, nnx.Param)
  # Nonzero relative position tables and temporal scales, so that every path is live.
  params = jax.tree_util.tree_map_with_path(
      lambda path, p: p + 0.1 * random(p.shape, hash(str(path)) % 1000) if p.ndim <= 2 else p,
      params)
  frames = random((2, 3, 32, 32, 3), 5)

  def f(params, frames, key):
    def loss(params):
      hidden, pooled = nnx.merge(graphdef, params)(
          frames, deterministic=False, rngs=nnx.Rngs(dropout=key))
      return (hidden ** 2).mean() + (pooled ** 2).mean(), hidden
    return jax.value_and_grad(loss, has_aux=True)(params)

  key = jax.random.key(3, impl="rbg")
  assert_trees_close(*both_forms(f, params, frames, key), rtol=1e-4, atol=3e-6)
