"""The videos of an eval corpus that could not be read: counted, named, checked.

A video that is missing, empty, truncated or undecodable becomes a black clip in the eval
pipeline (a substitute would break the ground truth) and is ranked like any other, so the
metrics only mean something with the list of those videos beside them. `BrokenVideos`
watches the batches as the evaluator embeds them (each item carries its failure record,
`input_pipeline/bad_data.py`), gathers the list from every process, prints it under the
results table, hands it to the results JSON, and stops the evaluation, before the
reranking, when more than `data.failure_fraction` of the corpus is broken.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from input_pipeline import bad_data
from input_pipeline import pipeline as pipeline_lib

LISTED_IN_ERROR = 50  # broken videos named in the stop message (all are in the JSON)


class BrokenVideos:
  """Collects the broken videos of one `EvalData` while its batches are read."""

  def __init__(self, data: pipeline_lib.EvalData):
    self.data = data
    self.codes = np.zeros(data.num_videos, np.int32)  # 0: read; else 1 + REASONS index
    self.messages: dict[int, str] = {}                # read by this process only
    self.entries: list[dict] = []

  def watch(self, data: pipeline_lib.EvalData) -> pipeline_lib.EvalData:
    """`data` whose batches are recorded as they are iterated."""
    return dataclasses.replace(data, videos=self._batches(data.videos))

  def _batches(self, videos):
    it = iter(videos)
    try:
      for batch in it:
        self._record(batch)
        yield batch
    finally:  # the evaluator releases the shared memory once it holds no batch
      pipeline_lib.close_iterator(it)

  def _record(self, batch: dict) -> None:
    counts = np.asarray(batch["decode_failures"]).reshape(-1)
    if not counts.any():
      return
    index = np.asarray(batch["video_idx"]).reshape(-1)
    valid = np.asarray(batch["valid"]).reshape(-1)
    logs = np.asarray(batch["failure_log"]).reshape(-1)
    for i, ok, n, log in zip(index, valid, counts, logs):
      if not ok or not n:  # padding repeats the last video: counted once, where valid
        continue
      failure = bad_data.decode_failure_log(str(log))[0]
      self.codes[int(i)] = 1 + bad_data.REASONS.index(failure.reason)
      self.messages[int(i)] = failure.message

  def collect(self) -> list[dict]:
    """Every broken video of the corpus, in index order: `{video, path, reason, message}`
    (the message is '' for a video another process read)."""
    codes = self.codes
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # noqa: PLC0415
      codes = np.asarray(multihost_utils.process_allgather(codes)).max(axis=0)
    paths = self.data.video_paths
    self.entries = [
        {"video": int(i), "path": paths[i] if i < len(paths) else "",
         "reason": bad_data.REASONS[codes[i] - 1], "message": self.messages.get(int(i), "")}
        for i in np.flatnonzero(codes)]
    return self.entries

  def check(self, failure_fraction: float) -> None:
    """Raises `DataFailureError` naming the broken videos when more than
    `failure_fraction` of the corpus is broken."""
    n, total = len(self.entries), self.data.num_videos
    if not total or n / total <= failure_fraction:
      return
    shown = self.entries[:LISTED_IN_ERROR]
    more = f"\n  ... and {n - len(shown)} more" if n > len(shown) else ""
    raise bad_data.DataFailureError(
        f"{n} of {total} videos of eval corpus {self.data.name!r} could not be read "
        f"({n / total:.1%} > data.failure_fraction {failure_fraction:.1%}); they would be "
        f"scored as black clips, so the evaluation stops. Fix or remove them (or raise "
        f"data.failure_fraction):\n  " + "\n  ".join(_line(e) for e in shown) + more)

  def report(self) -> str:
    """Lines for the console under the results table ('' when every video was read)."""
    if not self.entries:
      return ""
    return (f"Broken videos: {len(self.entries)} of {self.data.num_videos} could not be read "
            f"and were scored as black clips:\n  "
            + "\n  ".join(_line(e) for e in self.entries))


def _line(entry: dict) -> str:
  message = f" ({entry['message']})" if entry["message"] else ""
  return f"{entry['reason']:<15} {entry['path']}{message}"
