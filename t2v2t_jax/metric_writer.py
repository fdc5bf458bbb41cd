"""Metrics to TensorBoard (tensorboardX: no TensorFlow), a JSONL file and the console.

Training writes its losses here and evaluation its retrieval results, into the same
`workdir/metrics.jsonl` and `workdir/tensorboard`. Only process 0 writes, so multi-host
runs log once. Locally each row is flushed as it is written; with the workdir on GCS
(`storage.py`), where objects cannot be appended to, both files are uploaded whole every
`flush_secs` and at `close`.

A run resumed from step S redoes the steps after S: `MetricWriter(workdir, resume_step=S)`
first drops the rows of those steps from `metrics.jsonl` (and any line a crash cut
short), and TensorBoard is given `purge_step=S + 1`, so that it drops the earlier event
files' points from that step on. Each redone step then has one row, not two.
"""

from __future__ import annotations

import io
import json
import time

import jax
import numpy as np

from t2v2t_jax import storage

FLUSH_SECS = 30.0  # how often a workdir on GCS gets the rows written since the last upload


class _ObjectRecordWriter:
  """tensorboardX's record writer for `gs://` through the project's path layer (its own
  needs google-cloud-storage's client): the event file is kept in memory and uploaded
  whole at each flush, which tensorboardX calls every `flush_secs` and at close."""

  def __init__(self, path):
    self.path = path
    self.buffer = io.BytesIO()

  def write(self, data):
    self.buffer.write(data)

  def flush(self):
    storage.path(self.path).write_bytes(self.buffer.getvalue())

  def close(self):
    self.flush()


class _ObjectRecordWriterFactory:
  def open(self, path):
    return _ObjectRecordWriter(path)

  def directory_check(self, path):
    del path  # an object store has no folders to create


def _register_gcs_writer():
  from tensorboardX import record_writer  # noqa: PLC0415
  record_writer.register_writer_factory("gs", _ObjectRecordWriterFactory())


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else None


def drop_rows_after(path: str, step: int) -> int:
  """Rewrites the JSONL log `path` without its rows of steps after `step`, and without
  lines that do not parse (a row cut short by a crash would otherwise be glued to the next
  one). Returns how many lines were dropped; the file is rewritten whole (atomically, also
  on GCS) only if there are any."""
  if not storage.exists(path):
    return 0
  kept, dropped = [], 0
  for line in storage.read_text(path).splitlines():
    try:
      row = json.loads(line)
      later = isinstance(row, dict) and isinstance(row.get("step"), (int, float)) \
          and row["step"] > step
    except ValueError:
      later = True
    if later or not line.strip():
      dropped += 1
    else:
      kept.append(line + "\n")
  if dropped:
    storage.write_text(path, "".join(kept))
  return dropped


class MetricWriter:
  def __init__(self, workdir: str, *, enabled: bool | None = None,
               resume_step: int | None = None):
    """`resume_step`: the step a resumed run continues from; the rows of later steps (to
    be redone) are replaced, not duplicated."""
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if self.enabled:
      storage.makedirs(workdir)
      from tensorboardX import SummaryWriter  # protobuf only, no TensorFlow
      _register_gcs_writer()
      jsonl = storage.join(workdir, "metrics.jsonl")
      purge = None
      if resume_step is not None:
        drop_rows_after(jsonl, resume_step)
        purge = int(resume_step) + 1  # TensorBoard drops points at steps >= purge_step
      self._tb = SummaryWriter(storage.join(workdir, "tensorboard"), flush_secs=FLUSH_SECS,
                               purge_step=purge)
      self._jsonl = storage.AppendableText(jsonl, flush_secs=FLUSH_SECS)

  def write(self, step: int, metrics: dict, *, prefix: str = ""):
    if not self.enabled:
      return
    row = {"step": int(step), "time": time.time()}
    for k, v in metrics.items():
      s = _scalar(v) if not isinstance(v, (int, float)) else float(v)
      if s is None:
        continue
      row[prefix + k] = s
      self._tb.add_scalar(prefix + k, s, int(step))
    self._jsonl.write(json.dumps(row) + "\n")

  def close(self):
    if self.enabled:
      self._tb.close()
      self._jsonl.close()


def format_duration(seconds: float) -> str:
  if not np.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(step, total_steps, metrics, samples_per_sec, eta_seconds, failures=None) -> str:
  parts = [f"step {step}/{total_steps}"]
  for key in ("loss", "loss_vtc", "loss_vtm", "loss_mlm"):
    if key in metrics:
      parts.append(f"{key} {float(metrics[key]):.4f}")
  if "lr" in metrics:
    parts.append(f"lr {float(metrics['lr']):.2e}")
  parts.append(f"{samples_per_sec:.1f} samples/s")
  parts.append(f"eta {format_duration(eta_seconds)}")
  if failures:
    parts.append(f"bad data {failures}")
  return " | ".join(parts)
