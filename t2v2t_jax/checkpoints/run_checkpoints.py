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
0 writes `<step>/integrity.json`, the size and CRC32C of every file of the step (from the
object listing when the workdir is on GCS: no download; format-1 records of older runs,
zlib's CRC-32, are still checked). A step is
usable if its folder holds the state (and, for training, this process's data-iterator
file), its JSON files parse, and every file matches its record. Orbax reads damaged data
without a word (a flipped bit in a tensor chunk restores as a wrong value), so the record
is what finds it. A step whose record is missing (the run stopped before writing it),
empty, of another form, or silent about some files is *unverified*: named in a warning,
given the structural checks, and used only if it restores; a restore that fails counts as
damage. The record names its step and the restored state's `step` must be the folder's: a
step folder holding another step's checkpoint is damaged (a run "resumed from 10" must not
start at 8).

A save that fails (read-only or full folder) raises `CheckpointSaveError`, one line that
names the last good step; the train loop stops there.

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
import zlib
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from t2v2t_jax import storage
from t2v2t_jax.errors import Refusal, capped_list, one_line

INTEGRITY_FILE = "integrity.json"
BEST_FILE = "best.json"  # in the checkpoints folder: the step selected by `config.best_key`
DAMAGED_DIR = "checkpoints_damaged"   # beside `checkpoints`, for the damaged steps moved away
ITEMS = ("state", "data_iter", "bad_data")


class NoUsableCheckpointError(FileNotFoundError):
  """Every checkpoint step of a workdir is damaged (each is named)."""


class CheckpointSaveError(Refusal):
  """A checkpoint could not be written (a read-only or full folder): the run stops at once,
  naming the last step that was saved, instead of training on with nothing saved."""


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

def _zlib_crc32(step_dir: str, rel: str) -> int:
  """The checksum of format-1 records (steps saved before format 2)."""
  return zlib.crc32(storage.read_bytes(storage.join(step_dir, rel)))


def _folder_step(step_dir: str) -> int | None:
  """The step number a step folder's name gives (`.../checkpoints/10` -> 10), else None."""
  name = os.path.basename(os.fspath(step_dir).rstrip("/"))
  return int(name) if name.isdigit() else None


def write_integrity(step_dir: str) -> None:
  """Records size and CRC32C of every file of a complete step (written whole, atomically).

  CRC32C is the checksum GCS keeps for every object: with the workdir in a bucket the
  record comes from the object listing, with no download of the step just written;
  locally each file is read once (from the page cache, just written) at ~2.7 GB/s.
  The record also names its step, so that a step folder copied or renamed over another
  one (`8` as `10`) is found before it is restored."""
  files = storage.files_with_checksums(step_dir)
  files.pop(INTEGRITY_FILE, None)
  record = {"format": 2, "checksum": "crc32c", "step": _folder_step(step_dir),
            "files": {rel: [size, crc] for rel, (size, crc) in sorted(files.items())}}
  storage.write_text(storage.join(step_dir, INTEGRITY_FILE), json.dumps(record, indent=0))


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _record_fields(record) -> tuple[dict, bool, int | None]:
  """`(files, crc32c, step)` of a parsed record; ValueError (what is wrong) for a record of
  another form: it must be checked here, not where its entries are used, or a `"files":
  [...]` would be a TypeError in the middle of a resume."""
  if not isinstance(record, dict):
    raise ValueError(f"a JSON {type(record).__name__}, not an object")
  fmt = record.get("format", 1)
  if not _is_int(fmt) or fmt not in (1, 2):
    raise ValueError(f"format {fmt!r} is not 1 or 2")
  step = record.get("step")
  if step is not None and not _is_int(step):
    raise ValueError(f"step {step!r} is not an integer")
  files = record.get("files")
  if not isinstance(files, dict):
    raise ValueError("no \"files\" object")
  for rel, entry in files.items():
    if not (isinstance(entry, list) and len(entry) == 2 and all(_is_int(v) and v >= 0
                                                                 for v in entry)):
      raise ValueError(f"the entry of {rel!r} is not [size, checksum]")
  return files, fmt >= 2, step


def _json_problem(step_dir: str, rel: str) -> str | None:
  try:
    json.loads(storage.read_text(storage.join(step_dir, rel)))
  except (OSError, ValueError, RecursionError) as e:  # RecursionError: nested 100,000 deep
    return f"{rel} is not valid JSON ({type(e).__name__})"
  return None


def inspect_step(step_dir: str, *, data_iter: bool) -> tuple[str | None, str | None]:
  """`(damage, unverified)` of the step in `step_dir`: why it cannot be restored (None if
  it looks usable), and, for a usable step, why its bytes could not all be checked against
  a record (a record missing, empty, of another form, or silent about some files): such a
  step is used with a warning, if it restores and its state names its own step.

  `data_iter`: this process's data-iterator file is required (training resumes it)."""
  if not storage.isdir(step_dir):
    return "the step folder is missing", None
  record_path = storage.join(step_dir, INTEGRITY_FILE)
  has_record = storage.exists(record_path)
  files, crc32c, record_step, unverified = None, False, None, None
  if has_record:
    try:
      record = json.loads(storage.read_text(record_path))
    except (OSError, ValueError, RecursionError) as e:
      return f"its {INTEGRITY_FILE} is unreadable ({type(e).__name__})", None
    try:
      files, crc32c, record_step = _record_fields(record)
    except ValueError as e:
      unverified = f"its {INTEGRITY_FILE} is not an integrity record ({e})"
  else:
    unverified = (f"it has no {INTEGRITY_FILE} (the run stopped before writing it, or it was "
                  "deleted)")
  # One listing of the step (a GCS listing gives the checksums with the sizes).
  actual = storage.files_with_checksums(step_dir) if files and crc32c else None
  sizes = ({rel: size for rel, (size, _) in actual.items()} if actual is not None
           else storage.list_files(step_dir))
  sizes.pop(INTEGRITY_FILE, None)
  if not sizes:
    return "the step folder is empty", None
  folder_step = _folder_step(step_dir)
  if record_step is not None and folder_step is not None and record_step != folder_step:
    return (f"its {INTEGRITY_FILE} is step {record_step}'s: the folder holds another step's "
            "checkpoint"), None
  needed = ["state/_METADATA", "state/manifest.ocdbt"]
  if data_iter:
    needed.append(f"data_iter/process_{jax.process_index()}-of-{jax.process_count()}.json")
  for rel in needed:
    if rel not in sizes:
      return f"{rel} is missing", None
  if files is not None and not files:
    unverified = f"its {INTEGRITY_FILE} lists no files"
  elif files:
    for rel, (size, crc) in sorted(files.items()):
      if rel not in sizes:
        return f"{rel} is missing", None
      if sizes[rel] != size:
        return (f"{rel} has {sizes[rel]} bytes, {size} were written (truncated or "
                "overwritten)"), None
      found = actual[rel][1] if crc32c else _zlib_crc32(step_dir, rel)
      if found != crc:
        return (f"{rel} does not match its checksum (its bytes changed after it was "
                "written)"), None
    extra = sorted(set(sizes) - set(files))
    if extra:
      unverified = (f"{len(extra)} of its files are not in its {INTEGRITY_FILE} "
                    f"({capped_list(extra, 5)})")
  for rel in sizes:  # also what a record cannot cover (a step saved without one)
    if rel.endswith(".json") or rel == "state/_METADATA":
      problem = _json_problem(step_dir, rel)
      if problem:
        return problem, None
  return None, unverified


def check_step(step_dir: str, *, data_iter: bool) -> str | None:
  """Why the step in `step_dir` cannot be restored, or None if it looks usable (perhaps
  unverified: `inspect_step`)."""
  return inspect_step(step_dir, data_iter=data_iter)[0]


def _saved_step_entry(step_dir: str) -> bool:
  """Whether the step's state holds a `step` entry (a converted folder holds params only)."""
  try:
    tree = json.loads(storage.read_text(storage.join(step_dir, "state", "_METADATA")))
    return isinstance(tree, dict) and isinstance(tree.get("tree_metadata"), dict) \
        and "('step',)" in tree["tree_metadata"]
  except (OSError, ValueError, RecursionError):
    return False  # checked elsewhere; the restore then fails and says why


class StepMismatchError(ValueError):
  """A step folder whose state names another step (a folder copied over another)."""


def check_restored_step(step: int, state) -> None:
  """The restored state's own `step` must be the folder's: a run "resumed from .../10" that
  starts at step 8 retrains 9-10 and then cannot save step 10."""
  if isinstance(state, dict) and "step" in state:
    value = state["step"]
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
      value = value.addressable_data(0)  # multi-host: the step is replicated
    found = int(np.asarray(value))
    if found != step:
      raise StepMismatchError(f"its state is step {found}'s, not step {step}'s (the folder "
                              "holds another step's checkpoint)")


# ----------------------------------------------------------------------------------------
# The best step: kept beside the latest ones, named in `best.json`.
# ----------------------------------------------------------------------------------------

class _KeepStep:
  """An Orbax preservation policy keeping one step (the best so far) whatever its age; the
  latest `max_to_keep` steps are kept beside it by `LatestN`."""

  def __init__(self):
    self.step: int | None = None

  def should_preserve(self, checkpoints, *, context):
    del context
    return [info.step == self.step for info in checkpoints]


def read_best(directory: str) -> dict | None:
  """`{"step", "key", "value"}` of a checkpoints folder's best step, or None (no marker, or
  one that does not parse: then the latest step is used, as without a `best_key`)."""
  path = storage.join(directory, BEST_FILE)
  try:
    best = json.loads(storage.read_text(path)) if storage.exists(path) else None
    return best if isinstance(best, dict) and isinstance(best.get("step"), int) else None
  except (OSError, ValueError):
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
    storage.check_path(directory, "checkpoint folder")
    self.directory = storage.abspath(directory)
    self.quarantine = quarantine
    self.verbose = verbose and jax.process_index() == 0
    self._keep_best = _KeepStep()
    best = read_best(self.directory)
    self._keep_best.step = best["step"] if best else None
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        create=True, enable_async_checkpointing=async_save,
        # The step's folder is created before `save` returns: a folder that cannot be
        # written fails there, in the train loop, not in a background thread whose failure
        # would show only at the next save (after 300 s of Orbax's signal timeouts).
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
        preservation_policy=policies.AnyPreservationPolicy(
            [policies.LatestN(n=max_to_keep), self._keep_best]))
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    # Orbax asks JAX's preemption sync point about each step it saves, also later, from its
    # save-finalize thread: that would set this process's step back to one the train loop
    # has passed, and a preemption agreed on then could pick a step the loop never reaches.
    # The train loop asks the sync point itself (training/preemption.py); our saves are
    # forced, so Orbax uses the answer only for its logs.
    self.manager.reached_preemption = lambda step: False
    self.damaged: dict[int, str] = {}      # step -> reason, found in this process
    self.restored_step: int | None = None  # the step `restore` actually read
    self._usable: int | None = None
    self._checked = False
    self._recorded: set[int] = set()
    self._saved_here: set[int] = set()  # only these get a record: an older step is not vouched for
    self._verdicts: dict[tuple[int, bool], str | None] = {}  # each step is checked once
    self._last_good: int | None = None  # the newest step known complete on disk
    self._pending: int | None = None    # the step whose (async) save may be in flight
    self._save_failed = False

  def step_dir(self, step: int) -> str:
    return storage.join(self.directory, str(step))

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
      reason = self.check(step, data_iter=data_iter)
      if reason is None:
        return step
      self._mark_damaged(step, reason)
    return None

  def check(self, step: int, *, data_iter: bool = False) -> str | None:
    """Why `step` is damaged, or None (`inspect_step`), checked once per Checkpointer: the
    files of a step are not read twice. An unverified step is named in a warning."""
    if step in self.damaged:
      return self.damaged[step]
    key = (step, data_iter)
    if key not in self._verdicts:
      reason, unverified = inspect_step(self.step_dir(step), data_iter=data_iter)
      self._verdicts[key] = reason
      if reason is None and unverified and self.verbose:
        print(f"Warning: checkpoint step {step} in {self.directory} is unverified: "
              f"{unverified}. Its bytes cannot all be checked; it is used if it restores "
              f"and its state is step {step}'s.", flush=True)
    return self._verdicts[key]

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
    base = storage.join(os.fspath(epath.Path(self.directory).parent), DAMAGED_DIR)
    target, n = storage.join(base, str(step)), 1
    while storage.exists(target):
      n += 1
      target = storage.join(base, f"{step}.{n}")
    if jax.process_index() == 0:
      storage.makedirs(base)
      storage.move(self.step_dir(step), target)
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
      if storage.isdir(step_dir) and not storage.exists(storage.join(step_dir, INTEGRITY_FILE)) \
          and step not in self.damaged:
        write_integrity(step_dir)
      self._recorded.add(step)

  def save(self, step: int, state, data_iter=None) -> bool:
    """Saves `step` (the train loop decides when: Orbax's own interval is not used).

    A save that fails (a read-only or full folder, here or in the background save of the
    step before) raises `CheckpointSaveError`, one line naming the last good step."""
    if self._save_failed:
      raise CheckpointSaveError(f"{self.directory}: an earlier save failed; not saving "
                                f"step {step}")
    try:
      # The previous save is waited for anyway by Orbax; doing it here first lets its step
      # get its record while nothing (no save, no deletion of old steps) is in flight.
      self.manager.wait_until_finished()
      if self._pending is not None:
        self._last_good, self._pending = self._pending, None
      self._record_finished()
      iterator, failures = _split_iterator(data_iter)
      items = {"state": ocp.args.StandardSave(state)}
      if iterator is not None:
        items["data_iter"] = grain.checkpoint.CheckpointSave(iterator)
      if failures is not None:
        items["bad_data"] = BadDataSave(failures)
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:  # noqa: BLE001 (any failure to write is reported the same way)
      # The wait raises for the step before (its background save), `manager.save` for this one.
      raise self._save_error(step if self._pending is None else self._pending, e) from e
    if saved:
      self._usable, self._checked = step, True
      self._saved_here.add(step)
      self._pending = step
    return saved

  def _save_error(self, step: int, error: Exception) -> CheckpointSaveError:
    self._save_failed = True
    last = self._last_good
    if last is None:  # a resumed run: the newest step it found usable, if any
      older = [s for s in self.manager.all_steps() if s < step and s not in self.damaged]
      last = max(older) if older else None
    where = (f"the last good checkpoint is step {last} ({self.step_dir(last)})"
             if last is not None else "no checkpoint of this run was saved")
    return CheckpointSaveError(
        f"{self.step_dir(step)}: saving checkpoint step {step} failed "
        f"({one_line(f'{type(error).__name__}: {error}')[:300]}); the run stops here and "
        f"{where}. Free space or make {self.directory} writable, then rerun the same command "
        "to resume.")

  # -- the best step ------------------------------------------------------------------------
  def best(self) -> dict | None:
    return read_best(self.directory)

  def mark_best(self, step: int, key: str, value: float) -> None:
    """Names `step` (saved) the best so far by `key`: kept from now on beside the latest
    steps, and what `--mode eval` and `init_from` read by default."""
    self._keep_best.step = step
    if jax.process_index() == 0:
      storage.write_text(storage.join(self.directory, BEST_FILE),
                         json.dumps({"step": int(step), "key": key, "value": float(value)}))

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
      item, restore_args = {"params": abstract_params}, ocp.checkpoint_utils.construct_restore_args(
          {"params": abstract_params})
      if _saved_step_entry(self.step_dir(s)):  # read the step too: it must be the folder's
        item["step"] = jax.ShapeDtypeStruct((), np.int32)
        restore_args["step"] = ocp.RestoreArgs(restore_type=np.ndarray)
      args = ocp.args.PyTreeRestore(item=item, partial_restore=True, restore_args=restore_args)
      state = self.manager.restore(s, args=ocp.args.Composite(state=args))["state"]
      check_restored_step(s, state)
      return state["params"]
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
    if failures is not None and storage.isdir(storage.join(self.step_dir(step), "bad_data")):
      items["bad_data"] = BadDataRestore(failures)
    state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
    check_restored_step(step, state)
    return state

  def close(self):
    """Waits for the last save (it holds the iterator's state), records it, closes.

    A failed save is raised here as `CheckpointSaveError` (once); after one, closing only
    releases Orbax's threads, quietly: the failure was already reported in one line."""
    if self._save_failed:
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001 (already reported; Orbax repeats it per thread)
        pass
      return
    try:
      self.manager.wait_until_finished()
      if self._pending is not None:
        self._last_good, self._pending = self._pending, None
    except Exception as e:  # noqa: BLE001
      error = self._save_error(self._pending, e)
      try:
        self.manager.close()
      except Exception:  # noqa: BLE001
        pass
      raise error from e
    self._record_finished()
    self.manager.close()
