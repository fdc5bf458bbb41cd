"""Parameters only: from a run's checkpoint or from `config.init_from`, never the optimizer.

`load_params` is what evaluation and search restore (as MaxText's inference does): the
newest usable step of the workdir, else `config.init_from`, placed with the parameter
shardings of the mesh. `params_from` reads `init_from` itself, also for a training run
that starts from another run's weights: a run's workdir, its `checkpoints` folder or a
converted folder (the `params` entry of the latest step), or a VindLU `.pth` (converted
on the fly, `vindlu.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax import storage
from t2v2t_jax import tree_paths
from t2v2t_jax.checkpoints import params as params_lib
from t2v2t_jax.checkpoints import weight_rules
from t2v2t_jax.checkpoints.run_checkpoints import (Checkpointer, check_restored_step,
                                                   inspect_step, read_best)
from t2v2t_jax.errors import Refusal, capped_list, one_line
from t2v2t_jax.models.t2v2t import abstract_params

TORCH_SUFFIXES = (".pth", ".pt", ".bin")


# A run folder given without a model to compare with (`convert --to vindlu` without
# --config) is still bounded: no parameter of any model of this project comes near these
# (BERT-large's word embedding is 31M elements; the largest models ~0.5B in all), and a
# crafted `.zarray` claiming [1e6, 1e6] would otherwise be allocated (and abort) on restore.
MAX_ELEMENTS_PER_ARRAY = 1 << 28
MAX_ELEMENTS = 1 << 31
# Frames a stored temporal embedding may have when the model's differ (it is resized).
MAX_TEMPORAL_POSITIONS = 1024


def _run_folder_steps(source: str, directory: str, manager, pick: str) -> list[int]:
  """The steps to try, in order: the best step (if `pick` is 'best' and one is marked),
  then every step from the newest down."""
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f"init_from={source!r}: no checkpoint steps in {directory}")
  best = read_best(directory) if pick == "best" else None
  if best is not None and best["step"] in steps:
    steps.remove(best["step"])
    steps.insert(0, best["step"])
    if jax.process_index() == 0:
      print(f"init_from: {directory}/{best['step']}, the best step by {best.get('key')} "
            f"({best.get('value')})", flush=True)
  return steps


def _metadata_keys(step_dir: str) -> dict[str, tuple]:
  """`{dotted path: key tuple}` of every entry of the state in `state/_METADATA`, checked
  for form here: Orbax's own reader turns a crafted file into AttributeError, KeyError or
  RecursionError naming nothing."""
  path = storage.join(step_dir, "state", "_METADATA")
  try:
    meta = json.loads(storage.read_text(path))
  except (OSError, ValueError, RecursionError) as e:
    raise Refusal(f"{path}: unreadable ({one_line(f'{type(e).__name__}: {e}')[:200]})") from e
  tree = meta.get("tree_metadata") if isinstance(meta, dict) else None
  if not isinstance(tree, dict) or not tree:
    raise Refusal(f"{path}: not Orbax metadata (no \"tree_metadata\" object of entries)")
  keys = {}
  for name, entry in tree.items():
    parts = entry.get("key_metadata") if isinstance(entry, dict) else None
    if not (isinstance(parts, list) and parts and all(
        isinstance(p, dict) and isinstance(p.get("key"), str) for p in parts)) \
        or not isinstance(entry.get("value_metadata"), dict):
      raise Refusal(f"{path}: the entry {one_line(name)[:100]!r} is not of Orbax's form "
                    "(key_metadata, value_metadata)")
    key = tuple(p["key"] for p in parts)
    keys[".".join(key)] = key
  return keys


def _stored_params(step_dir: str, manager, step: int):
  """`({dotted parameter path: (shape, dtype)}, metadata tree)` as stored (read from the
  array metadata, no data), each checked for form; a problem is a Refusal naming the file."""
  keys = _metadata_keys(step_dir)
  if not any(key[0] == "params" for key in keys.values()):
    raise Refusal(f"{storage.join(step_dir, 'state', '_METADATA')}: the state has no "
                  "'params' entry")
  try:
    tree = manager.item_metadata(step)["state"].tree["params"]
  except Exception as e:  # noqa: BLE001 (whatever Orbax or tensorstore make of a crafted file)
    raise Refusal(f"{storage.join(step_dir, 'state')}: the arrays' metadata is unreadable "
                  f"({one_line(f'{type(e).__name__}: {e}')[:200]})") from e
  stored = {}
  for path, meta in tree_paths.flatten(tree).items():
    shape, dtype = getattr(meta, "shape", None), getattr(meta, "dtype", None)
    where = f"{storage.join(step_dir, 'state')} ({path})"
    if not (isinstance(shape, tuple) and all(isinstance(n, (int, np.integer)) and n >= 0
                                             for n in shape)):
      raise Refusal(f"{where}: the stored shape {shape!r} is not a shape")
    try:
      dtype = np.dtype(dtype)
    except TypeError as e:
      raise Refusal(f"{where}: the stored dtype {dtype!r} is not a dtype") from e
    if not np.issubdtype(dtype, np.floating) and dtype.name != "bfloat16":
      raise Refusal(f"{where}: stored as {dtype.name}; parameters are floating point")
    stored[path] = (tuple(int(n) for n in shape), dtype)
  return stored, tree


def _compare_with_model(step_dir: str, stored: dict, model_config) -> None:
  """The stored tree against the model's abstract parameters (no allocation), or the size
  bounds when there is no model: every problem before a byte of data is read."""
  where = storage.join(step_dir, "state")
  if model_config is None:
    big = [f"{p} {s}" for p, (s, _) in stored.items() if math.prod(s) > MAX_ELEMENTS_PER_ARRAY]
    total = sum(math.prod(s) for s, _ in stored.values())
    if big or total > MAX_ELEMENTS:
      raise Refusal(f"{where}: stored shapes larger than any model of this project "
                    f"({capped_list(big) or f'{total:,} elements in all'})")
    return
  _, abstract = abstract_params(model_config)
  want = {p: tuple(v.shape) for p, v in tree_paths.flatten(abstract).items()}
  problems = []
  unknown = sorted(set(stored) - set(want))
  if unknown:
    problems.append("no such parameter in the model: " + capped_list(unknown))
  missing = sorted(set(want) - set(stored))
  if missing:
    problems.append("missing: " + capped_list(missing))
  for path in sorted(set(stored) & set(want)):
    shape = stored[path][0]
    if shape == want[path]:
      continue
    if params_lib.resizable_temporal(path, shape, want[path]) \
        and shape[1] <= MAX_TEMPORAL_POSITIONS:
      continue  # a 4-frame run may start a 12-frame one (`params.assign` resizes)
    problems.append(f"{path} is stored as {shape}, the model has {want[path]}")
  if problems:
    raise Refusal(f"{where}: does not fit the model of the config: "
                  + capped_list(problems, sep="; "))


def params_from(source: str, model_config, initial: Mapping | None = None, *,
                pick: str = "best") -> dict:
  """`{dotted path: np.ndarray}` of every parameter, from a run folder or a VindLU file.

  `initial`: `{dotted path: array}` of the run's freshly initialised parameters, which
  give the values of the parameters a VindLU checkpoint lacks (the T2V blocks), so no
  second model is built. A run folder is read as saved (its shapes), so that a 4-frame
  pretraining run can initialise a 12-frame fine-tune (`params.assign` resizes). `pick`:
  'best' reads the step named in the folder's `best.json` if there is one (a fine-tune
  that kept its best epoch), else the latest; 'latest' always the latest.

  A run folder's step is checked as a resumed run checks it (`run_checkpoints.py`): a
  damaged step is named and the next older one used; none usable is a `Refusal` naming
  the folder and each step's damage. The stored tree, shapes and dtypes are compared with
  `model_config`'s abstract parameters before anything is restored (a Refusal naming the
  file); `model_config=None` (export without a config) bounds their sizes instead.
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
  directory = storage.abspath(directory)
  # Read only: a folder of another run is never written to (no temp folders cleaned up).
  manager = ocp.CheckpointManager(directory, item_names=("state", "data_iter"),
                                  options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    return _read_run_folder(source, directory, manager, model_config, pick)
  finally:
    manager.close()


def _read_run_folder(source, directory, manager, model_config, pick) -> dict:
  is_main = jax.process_index() == 0
  damaged = []
  for step in _run_folder_steps(source, directory, manager, pick):
    step_dir = storage.join(directory, str(step))
    reason, unverified = inspect_step(step_dir, data_iter=False)
    if reason is None:
      if unverified and is_main:
        print(f"Warning: init_from {step_dir} is unverified: {unverified}. Its bytes cannot "
              "all be checked; it is used if its metadata fits the model and it restores.",
              flush=True)
      stored, tree = _stored_params(step_dir, manager, step)
      _compare_with_model(step_dir, stored, model_config)
      # The target is the stored tree, now known to fit: shapes as saved (a temporal
      # embedding of another frame count is resized by `params.assign`).
      item = {"params": tree_paths.unflatten_like(
          tree, {p: jax.ShapeDtypeStruct(s, d) for p, (s, d) in stored.items()})}
      if "step" in _metadata_keys(step_dir):
        item["step"] = jax.ShapeDtypeStruct((), np.int32)  # must be the folder's step
      restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
      try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True)))["state"]
        check_restored_step(step, restored)
      except Exception as e:  # noqa: BLE001 (a step that fails to read is damaged, as on resume)
        reason = f"restoring it failed ({one_line(f'{type(e).__name__}: {e}')[:300]})"
      else:
        if damaged and is_main:
          print(f"init_from: using {step_dir} instead", flush=True)
        params = {path: np.asarray(value)
                  for path, value in tree_paths.flatten(restored["params"]).items()}
        # The rule every weight source is held to (weight_rules): a run folder whose step
        # restores cleanly may still hold NaN / inf (a run that diverged before it saved).
        problems = [f"{path} {problem}" for path, value in params.items()
                    if (problem := weight_rules.weight_problem(value))]
        if problems:
          raise Refusal(f"init_from {step_dir}: " + capped_list(problems, sep="; "))
        return params
    damaged.append(f"step {step}: {reason}")
    if is_main:
      print(f"Warning: init_from {step_dir} is damaged: {reason}. It is not used; the next "
            "older step is tried.", flush=True)
  raise Refusal(f"init_from={source!r}: no usable checkpoint step in {directory} ("
                f"{capped_list(damaged, sep='; ')})")


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
        and ckpt.check(best["step"]) is None:  # checked once: the latest may be the best
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
