"""Shared by the pipeline tests: read a few batches of a Grain dataset, then stop its workers."""


def take_batches(ds, n):
  """The first `n` batches of `ds`; the iterator is closed (its worker processes stopped)."""
  it = iter(ds)
  try:
    return [next(it) for _ in range(n)]
  finally:
    it.close()
