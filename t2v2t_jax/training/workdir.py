"""A run's workdir before training starts: its saved config, and an earlier run in it.

`save_config` writes `config.json`; a run that resumes from the workdir's checkpoint with
other settings is told which fields changed (`warn_if_resuming_with_changes`). A workdir
with no usable checkpoint but an earlier run's logs is refused (`check_start_from_scratch`)
unless `config.start_over` moves those logs to `previous_runs/<n>/` first, so a new run
neither mixes its metrics with the old ones nor silently drops the old progress.
"""

from __future__ import annotations

import json

import jax

from t2v2t_jax import storage
from t2v2t_jax.checkpoints.run_checkpoints import DAMAGED_DIR, NoUsableCheckpointError
from t2v2t_jax.tree_paths import flatten_config

PREVIOUS_RUNS = "previous_runs"  # where `start_over` moves an earlier run's logs
_ABSENT = object()
# Where a run's processes meet, not what the run computes: a restarted multi-host job may
# get a new coordinator address, and each process has its own id.
_NOT_SETTINGS = ("multihost.coordinator_address", "multihost.process_id")


def save_config(config, workdir: str) -> None:
  if jax.process_index() != 0:
    return
  # Written aside, then renamed over: the other processes of a resumed multi-host run read
  # the old file at the same time (`warn_if_resuming_with_changes`), and must never see
  # it truncated.
  storage.write_text(storage.join(workdir, "config.json"), config.to_json_best_effort(indent=2))


def config_differences(saved: dict, config) -> list[tuple[str, object, object]]:
  """`(dotted field, saved value, value in config)` for every field that differs between a
  saved `config.json` (parsed) and `config`; a field one of them lacks shows as None."""
  # Both sides through JSON, so that tuples, lists and references compare as saved.
  old = flatten_config(saved)
  new = flatten_config(json.loads(config.to_json_best_effort()))
  return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new))
          if old.get(k, _ABSENT) != new.get(k, _ABSENT) and k not in _NOT_SETTINGS]


def describe_differences(diffs, limit: int = 12) -> str:
  text = ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in diffs[:limit])
  return text + (f", and {len(diffs) - limit} more" if len(diffs) > limit else "")


def warn_if_resuming_with_changes(config, workdir: str, *, resuming: bool) -> list:
  """A run that continues from `workdir`'s checkpoint (`resuming`) with another config
  resumes, but not exactly (batches, schedule) and, for model fields, maybe not at all:
  say which fields changed before anything else happens. Returns the differences."""
  path = storage.join(workdir, "config.json")
  if not resuming or not storage.isfile(path):
    return []
  diffs = config_differences(json.loads(storage.read_text(path)), config)
  if diffs and jax.process_index() == 0:
    print(f"Warning: {workdir} holds checkpoints of a run with other settings; resuming "
          f"with these changes: {describe_differences(diffs)}. Use a new --workdir to start "
          f"afresh (or --config.init_from={workdir} to start from its parameters).",
          flush=True)
  return diffs


def _logged_training(metrics_path: str) -> bool:
  """Whether `metrics.jsonl` holds a training step (a row with a loss); evaluation rows
  alone, e.g. of a zero-shot `--mode eval` in the same folder, do not count."""
  try:
    text = storage.read_text(metrics_path) if storage.exists(metrics_path) else ""
  except OSError:
    return False
  for line in text.splitlines():
    try:
      if "loss" in json.loads(line):
        return True
    except ValueError:
      continue  # a line cut short by a crash
  return False


def earlier_run(workdir: str) -> list[str]:
  """What an earlier training run left in `workdir` that a run from scratch would mix
  with or silently drop: logged training steps, damaged checkpoints set aside. (A
  `config.json` alone, from a run that stopped before its first step, loses nothing.)"""
  found = []
  if _logged_training(storage.join(workdir, "metrics.jsonl")):
    found.append("metrics.jsonl")
  damaged = storage.join(workdir, DAMAGED_DIR)
  if storage.listdir(damaged):
    found.append(DAMAGED_DIR + "/")
  return found


def check_start_from_scratch(config, workdir: str, damaged: dict | None = None) -> None:
  """Called when `workdir` has no usable checkpoint: a new run may start there only if no
  earlier run is in it, or if `config.start_over` says so, and then the earlier run's logs
  are moved to `previous_runs/<n>/` first. Raises `NoUsableCheckpointError` otherwise."""
  found = earlier_run(workdir)
  if damaged:
    found.append("damaged checkpoint step(s) " + ", ".join(map(str, sorted(damaged))))
  if not found:
    return
  if not config.get("start_over", False):
    raise NoUsableCheckpointError(
        f"{workdir} holds an earlier run ({', '.join(found)}) but no usable checkpoint to "
        f"resume from; refusing to start from scratch over it. Use a new --workdir, or pass "
        f"--config.start_over=True to start from scratch here (the earlier run's logs are "
        f"then moved to {storage.join(workdir, PREVIOUS_RUNS)}/<n>/).")
  moved = _move_logs_aside(workdir)
  if jax.process_index() == 0:
    print(f"Starting over in {workdir} (start_over=True): no usable checkpoint; the earlier "
          f"run's logs were moved to {moved}.", flush=True)


def _move_logs_aside(workdir: str) -> str:
  base = storage.join(workdir, PREVIOUS_RUNS)
  n = 1
  while storage.exists(storage.join(base, str(n))):
    n += 1
  target = storage.join(base, str(n))
  if jax.process_index() == 0:
    storage.makedirs(target)
    for name in ("config.json", "metrics.jsonl", "tensorboard", "eval", "eval_cache"):
      if storage.exists(storage.join(workdir, name)):
        storage.move(storage.join(workdir, name), storage.join(target, name))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("earlier run moved aside")
  return target
