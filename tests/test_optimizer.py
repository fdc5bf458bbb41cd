"""Learning-rate schedule against hand-computed values, VindLU's weight-decay rule on the
model's own parameters (checked against the rule applied to VindLU's names and shapes),
AdamW wiring."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from t2v2t_jax.checkpoints import vindlu_export, vindlu_keys
from t2v2t_jax.checkpoints.params import flatten_params
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.t2v2t import create_model
from t2v2t_jax.training import optimizer
from t2v2t_jax.tree_paths import flatten, parameter_path

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
  np.testing.assert_allclose(float(schedule(500)), MIN_LR + (PEAK - MIN_LR) * 0.5, rtol=1e-5)
  # Warmup as long as the run: the peak at its end, then min_lr (a decay of one step).
  short = optimizer.learning_rate_schedule(PEAK, MIN_LR, 100, 100)
  np.testing.assert_allclose(float(short(50)), PEAK * (0.01 + 0.99 * 0.5), rtol=1e-5)
  np.testing.assert_allclose(float(short(100)), PEAK, rtol=1e-6)
  np.testing.assert_allclose(float(short(101)), MIN_LR, rtol=1e-5)
  cfg = optimizer.optimizer_config()
  cfg.lr, cfg.epochs, cfg.warmup_epochs = 1e-5, 5.0, 0.5
  assert optimizer.warmup_and_total_steps(cfg, 1000) == (100, 1000)
  np.testing.assert_allclose(float(optimizer.make_schedule(cfg, 1000)(100)), 1e-5, rtol=1e-6)


def _tiny_model_params():
  """{our dotted path: array} of the tiniest t2v2t model (a T2V block, an MLM head)."""
  return flatten_params(create_model(model_config("test/16", "test", "t2v2t")))


# SPEC 7, written out for parameters the model has: decay iff not 1-D and not a bias. So
# the 0-dim temperature, temporal scale and T2V gates, the CLS token, the temporal
# position embedding, relative-position tables, embeddings and kernels are decayed;
# LayerNorm scales and biases, layer-scale lambdas and every bias are not.
OWN_PARAMETERS = {
    "temp": True,
    "vision_encoder.embeddings.cls_token": True,
    "vision_encoder.embeddings.temporal_pos_embed": True,
    "vision_encoder.embeddings.patch_embed.kernel": True,
    "vision_encoder.embeddings.patch_embed.bias": False,
    "vision_encoder.layers.0.relative_position_bias.table": True,
    "vision_encoder.layers.0.attention.query.kernel": True,
    "vision_encoder.layers.0.attention.query.bias": False,
    "vision_encoder.layers.0.layernorm_before.scale": False,
    "vision_encoder.layers.0.lambda_1": False,
    "vision_encoder.layers.0.temporal.scale": True,
    "vision_encoder.layers.0.temporal.attention.key.kernel": True,
    "fusion_encoder.t2v.gate": True,
    "fusion_encoder.t2v.ffn_gate": True,
    "fusion_encoder.t2v.text_norm.scale": False,
    "fusion_encoder.layers.0.crossattention.value.bias": False,
    "text_encoder.embeddings.word_embeddings.embedding": True,
    "text_encoder.embeddings.layer_norm.scale": False,
    "text_encoder.mlm_head.bias": False,
    "itm_head.kernel": True,
}


def test_weight_decay_rule_on_the_models_own_paths():
  params = _tiny_model_params()
  assert set(OWN_PARAMETERS) <= set(params)  # no invented names
  for path, decayed in OWN_PARAMETERS.items():
    assert optimizer.is_decayed(path, params[path].ndim) is decayed, path
  mask = optimizer.weight_decay_mask({path: jax.ShapeDtypeStruct(params[path].shape, jnp.float32)
                                      for path in OWN_PARAMETERS})
  assert mask == OWN_PARAMETERS


def test_weight_decay_mask_agrees_with_vindlus_rule_on_vindlus_names():
  """VindLU decides on its own names and PyTorch shapes (`ndim == 1 or name ends with
  '.bias'`: no decay); every parameter of ours that a VindLU key maps to must get the
  same answer from our mask, whatever our layout (transposed kernels, split q/k/v)."""
  params = _tiny_model_params()
  state, _ = vindlu_export.export_vindlu(params, naming="pretrain", drop_t2v=True)
  mask = flatten(optimizer.weight_decay_mask(
      nnx.state(create_model(model_config("test/16", "test", "t2v2t")), nnx.Param)))
  layout = vindlu_keys.layout_from_params(params, "pretrain", mlm=True)
  checked = set()
  for m in vindlu_keys.vindlu_key_map(layout):
    vindlu_decays = not (np.ndim(state[m.source]) == 1 or m.source.endswith(".bias"))
    assert mask[m.target] is vindlu_decays, (m.source, m.target)
    checked.add(m.target)
  # Every parameter is covered: by a VindLU key, or it is one of the T2V block's own.
  assert set(mask) - checked == {p for p in mask if vindlu_keys.is_t2v(p)}


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
  flat = {parameter_path(p): bool(m) for p, m in
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


def test_accumulation_matches_optax_multisteps_and_updates_once_in_k():
  """`accumulate_every` against optax.MultiSteps (the independent reference): the same
  parameters after 3 updates of 4 micro-batches each, with AdamW, VindLU's decay mask and
  the schedule; zero updates in between; and the update is a branch XLA keeps."""
  from t2v2t_jax.training import hlo_census  # noqa: PLC0415
  cfg = optimizer.optimizer_config()
  cfg.lr, k = 1e-2, 4
  inner = optimizer.make_optimizer(cfg, total_steps=3)
  ours, reference = optimizer.accumulate_every(inner, k), optax.MultiSteps(inner, k)
  params = _params()
  p_ours, p_ref = params, params
  s_ours, s_ref = ours.init(params), reference.init(params)
  rng = np.random.default_rng(0)
  step = jax.jit(lambda g, s, p: ours.update(g, s, p))
  for i in range(3 * k):
    grads = jax.tree_util.tree_map(
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    u_ours, s_ours = step(grads, s_ours, p_ours)
    u_ref, s_ref = reference.update(grads, s_ref, p_ref)
    applied = bool(optimizer.update_applied(s_ours))
    assert applied == ((i + 1) % k == 0)
    if not applied:
      assert all(not np.any(np.asarray(u)) for u in jax.tree_util.tree_leaves(u_ours))
    p_ours, p_ref = optax.apply_updates(p_ours, u_ours), optax.apply_updates(p_ref, u_ref)
  for a, b in zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(p_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
  assert any(np.any(np.asarray(a) != np.asarray(b0)) for a, b0 in
             zip(jax.tree_util.tree_leaves(p_ours), jax.tree_util.tree_leaves(params)))
  assert optimizer.update_applied(inner.init(params)) is None
  # The update (AdamW over every parameter) runs in a conditional's branch, not on every
  # micro-batch: the compiled program's branches hold its bytes.
  compiled = step.lower(grads, s_ours, p_ours).compile()
  census = hlo_census.census_from_text(compiled.as_text())
  assert census["branch_bytes"] > 0.5 * census["kernel_bytes"], census
