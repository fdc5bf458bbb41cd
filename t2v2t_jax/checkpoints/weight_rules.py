"""The one rule every weight source is held to, and the checks that enforce it.

Issue 25: a small crafted file must never cost more than its own size, and never end in a
raw exception. Every importer (VindLU `.pth`, Hugging Face folders, run folders) applies:

- finite floating-point weights (float16/32/64, bfloat16, float8 — half and float8 are
  converted to float32, each storage once however many keys share it), no empty ones;
- the expected shapes, compared BEFORE anything is converted, resized or built (shapes
  are known from the abstract model, `nnx.eval_shape`);
- every error names its file (and key or field), and lists are capped (`errors.capped_list`);
- no path outside the given folder (shard names, `..`, symlinks);
- bounded recursion and sizes: JSON read with a size cap, layer indices in key names
  bounded before any `range()`.

The functions raise or return `errors.Refusal` texts; callers collect problems and raise
one `Refusal` subclass of their own.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np

from t2v2t_jax import json_input
from t2v2t_jax.errors import Refusal, capped_list

# A layer index in a key name above this is refused before any range() or set of
# indices is built (the largest published ViT / BERT variants have under 100 layers).
MAX_LAYER_INDEX = 1000
# config.json and index files are a few KiB; a file beyond this is not one of them.
MAX_JSON_BYTES = 16 << 20
NO_DEFAULT = object()  # `field(...)` without a default: the field must be there


# ----------------------------------------------------------------------------------------
# Weights.
# ----------------------------------------------------------------------------------------

def is_floating(dtype) -> bool:
  """float16/32/64 and the ml_dtypes floats (bfloat16, float8_*): numpy says kind 'V' for
  the latter, so `dtype.kind == 'f'` alone would refuse a bfloat16 checkpoint."""
  dtype = np.dtype(dtype)
  if dtype.kind == "f":
    return True
  try:
    ml_dtypes.finfo(dtype)
  except (ValueError, TypeError):
    return False
  return True


def needs_upcast(dtype) -> bool:
  """Floating types narrower than float32, which are computed in float32 here."""
  dtype = np.dtype(dtype)
  return is_floating(dtype) and dtype.itemsize < 4


def storage_key(array: np.ndarray) -> tuple:
  """Identifies the bytes an array views: keys that share one storage (a tensor saved
  under many names) are checked and converted once. The caller keeps the arrays alive,
  so an address cannot be reused while the key is in use."""
  a = np.asarray(array)
  return (a.__array_interface__["data"][0], a.shape, a.strides, a.dtype.str)


class WeightChecks:
  """`weight_problem` and `as_float32` with one result per storage (see `storage_key`)."""

  def __init__(self):
    self._problems: dict[tuple, str | None] = {}
    self._converted: dict[tuple, np.ndarray] = {}

  def problem(self, array) -> str | None:
    key = storage_key(array)
    if key not in self._problems:
      self._problems[key] = weight_problem(array)
    return self._problems[key]

  def as_float32(self, array) -> np.ndarray:
    """Half precision and float8 as float32 (one copy per storage); others unchanged."""
    a = np.asarray(array)
    if not needs_upcast(a.dtype):
      return a
    key = storage_key(a)
    if key not in self._converted:
      self._converted[key] = a.astype(np.float32)
    return self._converted[key]


def weight_problem(array) -> str | None:
  """Why `array` cannot be a weight (not floating point, empty, or not finite), else None."""
  a = np.asarray(array)
  if not is_floating(a.dtype):
    return f"has dtype {a.dtype} (weights must be floating point)"
  if a.size == 0:
    return f"is empty (shape {tuple(a.shape)}; no weight of a model is)"
  bad = int(a.size - np.count_nonzero(np.isfinite(a)))
  if bad:
    return f"holds {bad} non-finite value(s) (NaN or inf) of {a.size}"
  return None


def upcast_all(tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Every half / float8 tensor as float32, each storage converted once."""
  checks = WeightChecks()
  return {k: checks.as_float32(v) if isinstance(v, np.ndarray) else v
          for k, v in tensors.items()}


# ----------------------------------------------------------------------------------------
# Messages.
# ----------------------------------------------------------------------------------------

def problems_text(problems: list[str], indent: str = "\n    ") -> str:
  """Problems one per line, capped: a 200,000-key file must not print megabytes."""
  return indent + capped_list(problems, sep=indent)


def headline(problems: list[str]) -> str:
  more = f" (and {len(problems) - 1:,} more, below)" if len(problems) > 1 else ""
  return f"{problems[0]}{more}"


def named(file: str, key: str) -> str:
  """`'key' (in file)`: the key as quoted elsewhere, then the file it was read from."""
  return f"{key[:200]!r} (in {file})" if file else repr(key[:200])


# ----------------------------------------------------------------------------------------
# Layer indices in key names.
# ----------------------------------------------------------------------------------------

def layer_indices(keys: Iterable[str], pattern: str, *, source: str = "",
                  limit: int = MAX_LAYER_INDEX, error=Refusal) -> set[int]:
  """The integers group 1 of `pattern` captures in `keys`, each at most `limit` (checked
  as it is read: a key `layer.30000000.x` must not make anything 30M long)."""
  out: set[int] = set()
  match = re.compile(pattern).match
  for key in keys:
    m = match(key)
    if not m:
      continue
    digits = m.group(1)
    if len(digits) > len(str(limit)) or int(digits) > limit:
      raise error(f"{source + ': ' if source else ''}key {key[:120]!r} names layer "
                  f"{digits[:20]}, more than the {limit} layers any supported model has")
    out.add(int(digits))
  return out


def contiguous_count(indices: set[int]) -> int | None:
  """n when `indices` is exactly {0..n-1}, else None (no range() is built)."""
  if not indices:
    return 0
  n = len(indices)
  return n if min(indices) == 0 and max(indices) == n - 1 else None


# ----------------------------------------------------------------------------------------
# Files: JSON, fields, paths.
# ----------------------------------------------------------------------------------------

def read_json(path, error=Refusal) -> Any:
  """A JSON file of a checkpoint, at most `MAX_JSON_BYTES` read; one `error` naming the
  file (missing, too large, not UTF-8, not JSON, nested too deeply)."""
  return json_input.read_json(path, error=error, max_bytes=MAX_JSON_BYTES,
                              what="a JSON file of a checkpoint")


def json_object(value, file: str, what: str = "the file", error=Refusal) -> dict:
  if not isinstance(value, dict):
    raise error(f"{file}: {what} is a JSON {type(value).__name__}, expected an object")
  return value


def field(config: Mapping, name: str, file: str, kind: type = int, *, default=NO_DEFAULT,
          minimum=None, maximum=None, error=Refusal):
  """`config[name]` checked to be a `kind` (int: a JSON integer, not a bool; float: any
  finite number; str; bool) within [minimum, maximum]; one `error` naming file and field."""
  if name not in config:
    if default is NO_DEFAULT:
      raise error(f"{file}: field {name!r} is missing")
    return default
  value = config[name]
  ok = {int: lambda v: type(v) is int,
        float: lambda v: type(v) is int or (type(v) is float and math.isfinite(v)),
        bool: lambda v: type(v) is bool,
        str: lambda v: type(v) is str}[kind](value)
  if not ok:
    raise error(f"{file}: field {name!r} is {str(json.dumps(value))[:80]}, expected "
                f"{'a finite number' if kind is float else 'an integer' if kind is int else kind.__name__}")
  if minimum is not None and value < minimum or maximum is not None and value > maximum:
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    raise error(f"{file}: field {name!r} is {value}, expected {bounds}")
  return kind(value)


def inside_folder(folder, name: str, *, file: str = "", error=Refusal):
  """`folder / name` for a file name that a checkpoint file itself chose (a shard in an
  index): relative, no `..`, and (local) resolving inside `folder` after symlinks."""
  from etils import epath  # noqa: PLC0415
  where = f"{file}: " if file else ""
  if not isinstance(name, str) or not name or "\x00" in name:
    raise error(f"{where}file name {str(name)[:80]!r} is not a file name")
  norm = posixpath.normpath(name.replace("\\", "/"))
  if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or \
      re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", norm):
    raise error(f"{where}file {name[:120]!r} lies outside the folder {os.fspath(folder)}")
  path = epath.Path(folder) / norm
  text = os.fspath(path)
  if not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):  # local: symlinks resolved
    root = os.path.realpath(os.fspath(folder))
    real = os.path.realpath(text)
    if os.path.commonpath([root, real]) != root:
      raise error(f"{where}file {name[:120]!r} resolves to {real}, outside the folder {root}")
  return path
