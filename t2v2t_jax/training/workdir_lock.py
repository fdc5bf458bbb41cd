"""One trainer per workdir: `workdir/train.lock`, a small JSON file that names its holder.

Two trainers in one workdir would save the same steps, quarantine each other's steps and
interleave their metrics (before this lock, one died on Orbax's temp folder). The lock
records the holder's host, pid, process start time and a heartbeat that a background
thread refreshes every `HEARTBEAT_SECS`. A second trainer is refused with the holder's
name, unless the lock is stale:
- same host, and the pid is gone (or is another process now: its start time differs),
  e.g. a trainer killed with SIGKILL;
- any host, and the heartbeat is older than `STALE_SECS` (a preempted VM whose trainer
  cannot be asked; clocks of the hosts are assumed to agree within minutes).
A stale lock is taken over, with a line saying whose it was.

Taking the lock is a check-and-create: locally `O_CREAT | O_EXCL`, atomic on one
filesystem. On `gs://` an object has no exclusive create through the path layer, so the
lock is written and read back after a pause: two trainers starting within the same
second may both see their own name at first, but only one keeps it (the later write wins
and the other is refused when it reads back). This is a guard against mistakes (a second
command in the same workdir), not a distributed mutex. NFS-style shared folders get the
local behaviour, with the heartbeat rule for holders on other hosts.

Only process 0 of a multi-host run takes the lock: the other processes belong to the
same trainer.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time

import jax
import numpy as np

from t2v2t_jax import storage
from t2v2t_jax.errors import Refusal

LOCK_FILE = "train.lock"
HEARTBEAT_SECS = 60.0
STALE_SECS = 600.0  # 10 heartbeats missed: the holder is gone
REMOTE_SETTLE_SECS = 1.0  # gs://: the pause between writing the lock and reading it back


class WorkdirLockedError(Refusal):
  """Another live trainer holds the workdir's lock (it is named)."""


def _process_start(pid: int) -> str | None:
  """The kernel's start time of `pid` (Linux: /proc/<pid>/stat field 22), which tells a
  reused pid from the holder; None where there is no /proc."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      stat = f.read()
  except OSError:
    return None
  # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
  return stat[stat.rfind(")") + 2:].split()[19]


def _alive(pid: int, start: str | None) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by another user
  found = _process_start(pid)
  return start is None or found is None or found == start


def _describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on {holder.get('host')}, started "
          f"{holder.get('started', '?')}, last heartbeat {holder.get('heartbeat_utc', '?')}")


class WorkdirLock:
  """`acquire()` takes `workdir/train.lock` (or raises `WorkdirLockedError`), `release()`
  gives it back; a context manager too."""

  def __init__(self, workdir: str, *, heartbeat_secs: float = HEARTBEAT_SECS,
               stale_secs: float = STALE_SECS):
    self.path = storage.join(workdir, LOCK_FILE)
    self.heartbeat_secs = heartbeat_secs
    self.stale_secs = stale_secs
    self.enabled = jax.process_index() == 0
    self.held = False
    self._stop = threading.Event()
    self._thread = None
    now = time.time()
    self.record = {"host": socket.gethostname(), "pid": os.getpid(),
                   "process_start": _process_start(os.getpid()),
                   "started": _utc(now), "token": f"{socket.gethostname()}:{os.getpid()}:{now}"}

  # -- taking ------------------------------------------------------------------------------
  def acquire(self) -> WorkdirLock:
    if jax.process_count() == 1:
      return self._acquire()
    # Process 0 takes the lock for the whole trainer; the others learn whether it did, so
    # that a refusal stops every process instead of leaving them waiting at a collective.
    from jax.experimental import multihost_utils  # noqa: PLC0415
    error = None
    if self.enabled:
      try:
        self._acquire()
      except WorkdirLockedError as e:
        error = e
    taken = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if error is not None:
      raise error
    if not taken:
      raise WorkdirLockedError(f"{self.path}: process 0 could not take the workdir's lock "
                               "(its log names the holder)")
    return self

  def _acquire(self) -> WorkdirLock:
    for _ in range(3):  # a stale lock removed, then created again (another may race us)
      if self._create():
        self.held = True
        self._start_heartbeat()
        return self
      holder = self._read()
      if holder is None:
        continue  # released between our create and our read: try again
      stale = self._stale_reason(holder)
      if stale is None:
        raise WorkdirLockedError(
            f"{self.path}: another trainer is running in this workdir ({_describe(holder)}). "
            "One trainer per workdir: wait for it, stop it, or use another --workdir. If it "
            "is gone and its host cannot say so, delete the lock file.")
      print(f"Taking over {self.path}: its holder ({_describe(holder)}) {stale}.", flush=True)
      storage.remove(self.path)
    raise WorkdirLockedError(f"{self.path}: could not take the lock (other trainers keep "
                             "taking it)")

  def _payload(self) -> str:
    return json.dumps({**self.record, "heartbeat": time.time(),
                       "heartbeat_utc": _utc(time.time())})

  def _create(self) -> bool:
    storage.makedirs(os.path.dirname(self.path) or ".")
    if storage.is_remote(self.path):
      if storage.exists(self.path):
        return False
      storage.write_text(self.path, self._payload())
      time.sleep(REMOTE_SETTLE_SECS)  # let a concurrent writer's object land, then look
      holder = self._read()
      return holder is not None and holder.get("token") == self.record["token"]
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "w") as f:
      f.write(self._payload())
    return True

  def _read(self) -> dict | None:
    try:
      holder = json.loads(storage.read_text(self.path))
    except FileNotFoundError:
      return None
    except (OSError, ValueError, RecursionError):
      # Unreadable (cut short while written): someone made it; treat it as old as the file.
      return {"host": "?", "pid": None, "heartbeat": self._mtime()}
    return holder if isinstance(holder, dict) else {"host": "?", "pid": None,
                                                    "heartbeat": self._mtime()}

  def _mtime(self) -> float:
    try:
      return storage.path(self.path).stat().mtime
    except (OSError, AttributeError):
      return 0.0

  def _stale_reason(self, holder: dict) -> str | None:
    """Why `holder` no longer holds the lock, or None if it may be running."""
    pid, host = holder.get("pid"), holder.get("host")
    if host == self.record["host"] and isinstance(pid, int) and not isinstance(pid, bool) \
        and not _alive(pid, holder.get("process_start")):
      return "is no longer running"
    beat = holder.get("heartbeat")
    if isinstance(beat, (int, float)) and time.time() - beat > self.stale_secs:
      return f"has not refreshed it for {int(time.time() - beat)} s"
    return None

  # -- holding -----------------------------------------------------------------------------
  def _start_heartbeat(self) -> None:
    def beat():
      while not self._stop.wait(self.heartbeat_secs):
        try:
          holder = self._read()
          if holder is None or holder.get("token") != self.record["token"]:
            return  # taken over (we were thought stale): leave the new holder's file alone
          storage.write_text(self.path, self._payload())
        except OSError:
          pass  # a missed heartbeat is retried; STALE_SECS allows for many
    self._thread = threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def release(self) -> None:
    if not self.held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    holder = self._read()
    if holder is not None and holder.get("token") == self.record["token"]:
      storage.remove(self.path)
    self.held = False

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


def _utc(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
