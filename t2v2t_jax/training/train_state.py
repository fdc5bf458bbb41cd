"""The train state: parameters, optimizer state, step and base RNG key, and its shardings.

The state is a plain dict of pytrees so that Orbax saves it as it is:
  params:    nnx.State of every `nnx.Param` of the model (float32)
  opt_state: the Optax state over `params`
  step:      int32 scalar, number of updates applied
  rng:       base PRNG key; the step key is `fold_in(rng, step)` (`train_step.py`), so a
             resumed run draws exactly the dropout, negatives and masks an uninterrupted
             run would.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.models.t2v2t import create_model

# Dropout, negatives and masks draw from an RBG key: XLA's RngBitGenerator compiles to a
# few ops, where threefry expands every dropout site into a hash network (measured: the
# fusion encoder's backward pass compiled 2x slower on CPU with threefry).
PRNG_IMPL = "rbg"


def _base_key(seed: int):
  return jax.random.key_data(jax.random.key(seed + 17, impl=PRNG_IMPL))


def init_state(model_config, tx: optax.GradientTransformation, seed: int):
  """Fresh model and optimizer state (call under jit with out_shardings to init sharded)."""
  _, params = nnx.split(create_model(model_config, seed=seed), nnx.Param)
  return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32),
          "rng": _base_key(seed)}


def abstract_state(model_config, tx, seed: int):
  return jax.eval_shape(functools.partial(init_state, model_config, tx, seed))


def create_sharded_state(model_config, tx: optax.GradientTransformation, seed: int, shardings):
  """`init_state` placed with `shardings`, without compiling the whole init as one program.

  The parameters are initialised eagerly (each initialiser is a small cached kernel) and
  then placed; only the optimizer-state init is jitted. Jitting the full init at paper
  size (~600 random initialisers in one program) took minutes to compile on GPU.
  """
  _, params = nnx.split(create_model(model_config, seed=seed), nnx.Param)
  params = jax.device_put(params, shardings["params"])
  return {
      "params": params,
      "opt_state": jax.jit(tx.init, out_shardings=shardings["opt_state"])(params),
      "step": jax.device_put(jnp.zeros((), jnp.int32), shardings["step"]),
      "rng": jax.device_put(_base_key(seed), shardings["rng"]),
  }


def state_shardings(abstract, mesh, fsdp_min_size: int = 2 ** 18):
  shard = functools.partial(sharding_lib.tree_shardings, mesh=mesh, fsdp_min_size=fsdp_min_size)
  rep = sharding_lib.replicated(mesh)
  return {"params": shard(abstract["params"]), "opt_state": shard(abstract["opt_state"]),
          "step": rep, "rng": rep}
