"""A dependency-free progress bar for long passes (embedding, reranking, data prep)."""

from __future__ import annotations

import sys
import time


class Progress:
  """`with Progress(total, "embed videos") as bar: bar.update(n)`; prints to stderr.

  Redraws at most every `interval` seconds, so it costs nothing inside hot loops, and
  prints one final line with the rate when done.
  """

  def __init__(self, total: int, desc: str, *, enabled: bool = True, interval: float = 1.0,
               stream=None):
    self.total, self.desc, self.enabled, self.interval = total, desc, enabled, interval
    self.stream = stream or sys.stderr
    self.done = 0
    self.start = self.last = time.perf_counter()

  def __enter__(self):
    return self

  def update(self, n: int = 1):
    self.done += n
    now = time.perf_counter()
    if self.enabled and now - self.last >= self.interval:
      self.last = now
      self._draw(now, end="\r")

  def _draw(self, now, end):
    elapsed = max(now - self.start, 1e-9)
    rate = self.done / elapsed
    frac = self.done / self.total if self.total else 1.0
    eta = (self.total - self.done) / rate if rate > 0 else float("inf")
    bar = "#" * int(20 * frac) + "." * (20 - int(20 * frac))
    self.stream.write(f"{self.desc}: [{bar}] {self.done}/{self.total} "
                      f"{rate:.1f}/s elapsed {elapsed:.0f}s eta {eta:.0f}s{end}")
    self.stream.flush()

  def __exit__(self, *exc):
    if self.enabled:
      self._draw(time.perf_counter(), end="\n")
    return False
