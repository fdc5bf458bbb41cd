"""A run's Orbax checkpoints: train state, Grain iterator state and bad-data counts, saved
together, checked before they are used, and restored whole (training) or parameters only
(evaluation and search).

One `CheckpointManager` per workdir (`DIR/checkpoints/<step>/{state,data_iter,bad_data}`),
saving asynchronously when the train loop asks (every `checkpoint_every` steps and at the
end), keeping the last K.
The train state holds parameters, optimizer state, step and the base RNG key, so a
resumed run continues with exactly the batches and random draws of an uninterrupted one;
`bad_data` holds each process's `FailureTracker` counts, so the failure fraction is not
reset by a resume.

Integrity: once a step is complete (before the next save starts, and at `close`), process
0 writes `<step>/integrity.json`, the size and CRC-32 of every file of the step. A step is
usable if its folder holds the state (and, for training, this process's data-iterator
file), its JSON files parse, and every file matches its record. Orbax reads damaged data
without a word (a flipped bit in a tensor chunk restores as a wrong value), so the record
is what finds it; a step without a record (the run stopped before writing it) gets the
structural checks only, and a restore that still fails counts as damage too.

`latest_step()` is the newest usable step: each newer, damaged one is named in a warning
(and, with `quarantine=True`, as in training, moved to `checkpoints_damaged/<step>` so that
the resumed run can save that step again), and the run resumes from the step before.
`restore_params` reads the `params` entry of the state alone (no optimizer moments), with
the same fall-back to older steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import zlib
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

INTEGRITY_FILE = "integrity.json"
DAMAGED_DIR = "checkpoints_damaged"   # beside `checkpoints`, for the damaged steps moved away
ITEMS = ("state", "data_iter", "bad_data")


class NoUsableCheckpointError(FileNotFoundError):
  """Every checkpoint step of a workdir is damaged (each is named)."""


# ----------------------------------------------------------------------------------------
# The bad-data counts as an Orbax item: one JSON file per process, like Grain's iterator.
# ----------------------------------------------------------------------------------------

def _process_file(directory) -> epath.Path:
  return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class BadDataHandler:
  """Saves and restores each process's `FailureTracker.get_state()` (a JSON dict)."""

  def save(self, directory, item=None, args=None):
    _process_file(directory).write_text(json.dumps((item or args.item).get_state(), indent=1))

  def restore(self, directory, item=None, args=None):
    tracker = item or args.item
    path = _process_file(directory)
    if not path.exists():
      raise ValueError(f"{path} does not exist")
    tracker.set_state(json.loads(path.read_text()))
    return tracker

  def structure(self, directory):
    del directory

  def metadata(self, directory):
    del directory

  def finalize(self, directory):
    del directory

  def close(self):
    pass

  @classmethod
  def typestr(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


@ocp.args.register_with_handler(BadDataHandler, for_save=True)
@dataclasses.dataclass
class BadDataSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(BadDataHandler, for_restore=True)
@dataclasses.dataclass
class BadDataRestore(ocp.args.CheckpointArgs):
  item: Any


def _split_iterator(data_iter):
  """(Grain iterator, FailureTracker or None) of what the train loop passes: a
  `bad_data.TrackedIterator` carries both."""
  if data_iter is not None and hasattr(data_iter, "iterator") and hasattr(data_iter, "failures"):
    return data_iter.iterator, data_iter.failures
  return data_iter, None


# ----------------------------------------------------------------------------------------
# Integrity records.
# ----------------------------------------------------------------------------------------

def _files(step_dir: str) -> dict[str, str]:
  """{path relative to the step folder: absolute path} of every file but the record."""
  out = {}
  for root, _, names in os.walk(step_dir):
    for name in names:
      full = os.path.join(root, name)
      rel = os.path.relpath(full, step_dir)
      if rel != INTEGRITY_FILE:
        out[rel] = full
  return out


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 24):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_integrity(step_dir: str) -> None:
  """Records size and CRC-32 of every file of a complete step (atomically)."""
  record = {"format": 1, "files": {rel: [os.path.getsize(p), _crc32(p)]
                                   for rel, p in sorted(_files(step_dir).items())}}
  tmp = os.path.join(step_dir, INTEGRITY_FILE + ".tmp")
  with open(tmp, "w") as f:
    json.dump(record, f, indent=0)
  os.replace(tmp, os.path.join(step_dir, INTEGRITY_FILE))


def check_step(step_dir: str, *, data_iter: bool) -> str | None:
  """Why the step in `step_dir` cannot be restored, or None if it looks usable.

  `data_iter`: this process's data-iterator file is required (training resumes it)."""
  if not os.path.isdir(step_dir):
    return "the step folder is missing"
  files = _files(step_dir)
  if not files and not os.path.exists(os.path.join(step_dir, INTEGRITY_FILE)):
    return "the step folder is empty"
  needed = ["state/_METADATA", "state/manifest.ocdbt"]
  if data_iter:
    needed.append(f"data_iter/process_{jax.process_index()}-of-{jax.process_count()}.json")
  for rel in needed:
    if rel not in files:
      return f"{rel} is missing"
  record_path = os.path.join(step_dir, INTEGRITY_FILE)
  if os.path.exists(record_path):
    try:
      with open(record_path) as f:
        record = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
      return f"its {INTEGRITY_FILE} is unreadable ({type(e).__name__})"
    for rel, (size, crc) in sorted(record.items()):
      path = files.get(rel)
      if path is None:
        return f"{rel} is missing"
      actual = os.path.getsize(path)
      if actual != size:
        return f"{rel} has {actual} bytes, {size} were written (truncated or overwritten)"
      if _crc32(path) != crc:
        return f"{rel} does not match its checksum (its bytes changed after it was written)"
  for rel, path in files.items():  # also what a record cannot cover (a step saved without one)
    if rel.endswith(".json") or rel == "state/_METADATA":
      try:
        with open(path) as f:
          json.load(f)
      except (OSError, ValueError) as e:
        return f"{rel} is not valid JSON ({type(e).__name__})"
  return None


# ----------------------------------------------------------------------------------------
# The checkpointer.
# ----------------------------------------------------------------------------------------

class Checkpointer:
  """The workdir's checkpoints: save, find the newest usable step, restore (falling back to
  older steps when a step turns out damaged)."""

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               quarantine: bool = False, verbose: bool = True):
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep={max_to_keep}: at least the last checkpoint must be kept")
    self.directory = os.path.abspath(directory)
    self.quarantine = quarantine
    self.verbose = verbose and jax.process_index() == 0
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self.damaged: dict[int, str] = {}      # step -> reason, found in this process
    self.restored_step: int | None = None  # the step `restore` actually read
    self._usable: int | None = None
    self._checked = False
    self._recorded: set[int] = set()
    self._saved_here: set[int] = set()  # only these get a record: an older step is not vouched for

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  # -- finding a step ---------------------------------------------------------------------
  def latest_step(self, *, data_iter: bool = True) -> int | None:
    """The newest usable step (checked once; see the module docstring), or None."""
    if not self._checked:
      self._usable = self._find_usable(data_iter=data_iter)
      self._checked = True
    return self._usable

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def _find_usable(self, *, data_iter: bool, below: int | None = None) -> int | None:
    for step in sorted(self.manager.all_steps(), reverse=True):
      if below is not None and step >= below:
        continue
      reason = self.damaged.get(step) or check_step(self.step_dir(step), data_iter=data_iter)
      if reason is None:
        return step
      self._mark_damaged(step, reason)
    return None

  def _mark_damaged(self, step: int, reason: str) -> None:
    self.damaged[step] = reason
    where = self.step_dir(step)
    if self.quarantine:
      where = self._move_aside(step)
    if self.verbose:
      print(f"Warning: checkpoint step {step} in {self.directory} is damaged: {reason}. "
            f"It is not used{f' (moved to {where})' if self.quarantine else ''}; the newest "
            "good step before it is used instead, if there is one.", flush=True)

  def _move_aside(self, step: int) -> str:
    """Moves a damaged step out of the manager's folder, so the run can save it again."""
    base = os.path.join(os.path.dirname(self.directory), DAMAGED_DIR)
    target, n = os.path.join(base, str(step)), 1
    while os.path.exists(target):
      n += 1
      target = os.path.join(base, f"{step}.{n}")
    if jax.process_index() == 0:
      os.makedirs(base, exist_ok=True)
      shutil.move(self.step_dir(step), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      multihost_utils.sync_global_devices(f"checkpoint step {step} moved aside")
    self.manager.reload()
    return target

  # -- saving -----------------------------------------------------------------------------
  def _record_finished(self) -> None:
    """Integrity records for the complete steps that lack one (nothing is in flight)."""
    if jax.process_index() != 0:
      return
    for step in self.manager.all_steps():
      if step in self._recorded or step not in self._saved_here:
        continue
      step_dir = self.step_dir(step)
      if os.path.isdir(step_dir) and not os.path.exists(os.path.join(step_dir, INTEGRITY_FILE)) \
          and step not in self.damaged:
        write_integrity(step_dir)
      self._recorded.add(step)

  def save(self, step: int, state, data_iter=None) -> bool:
    """Saves `step` (the train loop decides when: Orbax's own interval is not used)."""
    # The previous save is waited for anyway by Orbax; doing it here first lets its step
    # get its record while nothing (no save, no deletion of old steps) is in flight.
    self.manager.wait_until_finished()
    self._record_finished()
    iterator, failures = _split_iterator(data_iter)
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(iterator)
    if failures is not None:
      items["bad_data"] = BadDataSave(failures)
    saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    if saved:
      self._usable, self._checked = step, True
      self._saved_here.add(step)
    return saved

  # -- restoring --------------------------------------------------------------------------
  def restore(self, step: int, abstract_state, data_iter=None):
    """Restore into the shapes/shardings of `abstract_state` (and `data_iter` in place).

    A step that fails to restore is named as damaged and the next older usable step is
    restored instead (`restored_step` says which); none left: `NoUsableCheckpointError`."""
    iterator, failures = _split_iterator(data_iter)
    return self._restore_with_fallback(
        step, lambda s: self._restore_step(s, abstract_state, iterator, failures),
        data_iter=iterator is not None)

  def restore_params(self, step: int, abstract_params):
    """The `params` entry of step `step`'s state alone, into the shapes/shardings of
    `abstract_params` (evaluation and search: the optimizer moments are not read). Falls
    back to older steps like `restore`."""
    def read(s):
      args = ocp.args.PyTreeRestore(item={"params": abstract_params}, partial_restore=True,
                                    restore_args=ocp.checkpoint_utils.construct_restore_args(
                                        {"params": abstract_params}))
      return self.manager.restore(s, args=ocp.args.Composite(state=args))["state"]["params"]
    return self._restore_with_fallback(step, read, data_iter=False)

  def _restore_with_fallback(self, step, read, *, data_iter: bool):
    tried = []
    while step is not None:
      try:
        state = read(step)
        self.restored_step = step
        return state
      except Exception as e:  # noqa: BLE001 (any failure to read a step is damage to it)
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:300]
        tried.append(step)
        self._mark_damaged(step, f"restoring it failed ({reason})")
        step = self._find_usable(data_iter=data_iter, below=step)
        self._usable = step
    raise NoUsableCheckpointError(
        f"No usable checkpoint in {self.directory}: step(s) {', '.join(map(str, tried))} "
        "could not be restored (see the warnings above)")

  def _restore_step(self, step, abstract_state, iterator, failures):
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if iterator is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(iterator)
    # Steps saved before the counts were checkpointed have no bad_data item.
    if failures is not None and os.path.isdir(os.path.join(self.step_dir(step), "bad_data")):
      items["bad_data"] = BadDataRestore(failures)
    return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

  def close(self):
    """Waits for the last save (it holds the iterator's state), records it, closes."""
    self.manager.wait_until_finished()
    self._record_finished()
    self.manager.close()
