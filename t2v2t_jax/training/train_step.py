"""The jitted train step: one optimizer update of the train state on one global batch.

`make_train_step` builds the pure function `(state, batch) -> (state, metrics)` over the
model's graphdef (the objective is `objective.compute_losses`); `jit_train_step` compiles
it with the state's shardings and the batch split over the mesh, donating the old state
so that it is updated in place. `objective_settings` turns a config's `protocol` into the
objective's arguments.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.models.t2v2t import clamp_temperature
from t2v2t_jax.training import optimizer as optimizer_lib
from t2v2t_jax.training.objective import PROTOCOLS, compute_losses
from t2v2t_jax.training.train_state import PRNG_IMPL
from t2v2t_jax.tree_paths import parameter_path

# Optional batch entries that replace the step's own draws, for checking the step against
# another implementation step for step (the data pipeline never makes them): the VTM
# negatives as indices into the global batch's rows, and the MLM inputs
# (`compute_losses`'s `negatives` and `mlm_inputs`).
GIVEN_NEGATIVES = ("vtm_neg_video", "vtm_neg_text")
GIVEN_MLM = ("mlm_input_ids", "mlm_labels")


def negative_groups(vtm_negatives: str, batch_size: int, mesh) -> int:
  """Row groups the VTM negatives are drawn in (config `vtm_negatives`, protocol 'global'):
  1 ('global') or every device the batch is split over ('per_device'; the rows are sharded
  contiguously)."""
  if vtm_negatives == "global":
    return 1
  if batch_size % mesh.size or batch_size // mesh.size < 2:
    raise ValueError(f"vtm_negatives='per_device' needs at least 2 rows per device: "
                     f"batch_size={batch_size} over {mesh.size} devices")
  return mesh.size


def vindlu_row_groups(batch_size: int, gpu_batch: int) -> int:
  """VindLU's GPUs as row groups of the global batch: batch_size / gpu_batch groups of
  `gpu_batch` rows, whatever this mesh is. A batch no larger than one GPU's (a `:tiny` run,
  or gradient accumulation's micro-batches of one GPU's size) is one group."""
  batch_size, gpu_batch = int(batch_size), int(gpu_batch)
  if gpu_batch < 2:
    raise ValueError(f"vindlu_gpu_batch={gpu_batch} must be >= 2 (a VTM negative needs "
                     "another row in its group)")
  if batch_size <= gpu_batch:
    return 1
  if batch_size % gpu_batch:
    raise ValueError(f"protocol='vindlu' draws VTM negatives per group of vindlu_gpu_batch="
                     f"{gpu_batch} rows, which batch_size={batch_size} is not a multiple of")
  return batch_size // gpu_batch


def objective_settings(config, batch_size: int, mesh) -> dict:
  """`make_train_step`'s objective arguments from the config: `loss_weights` as applied,
  `negative_groups`, `mlm_groups` and `deterministic` (see `objective.py`).

  protocol 'vindlu': VTC weight / `vindlu_world_size`, VTM negatives and MLM means per
  group of `vindlu_gpu_batch` rows (`vtm_negatives` is not read). 'global': the weights as
  set, negatives by `vtm_negatives`, MLM over the whole batch. `batch_size` is the global
  batch of one step (a micro-batch with gradient accumulation).
  """
  protocol = config.get("protocol", "global")
  weights = {k: float(v) for k, v in dict(config.loss_weights).items()}
  if protocol == "vindlu":
    world = int(config.vindlu_world_size)
    if world < 1:
      raise ValueError(f"vindlu_world_size={world} must be >= 1 (the poster's GPU count)")
    weights["vtc"] = weights["vtc"] / world
    groups = vindlu_row_groups(batch_size, config.vindlu_gpu_batch)
    mlm_groups = groups
  elif protocol == "global":
    groups = negative_groups(config.get("vtm_negatives", "global"), batch_size, mesh)
    mlm_groups = 1
  else:
    raise ValueError(f"protocol={protocol!r} is not one of {list(PROTOCOLS)}")
  return dict(loss_weights=weights, negative_groups=groups, mlm_groups=mlm_groups,
              deterministic=bool(config.get("deterministic", False)))


def make_train_step(graphdef, tx, *, loss_weights, special_ids, temp_bounds, lr_schedule=None,
                    negative_groups: int = 1, mlm_groups: int = 1, deterministic: bool = False):
  """The pure train step `(state, batch) -> (state, metrics)`; jit it with shardings.

  `loss_weights`, `negative_groups`, `mlm_groups`, `deterministic`: see
  `objective.compute_losses` (`objective_settings` gives them for a config). A batch that
  holds the `GIVEN_NEGATIVES` or `GIVEN_MLM` entries uses them instead of drawing its own."""
  loss_weights = dict(loss_weights)
  lo, hi = temp_bounds

  def train_step(state, batch):
    step = state["step"]
    key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"], impl=PRNG_IMPL), step)
    given_negatives = (tuple(batch[k] for k in GIVEN_NEGATIVES)
                       if GIVEN_NEGATIVES[0] in batch else None)
    given_mlm = tuple(batch[k] for k in GIVEN_MLM) if GIVEN_MLM[0] in batch else None

    def loss_fn(params):
      model = nnx.merge(graphdef, params)
      return compute_losses(model, batch, key, loss_weights=loss_weights, special_ids=special_ids,
                            deterministic=deterministic, negative_groups=negative_groups,
                            mlm_groups=mlm_groups, negatives=given_negatives,
                            mlm_inputs=given_mlm)

    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])

    def apply(params):
      params = optax.apply_updates(params, updates)
      # VindLU clamps the temperature before every step; clamping after the update keeps
      # the stored (and checkpointed) value inside the bounds too.
      return jax.tree_util.tree_map_with_path(
          lambda path, x: clamp_temperature(x, lo, hi) if parameter_path(path) == ("temp",)
          else x, params)

    applied = optimizer_lib.update_applied(opt_state)
    # With gradient accumulation the micro-batches between updates leave the parameters
    # as they are, without reading and writing them (a branch not taken).
    params = (apply(state["params"]) if applied is None else
              jax.lax.cond(applied, apply, lambda p: p, state["params"]))
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
