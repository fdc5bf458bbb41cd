"""Bad media files never stop training; too many of them do, with a clear message.

In the worker processes, `load_with_substitutes` reads a sample; when the file is
missing, empty, truncated, undecodable or has fewer frames than asked, it reads another
entry of the same corpus instead, chosen from the record's own seeded RNG (so the
substitute is the same on every run and with any worker count). Each failure travels
with the example, as `decode_failures` (int32 count) and `failure_log` (one line per
failure: reason, path, message), because counters in worker processes would be lost.

In the main process, the training loop draws its batches through a `TrackedIterator`,
which calls `FailureTracker.update(batch)` per batch: it logs each failure with its path,
keeps the counts for the training log (`tracker.counts()`), and raises `DataFailureError`
listing the first failures when more than `failure_fraction` of the reads failed (after
`min_samples` reads). The checkpointer saves the tracker's state beside the iterator's
(`t2v2t_jax/checkpoints/run_checkpoints.py`), so a resumed run keeps counting where it
stopped.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import re
from typing import Any, Callable

import numpy as np

REASONS = ("missing", "empty", "too_few_frames", "undecodable")
FAILURE_KEYS = ("decode_failures", "failure_log")  # host-only batch fields

logger = logging.getLogger(__name__)

# How video_decode says a file holds fewer frames than its header (and the clip) need.
_TOO_FEW_FRAMES = re.compile(r"frame \d+ was requested|ended before frame")


@dataclasses.dataclass(frozen=True)
class Failure:
  reason: str  # one of REASONS
  path: str
  message: str

  def encode(self) -> str:
    clean = lambda s: " ".join(str(s).split())  # no tabs or newlines inside a field
    return f"{self.reason}\t{clean(self.path)}\t{clean(self.message)}"

  @classmethod
  def decode(cls, line: str) -> Failure:
    reason, path, message = (line.split("\t", 2) + ["", ""])[:3]
    return cls(reason, path, message)

  def __str__(self) -> str:
    return f"{self.reason}: {self.path} ({self.message})"


class MediaError(Exception):
  """A media file that cannot give the sample asked for; carries the failure reason."""

  def __init__(self, reason: str, path: str, message: str):
    super().__init__(f"{reason}: {path}: {message}")
    self.failure = Failure(reason, path, message)


def check_file(path: str) -> None:
  """Raises `MediaError` for a missing or empty file (cheap, before decoding)."""
  try:
    size = os.path.getsize(path)
  except FileNotFoundError as e:
    raise MediaError("missing", path, "file not found") from e
  except OSError as e:
    raise MediaError("missing", path, f"cannot stat: {e}") from e
  if size == 0:
    raise MediaError("empty", path, "file is empty")


def classify(path: str, exc: BaseException) -> Failure:
  """The failure record of an exception raised while reading `path`."""
  if isinstance(exc, MediaError):
    return exc.failure
  message = f"{type(exc).__name__}: {exc}"
  if isinstance(exc, FileNotFoundError) or not os.path.exists(path):
    return Failure("missing", path, message)
  if os.path.getsize(path) == 0:
    return Failure("empty", path, message)
  if _TOO_FEW_FRAMES.search(str(exc)):
    return Failure("too_few_frames", path, message)
  return Failure("undecodable", path, message)


def encode_failure_log(failures: list[Failure]) -> str:
  return "\n".join(f.encode() for f in failures)


def decode_failure_log(log: str) -> list[Failure]:
  return [Failure.decode(line) for line in str(log).split("\n") if line]


def load_with_substitutes(load: Callable[[int], Any], index: int, num_items: int,
                          rng: np.random.Generator, max_attempts: int,
                          path_of: Callable[[int], str]) -> tuple[Any, int, list[Failure]]:
  """Calls `load(index)`; on failure `load(j)` for j drawn from `rng` in [0, num_items).

  Returns `(value, index actually used, failures)`. Raises `DataFailureError` when
  `max_attempts` reads in a row fail (then the data set is broken, not a few files).
  """
  failures = []
  for _ in range(max_attempts):
    try:
      return load(index), index, failures
    except Exception as e:  # pylint: disable=broad-except
      # Any exception while reading a file is that file's fault until the failure
      # fraction says otherwise; FailureTracker stops the run with the messages.
      failures.append(classify(path_of(index), e))
      index = int(rng.integers(num_items))
  listed = "\n  ".join(str(f) for f in failures)
  raise DataFailureError(f"{max_attempts} reads in a row failed; the data is unreadable:\n  {listed}")


class DataFailureError(RuntimeError):
  """Too many bad samples: the data (or the media root) is broken."""


class FailureTracker:
  """Accumulates the failure records of the batches in the main process.

  Attributes:
    samples: examples delivered.
    failures: failed reads (each replaced by a substitute).
    by_reason: failures per reason.
    first_failures: the first `max_listed` failures, for the stop message.
  """

  def __init__(self, failure_fraction: float = 0.01, min_samples: int = 1000,
               max_listed: int = 10):
    self.failure_fraction = float(failure_fraction)
    self.min_samples = int(min_samples)
    self.max_listed = int(max_listed)
    self.samples = 0
    self.failures = 0
    self.by_reason: collections.Counter[str] = collections.Counter()
    self.first_failures: list[Failure] = []

  @classmethod
  def from_config(cls, data_cfg) -> FailureTracker:
    return cls(data_cfg.failure_fraction, data_cfg.failure_min_samples, data_cfg.failures_listed)

  @property
  def reads(self) -> int:
    return self.samples + self.failures

  @property
  def fraction(self) -> float:
    return self.failures / self.reads if self.reads else 0.0

  def update(self, batch: dict) -> list[Failure]:
    """Counts a (process-local, numpy) batch; logs and returns its failures.

    Raises `DataFailureError` when the failure fraction is exceeded.
    """
    counts = np.asarray(batch["decode_failures"]).reshape(-1)
    self.samples += counts.size
    self.failures += int(counts.sum())
    new = []
    if counts.any():
      for log in np.asarray(batch["failure_log"]).reshape(-1):
        new.extend(decode_failure_log(log))
    for failure in new:
      logger.warning("Bad sample replaced by a substitute: %s", failure)
      self.by_reason[failure.reason] += 1
      if len(self.first_failures) < self.max_listed:
        self.first_failures.append(failure)
    self.check()
    return new

  def check(self) -> None:
    if self.reads >= self.min_samples and self.fraction > self.failure_fraction:
      listed = "\n  ".join(str(f) for f in self.first_failures)
      reasons = ", ".join(f"{r}: {n}" for r, n in sorted(self.by_reason.items()))
      raise DataFailureError(
          f"{self.failures} of {self.reads} sample reads failed ({self.fraction:.2%} > "
          f"failure_fraction {self.failure_fraction:.2%}; {reasons}). Check the media "
          f"root and the files. First failures:\n  {listed}")

  def counts(self) -> dict[str, float]:
    """Scalars for the training log."""
    out = {"data/samples": self.samples, "data/decode_failures": self.failures,
           "data/failure_fraction": self.fraction}
    for reason in REASONS:
      out[f"data/failures_{reason}"] = self.by_reason.get(reason, 0)
    return out

  def summary(self) -> str:
    """One line for the console, '' while nothing failed: '3/1200 reads (0.25%; missing 2,
    undecodable 1)'."""
    if not self.failures:
      return ""
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(self.by_reason.items()))
    return f"{self.failures}/{self.reads} reads ({self.fraction:.2%}; {reasons})"

  def get_state(self) -> dict:
    """JSON-able state, to save beside the iterator state."""
    return {"samples": self.samples, "failures": self.failures,
            "by_reason": dict(self.by_reason),
            "first_failures": [f.encode() for f in self.first_failures]}

  def set_state(self, state: dict) -> None:
    self.samples = int(state["samples"])
    self.failures = int(state["failures"])
    self.by_reason = collections.Counter({str(k): int(v) for k, v in state["by_reason"].items()})
    self.first_failures = [Failure.decode(s) for s in state["first_failures"]]


class TrackedIterator:
  """The training batches with their `FailureTracker`: every batch drawn is counted (and
  may raise `DataFailureError`). `Checkpointer.save` / `restore` take this object as the
  data iterator and checkpoint both the Grain iterator and the tracker."""

  def __init__(self, iterator, failures: FailureTracker):
    self.iterator = iterator
    self.failures = failures

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    batch = next(self.iterator)
    self.failures.update(batch)
    return batch

  def close(self) -> None:
    close = getattr(self.iterator, "close", None)
    if close is not None:
      close()
