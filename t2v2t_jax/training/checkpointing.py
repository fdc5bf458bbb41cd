"""Orbax checkpoints: train state and the Grain iterator state, saved together.

One `CheckpointManager` per workdir (`DIR/checkpoints/<step>/{state,data_iter}`), saving
asynchronously every `checkpoint_every` steps and at the end, keeping the last K. The
train state holds parameters, optimizer state, step and the base RNG key, so a resumed
run continues with exactly the batches and random draws of an uninterrupted one.
"""

from __future__ import annotations

import os

import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Thin wrapper naming the two items and keeping call sites short."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, save_interval_steps: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_interval_steps, create=True,
        enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data_iter"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state, data_iter=None):
    """Restore into the shapes/shardings of `abstract_state` (and `data_iter` in place)."""
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs carrying the target shardings, for a sharded restore."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)


def restore_state_only(directory: str, abstract_state):
  """Restore only the train state of the latest checkpoint in `directory` (for init_from)."""
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data_iter"))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint found in {directory}")
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
  manager.close()
  return step, restored["state"]
