"""Train state (parameters, optimizer state, step, base RNG key) and the jitted train step.

The state is a plain dict of pytrees so that Orbax saves it as it is:
  params:    nnx.State of every `nnx.Param` of the model (float32)
  opt_state: the Optax state over `params`
  step:      int32 scalar, number of updates applied
  rng:       base PRNG key; the step key is `fold_in(rng, step)`, so a resumed run draws
             exactly the dropout, negatives and masks an uninterrupted run would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from t2v2t_jax.models.t2v2t import T2V2T, create_model
from t2v2t_jax.training import sharding as sharding_lib
from t2v2t_jax.training.objective import compute_losses
from t2v2t_jax.training.optimizer import parameter_path


# Dropout, negatives and masks draw from an RBG key: XLA's RngBitGenerator compiles to a
# few ops, where threefry expands every dropout site into a hash network (measured: the
# fusion encoder's backward pass compiled 2x slower on CPU with threefry).
PRNG_IMPL = "rbg"


def clamp_temperature(params, lo: float, hi: float):
  def clamp(path, x):
    return jnp.clip(x, lo, hi) if parameter_path(path) == ("temp",) else x
  return jax.tree_util.tree_map_with_path(clamp, params)


def split_model(model: T2V2T):
  graphdef, params = nnx.split(model, nnx.Param)
  return graphdef, params


def init_state(model_config, tx: optax.GradientTransformation, seed: int):
  """Fresh model and optimizer state (call under jit with out_shardings to init sharded)."""
  model = create_model(model_config, seed=seed)
  _, params = split_model(model)
  return {
      "params": params,
      "opt_state": tx.init(params),
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(jax.random.key(seed + 17, impl=PRNG_IMPL)),
  }


def abstract_state(model_config, tx, seed: int):
  return jax.eval_shape(functools.partial(init_state, model_config, tx, seed))


def create_sharded_state(model_config, tx: optax.GradientTransformation, seed: int, shardings):
  """`init_state` placed with `shardings`, without compiling the whole init as one program.

  The parameters are initialised eagerly (each initialiser is a small cached kernel) and
  then placed; only the optimizer-state init is jitted. Jitting the full init at paper
  size (~600 random initialisers in one program) took minutes to compile on GPU.
  """
  model = create_model(model_config, seed=seed)
  _, params = split_model(model)
  params = jax.device_put(params, shardings["params"])
  return {
      "params": params,
      "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
      "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
      "rng": jax.device_put(jax.random.key_data(jax.random.key(seed + 17, impl=PRNG_IMPL)),
                            shardings["rng"]),
  }


def model_graphdef(model_config):
  model = nnx.eval_shape(lambda: create_model(model_config))
  return nnx.split(model, nnx.Param)[0]


def state_shardings(abstract, mesh, fsdp_min_size: int = 2 ** 18):
  shard = functools.partial(sharding_lib.tree_shardings, mesh=mesh, fsdp_min_size=fsdp_min_size)
  rep = sharding_lib.replicated(mesh)
  return {"params": shard(abstract["params"]), "opt_state": shard(abstract["opt_state"]),
          "step": rep, "rng": rep}


def merge_model(graphdef, params) -> T2V2T:
  return nnx.merge(graphdef, params)


def make_train_step(graphdef, tx, *, loss_weights, special_ids, temp_bounds, lr_schedule=None):
  """The pure train step `(state, batch) -> (state, metrics)`; jit it with shardings."""
  loss_weights = dict(loss_weights)

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=PRNG_IMPL), step)

    def loss_fn(params):
      model = merge_model(graphdef, params)
      return compute_losses(model, batch, key, loss_weights=loss_weights, special_ids=special_ids)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # VindLU clamps the temperature before every step; clamping after the update keeps the
    # stored (and checkpointed) value inside the bounds too.
    params = clamp_temperature(params, *temp_bounds)
    metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(step)
    new_state = {"params": params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"]}
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_sharding, mesh):
  """jit with explicit shardings; the old state is donated (updated in place)."""
  batch_sh = sharding_lib.batch_sharding(mesh)
  return jax.jit(train_step, in_shardings=(state_sharding, batch_sh),
                 out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))
