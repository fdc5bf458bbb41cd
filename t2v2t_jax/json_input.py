"""JSON files read from outside the program, refused in one line naming the file.

One reader for annotation files, dataset downloads, checkpoint configs and indexes, and
the pipeline's own prepared-data records: a missing or unreadable file, bytes that are not
UTF-8, text that is not JSON, nesting deep enough to exhaust Python's recursion (json
recurses once per level) and, where the caller sets a cap, a file too large for what it is
meant to be are each one `error` (a `Refusal` unless the caller names its own type).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

from t2v2t_jax.errors import Refusal, one_line


def read_json(path, *, error: type[Exception] = Refusal, max_bytes: int | None = None,
              what: str = "this file") -> Any:
  """The value of the JSON file at `path` (a local path or an `etils.epath` one, e.g.
  gs://). With `max_bytes`, at most that many bytes are ever read: a larger file is refused
  as too large for `what`."""
  name = os.fspath(path)
  try:
    if "://" in name:
      from etils import epath  # noqa: PLC0415 (only remote paths need it)
      f = epath.Path(name).open("rb")
    else:
      f = open(name, "rb")
    with f:
      data = f.read() if max_bytes is None else f.read(max_bytes + 1)
  except FileNotFoundError:
    raise error(f"{name}: file not found") from None
  except OSError as e:
    raise error(f"{name}: cannot be read ({one_line(e)[:200]})") from None
  if max_bytes is not None and len(data) > max_bytes:
    raise error(f"{name}: more than the {max_bytes:,} bytes {what} may have")
  try:
    return json.loads(data.decode("utf-8"))
  except UnicodeDecodeError as e:
    raise error(f"{name}: not UTF-8 text ({one_line(e)[:200]})") from None
  except RecursionError:
    raise error(f"{name}: JSON nested too deeply (more than ~{sys.getrecursionlimit()} "
                "levels)") from None
  except ValueError as e:
    raise error(f"{name}: not valid JSON ({one_line(e)[:200]})") from None


__all__ = ["read_json"]
