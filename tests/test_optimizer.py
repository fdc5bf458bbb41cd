"""Learning-rate schedule formula, VindLU weight-decay rule, AdamW wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t2v2t_jax.training import optimizer

PEAK, MIN_LR, TOTAL, WARMUP = 1e-4, 1e-6, 1000, 100


@pytest.mark.parametrize("step, expected", [
    (0, 0.01 * PEAK),                                   # warmup starts at 1% of the peak
    (50, PEAK * (0.01 + 0.99 * 50 / 100)),              # half-way through warmup
    (100, PEAK),                                        # warmup end = peak
    (550, MIN_LR + (PEAK - MIN_LR) * 0.5),              # middle of the cosine
    (325, MIN_LR + (PEAK - MIN_LR) * 0.5 * (1 + np.cos(np.pi * 0.25))),
    (1000, MIN_LR),                                     # end
    (5000, MIN_LR),                                     # past the end stays at min_lr
])
def test_schedule_matches_formula(step, expected):
  schedule = optimizer.learning_rate_schedule(PEAK, MIN_LR, TOTAL, WARMUP)
  np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5)


def test_schedule_without_warmup_and_from_config():
  schedule = optimizer.learning_rate_schedule(PEAK, MIN_LR, TOTAL, 0)
  np.testing.assert_allclose(float(schedule(0)), PEAK, rtol=1e-6)
  cfg = optimizer.optimizer_config()
  cfg.lr, cfg.epochs, cfg.warmup_epochs = 1e-5, 5.0, 0.5
  assert optimizer.warmup_and_total_steps(cfg, 1000) == (100, 1000)
  np.testing.assert_allclose(float(optimizer.make_schedule(cfg, 1000)(100)), 1e-5, rtol=1e-6)


# (path, shape, decayed?) under SPEC 7's rule: decay iff ndim != 1 and not a bias.
NAMED_PARAMETERS = [
    ("vision_encoder.embeddings.cls_token", (1, 1, 768), True),
    ("vision_encoder.embeddings.temporal_position_embeddings", (1, 4, 1, 768), True),
    ("vision_encoder.embeddings.patch_embeddings.projection.kernel", (16, 16, 3, 768), True),
    ("vision_encoder.embeddings.patch_embeddings.projection.bias", (768,), False),
    ("vision_encoder.layers.0.attention.relative_position_bias_table", (732, 12), True),
    ("vision_encoder.layers.0.attention.relative_position_bias", (732, 12), True),
    ("vision_encoder.layers.0.attention.query.kernel", (768, 768), True),
    ("vision_encoder.layers.0.attention.query.bias", (768,), False),
    ("vision_encoder.layers.0.attention.heads.bias", (12, 64), False),   # 2-D bias: name rule
    ("vision_encoder.layers.0.layernorm_before.scale", (768,), False),
    ("vision_encoder.layers.0.layernorm_before.bias", (768,), False),
    ("vision_encoder.layers.0.lambda_1", (768,), False),
    ("vision_encoder.layers.0.temporal.scale", (), True),
    ("vision_encoder.layers.0.temporal.attention.in_proj.kernel", (768, 2304), True),
    ("fusion.t2v.gate", (), True),
    ("temp", (), True),
    ("text_encoder.embeddings.word_embeddings.embedding", (30522, 768), True),
    ("text_encoder.embeddings.LayerNorm.scale", (768,), False),
    ("text_encoder.mlm_head.bias", (30522,), False),
    ("itm_head.kernel", (768, 2), True),
]


def test_weight_decay_rule_on_named_paths():
  for path, shape, decayed in NAMED_PARAMETERS:
    assert optimizer.is_decayed(path, len(shape)) is decayed, path
  flat_arrays = {path: jax.ShapeDtypeStruct(shape, jnp.float32)
                 for path, shape, _ in NAMED_PARAMETERS}
  assert optimizer.weight_decay_mask(flat_arrays) == {p: d for p, _, d in NAMED_PARAMETERS}


def test_weight_decay_mask_on_nested_dict_and_nnx_state():
  nested = {"encoder": {"layers": [{"dense": {"kernel": np.zeros((2, 3)),
                                              "bias": np.zeros((3,))}}]},
            "temp": np.float32(0.07)}
  mask = optimizer.weight_decay_mask(nested)
  assert mask == {"encoder": {"layers": [{"dense": {"kernel": True, "bias": False}}]},
                  "temp": True}

  class Tiny(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)
      self.scale = nnx.Param(jnp.zeros(()))
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=rngs)])

  state = nnx.state(Tiny(nnx.Rngs(0)), nnx.Param)
  flat = {optimizer.parameter_path(p): bool(m) for p, m in
          jax.tree_util.tree_flatten_with_path(optimizer.weight_decay_mask(state))[0]}
  assert flat == {("dense", "bias"): False, ("dense", "kernel"): True,
                  ("layers", "0", "bias"): False, ("layers", "0", "kernel"): True,
                  ("norm", "bias"): False, ("norm", "scale"): False, ("scale",): True}


def _params():
  return {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones((2,))},
          "temp": jnp.asarray(0.5)}


def test_adamw_decays_only_masked_parameters():
  cfg = optimizer.optimizer_config()
  cfg.warmup_epochs = 0.0
  tx = optimizer.make_optimizer(cfg, total_steps=10)
  params = _params()
  zero_grads = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  # Zero gradient: the Adam term is 0, the update is -lr * wd * p on decayed leaves only.
  np.testing.assert_allclose(np.asarray(updates["dense"]["kernel"]), -1e-4 * 0.02, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(updates["dense"]["bias"]), 0.0)
  np.testing.assert_allclose(float(updates["temp"]), -1e-4 * 0.02 * 0.5, rtol=1e-5)


def test_config_defaults_and_accumulation_and_clipping():
  cfg = optimizer.optimizer_config()
  assert (cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay) == (0.9, 0.999, 1e-8, 0.02)
  assert cfg.grad_clip_norm is None and cfg.grad_accum_steps == 1
  cfg.grad_accum_steps = 2
  cfg.grad_clip_norm = 1.0
  tx = optimizer.make_optimizer(cfg, total_steps=10)
  params = _params()
  state = tx.init(params)
  grads = jax.tree_util.tree_map(lambda p: 100.0 * jnp.ones_like(p), params)
  updates, state = tx.update(grads, state, params)
  assert all(not np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(updates))
  updates, state = tx.update(grads, state, params)   # second micro-batch: one real update
  assert np.any(np.asarray(updates["dense"]["kernel"]))

  # Works as an nnx.Optimizer transformation on a real module.
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  opt = nnx.Optimizer(model, optimizer.make_optimizer(optimizer.optimizer_config(), 10),
                      wrt=nnx.Param)
  before = np.asarray(model.kernel[...]).copy()
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((1, 3))) ** 2))(model)
  opt.update(model, grads)
  assert not np.array_equal(before, np.asarray(model.kernel[...]))   # lr(0) = 1e-6: small
  assert isinstance(optimizer.make_optimizer(optimizer.optimizer_config(), 10),
                    optax.GradientTransformation)
