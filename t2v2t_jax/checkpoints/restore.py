"""Parameters only: from a run's checkpoint or from `config.init_from`, never the optimizer.

`load_params` is what evaluation and search restore (as MaxText's inference does): the
newest usable step of the workdir, else `config.init_from`, placed with the parameter
shardings of the mesh. `params_from` reads `init_from` itself, also for a training run
that starts from another run's weights: a run's workdir, its `checkpoints` folder or a
converted folder (the `params` entry of the latest step), or a VindLU `.pth` (converted
on the fly, `vindlu.py`).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax import storage
from t2v2t_jax import tree_paths
from t2v2t_jax.checkpoints import params as params_lib
from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer, check_step, read_best
from t2v2t_jax.models.t2v2t import abstract_params

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


def params_from(source: str, model_config, initial: Mapping | None = None, *,
                pick: str = "best") -> dict:
  """`{dotted path: np.ndarray}` of every parameter, from a run folder or a VindLU file.

  `initial`: `{dotted path: array}` of the run's freshly initialised parameters, which
  give the values of the parameters a VindLU checkpoint lacks (the T2V blocks), so no
  second model is built. A run folder is read as saved (its shapes), so that a 4-frame
  pretraining run can initialise a 12-frame fine-tune (`params.assign` resizes). `pick`:
  'best' reads the step named in the folder's `best.json` if there is one (a fine-tune
  that kept its best epoch), else the latest; 'latest' always the latest.
  """
  if source.endswith(TORCH_SUFFIXES):
    from t2v2t_jax.checkpoints import vindlu  # noqa: PLC0415 (torch-free unless needed)
    return vindlu.load_vindlu_params(source, model_config, initial=initial)
  storage.check_path(source, "init_from")
  directory = source
  if storage.isdir(storage.join(directory, "checkpoints")):
    directory = storage.join(directory, "checkpoints")
  if not storage.isdir(directory):
    raise FileNotFoundError(f"init_from={source!r}: no such checkpoint folder or .pth file")
  manager = ocp.CheckpointManager(storage.abspath(directory), item_names=("state", "data_iter"),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"init_from={source!r}: no checkpoint steps in {directory}")
  best = read_best(directory) if pick == "best" else None
  if best is not None and best["step"] in manager.all_steps():
    step = best["step"]
    if jax.process_index() == 0:
      print(f"init_from: {directory}/{step}, the best step by {best.get('key')} "
            f"({best.get('value')})", flush=True)
  # The stored tree's own metadata is the target: the arrays come back with the shapes
  # they were saved with, and only the `params` entry is read.
  item = {"params": manager.item_metadata(step)["state"].tree["params"]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
      item=item, restore_args=restore_args, partial_restore=True)))
  manager.close()
  params = tree_paths.flatten(restored["state"]["params"])
  return {path: np.asarray(value) for path, value in params.items()}


def load_params(config, workdir: str, mesh, *, purpose: str = "Evaluating"):
  """The parameters to use: the newest usable checkpoint of `workdir`, else
  `config.init_from`, sharded over `mesh` (`mesh.fsdp_min_size` of the config).

  Returns `(params, graphdef, step)` (step 0 for `init_from`); prints
  `f"{purpose} <source>"` on the main process. Used by `--mode eval` and `--mode search`.
  """
  graphdef, abstract = abstract_params(config.model)
  shardings = sharding_lib.tree_shardings(abstract, mesh, fsdp_min_size=config.mesh.fsdp_min_size)
  is_main = jax.process_index() == 0

  ckpt_dir = storage.join(workdir, "checkpoints")
  if storage.isdir(ckpt_dir):
    ckpt = Checkpointer(ckpt_dir, async_save=False)
    # The best step if the run marked one (and `pick_checkpoint` is 'best'), else the
    # newest usable one (damaged steps are named, and left where they are).
    step = ckpt.latest_step(data_iter=False)
    best = ckpt.best() if config.get("pick_checkpoint", "best") == "best" else None
    note = ""
    if best is not None and step is not None and best["step"] in ckpt.all_steps() \
        and check_step(ckpt.step_dir(best["step"]), data_iter=False) is None:
      step, note = best["step"], f" (the best step by {best.get('key')}: {best.get('value')})"
    params = None
    if step is not None:
      params = ckpt.restore_params(step, sharding_lib.with_shardings(abstract, shardings))
      note = note if ckpt.restored_step == step else ""
      step = ckpt.restored_step
      if is_main:
        print(f"{purpose} {ckpt_dir}/{step}{note}", flush=True)
    ckpt.close()
    if params is not None:
      return params, graphdef, step
  if not config.init_from:
    raise FileNotFoundError(f"No checkpoint in {ckpt_dir} and no --config.init_from to load")
  # Every parameter comes from the source (VindLU's missing ones from the importer's
  # seeded model on the host), so the abstract parameters are target enough.
  values = params_from(config.init_from, config.model,
                       pick=config.get("pick_checkpoint", "best"))
  params = params_lib.assign(sharding_lib.with_shardings(abstract, shardings), values,
                             source=config.init_from, complete=True)
  if is_main:
    print(f"{purpose} {config.init_from}", flush=True)
  return params, graphdef, 0
