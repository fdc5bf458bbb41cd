"""The jitted train step: one optimizer update of the train state on one global batch.

`make_train_step` builds the pure function `(state, batch) -> (state, metrics)` over the
model's graphdef (the objective is `objective.compute_losses`); `jit_train_step` compiles
it with the state's shardings and the batch split over the mesh, donating the old state
so that it is updated in place.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.models.t2v2t import clamp_temperature
from t2v2t_jax.training.objective import compute_losses
from t2v2t_jax.training.train_state import PRNG_IMPL
from t2v2t_jax.tree_paths import parameter_path


def negative_groups(vtm_negatives: str, batch_size: int, mesh) -> int:
  """Row groups the VTM negatives are drawn in (config `vtm_negatives`): 1 ('global') or
  every device the batch is split over ('per_device'; the rows are sharded contiguously)."""
  if vtm_negatives == "global":
    return 1
  if batch_size % mesh.size or batch_size // mesh.size < 2:
    raise ValueError(f"vtm_negatives='per_device' needs at least 2 rows per device: "
                     f"batch_size={batch_size} over {mesh.size} devices")
  return mesh.size


def make_train_step(graphdef, tx, *, loss_weights, special_ids, temp_bounds, lr_schedule=None,
                    negative_groups: int = 1):
  """The pure train step `(state, batch) -> (state, metrics)`; jit it with shardings.

  `negative_groups`: see `objective.compute_losses` and `negative_groups` above."""
  loss_weights = dict(loss_weights)
  lo, hi = temp_bounds

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=PRNG_IMPL), step)

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      return compute_losses(model, batch, key, loss_weights=loss_weights, special_ids=special_ids,
                            negative_groups=negative_groups)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # VindLU clamps the temperature before every step; clamping after the update keeps the
    # stored (and checkpointed) value inside the bounds too.
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: clamp_temperature(x, lo, hi) if parameter_path(path) == ("temp",) else x,
        params)
    metrics["grad_norm"] = optax.tree_utils.tree_norm(grads)
    if lr_schedule is not None:
      metrics["lr"] = lr_schedule(step)
    new_state = {"params": params, "opt_state": opt_state, "step": step + 1, "rng": state["rng"]}
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_sharding, mesh):
  """jit with explicit shardings; the old state is donated (updated in place)."""
  return jax.jit(train_step, in_shardings=(state_sharding, sharding_lib.batch_sharding(mesh)),
                 out_shardings=(state_sharding, sharding_lib.replicated(mesh)),
                 donate_argnums=(0,))
