"""Read PyTorch `.pth` checkpoints without executing code from the file.

A `torch.save` file is a zip archive whose `data.pkl` is a pickle. Unpickling calls every
global the pickle names (`GLOBAL module name` + `REDUCE`), so a normal `torch.load`
runs whatever the file asks for. `torch.load(weights_only=True)` is safe but rejects
VindLU checkpoints: they hold the run's config as a pickled `utils.easydict.EasyDict`, a
class from VindLU's own package.

`safe_torch_load` unpickles with `RestrictedUnpickler`, whose `find_class` resolves a
global only through a fixed table (`allowed_globals()`) and never imports a module:

- tensor and storage rebuilding: `torch._utils._rebuild_tensor_v2` (and the older
  `_rebuild_tensor`, `_rebuild_parameter`, `_rebuild_parameter_with_state`,
  `torch._tensor._rebuild_from_type_v2`), storage classes, `torch.Size`, `torch.device`,
  the torch dtypes, `torch.Tensor` and `torch.nn.Parameter` (as rebuild targets);
- plain containers: `collections.OrderedDict`, `builtins.{set, frozenset, complex,
  slice, bytearray}`, and `_codecs.encode` restricted to latin-1 (how protocol-2 pickles
  store `bytes`);
- `utils.easydict.EasyDict` and `easydict.EasyDict` are mapped to a stand-in dict
  subclass, turned into plain `dict`s once loading is done.

Any other global raises `UnsafeCheckpointError` naming it (`module.name`) when the
pickle's GLOBAL opcode is read, which is before the REDUCE that would call it: nothing
from the file is ever called. Only zip-format files (torch >= 1.6) are read; the legacy
format and TorchScript archives (which `torch.load` would hand to `torch.jit.load`) are
refused. torch is imported lazily, inside the functions.
"""

from __future__ import annotations

import functools
import os
import pickle
import types
import zipfile
from typing import Any

# Classes stood in for by a plain dict (VindLU pickles its config as an EasyDict).
MAPPED_TO_DICT = frozenset({("utils.easydict", "EasyDict"), ("easydict", "EasyDict")})

_BUILTINS = ("set", "frozenset", "complex", "slice", "bytearray")

_TORCH_REBUILD = (
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
)

_STORAGE_NAMES = (
    "UntypedStorage", "TypedStorage", "ByteStorage", "CharStorage", "ShortStorage", "IntStorage",
    "LongStorage", "HalfStorage", "FloatStorage", "DoubleStorage", "BoolStorage",
    "BFloat16Storage", "ComplexFloatStorage", "ComplexDoubleStorage",
)


class UnsafeCheckpointError(pickle.UnpicklingError):
  """The checkpoint names a global outside the allow-list (or is not a plain torch.save zip)."""

  def __init__(self, message: str, global_name: str | None = None):
    super().__init__(message)
    self.global_name = global_name


class _EasyDictStandIn(dict):
  """Receives a pickled EasyDict: items via SETITEMS, its `__dict__` (a mirror of the
  items) via BUILD. Converted to a plain dict after loading."""

  def __setstate__(self, state):
    if isinstance(state, tuple) and len(state) == 2:  # (dict state, slots state)
      state = state[0]
    if state is None:
      return
    if not isinstance(state, dict):
      raise UnsafeCheckpointError(f"EasyDict state of type {type(state).__name__} (expected a dict)")
    for key, value in state.items():
      self.setdefault(key, value)


def _latin1_encode(text, encoding="latin1", errors="strict"):
  """`_codecs.encode` as protocol-2 pickles use it for bytes; other codecs refused."""
  if encoding not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(text, str):
    raise UnsafeCheckpointError(f"_codecs.encode with encoding {encoding!r} is not allowed",
                                "_codecs.encode")
  return text.encode("latin1", errors)


@functools.lru_cache(maxsize=1)
def allowed_globals() -> dict[tuple[str, str], Any]:
  """`{(module, name): object}` that a checkpoint may name (resolved here, never imported
  from the file's say-so)."""
  import collections
  import builtins

  import torch
  import torch._tensor
  import torch._utils
  import torch.nn.parameter
  import torch.storage

  table: dict[tuple[str, str], Any] = {}
  for mod, name in _TORCH_REBUILD:
    module = {"torch._utils": torch._utils, "torch._tensor": torch._tensor}[mod]
    if hasattr(module, name):
      table[(mod, name)] = getattr(module, name)
  for name in _STORAGE_NAMES:
    for mod, module in (("torch", torch), ("torch.storage", torch.storage)):
      if hasattr(module, name):
        table[(mod, name)] = getattr(module, name)
  for name in dir(torch):
    value = getattr(torch, name, None)
    if isinstance(value, torch.dtype):
      table[("torch", name)] = value
  table[("torch", "Size")] = torch.Size
  table[("torch", "device")] = torch.device
  table[("torch", "Tensor")] = torch.Tensor
  table[("torch._tensor", "Tensor")] = torch.Tensor
  table[("torch.nn.parameter", "Parameter")] = torch.nn.parameter.Parameter
  table[("collections", "OrderedDict")] = collections.OrderedDict
  for name in _BUILTINS:
    table[("builtins", name)] = getattr(builtins, name)
    table[("__builtin__", name)] = getattr(builtins, name)
  table[("_codecs", "encode")] = _latin1_encode
  return table


class RestrictedUnpickler(pickle.Unpickler):
  """`pickle.Unpickler` that resolves globals only from `allowed_globals()`."""

  def find_class(self, module: str, name: str):
    if (module, name) in MAPPED_TO_DICT:
      return _EasyDictStandIn
    obj = allowed_globals().get((module, name))
    if obj is None:
      raise UnsafeCheckpointError(
          f"refusing to load global {module}.{name}: it is not a tensor/storage rebuild "
          "function, a torch dtype or a plain container (the checkpoint would have called "
          "or instantiated it; nothing was executed)", f"{module}.{name}")
    return obj


def restricted_load(file, **kwargs):
  return RestrictedUnpickler(file, **kwargs).load()


# What `torch.load(pickle_module=...)` needs: `.Unpickler` (subclassed by torch to add its
# storage handling) and `.load`; both restricted.
RESTRICTED_PICKLE_MODULE = types.SimpleNamespace(
    __name__=__name__ + ".restricted", Unpickler=RestrictedUnpickler, load=restricted_load)


def _plain(obj, memo=None):
  """Replace every EasyDict stand-in by a plain dict, recursively (shared objects kept shared)."""
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _EasyDictStandIn):
    out = {}
    memo[id(obj)] = out
    for k, v in obj.items():
      out[k] = _plain(v, memo)
    return out
  if isinstance(obj, dict):  # includes OrderedDict: modify in place to keep its type
    memo[id(obj)] = obj
    for k in list(obj):
      obj[k] = _plain(obj[k], memo)
    return obj
  if isinstance(obj, list):
    memo[id(obj)] = obj
    for i, v in enumerate(obj):
      obj[i] = _plain(v, memo)
    return obj
  if isinstance(obj, tuple):
    out = tuple(_plain(v, memo) for v in obj)
    memo[id(obj)] = out
    return out
  return obj


def check_archive(path: str | os.PathLike) -> None:
  """Refuse what `torch.load` would not unpickle with our module: non-zip (legacy) files
  and TorchScript archives."""
  path = os.fspath(path)
  if not zipfile.is_zipfile(path):
    raise UnsafeCheckpointError(
        f"{path}: not a zip-format torch.save file (the legacy pre-1.6 format is not "
        "supported by the safe loader; re-save it with a recent torch)")
  with zipfile.ZipFile(path) as z:
    names = z.namelist()
  if any(n == "constants.pkl" or n.endswith("/constants.pkl") for n in names):
    raise UnsafeCheckpointError(f"{path}: a TorchScript archive, not a state-dict checkpoint "
                                "(TorchScript code would be run to load it)")
  if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
    raise UnsafeCheckpointError(f"{path}: a zip file without data.pkl, not a torch.save file")


def safe_torch_load(path: str | os.PathLike):
  """`torch.load(path)` on the CPU with the restricted unpickler (see the module docstring).

  Returns what was saved (tensors as CPU torch tensors, EasyDicts as plain dicts).
  Raises `UnsafeCheckpointError` naming the first refused global.
  """
  import torch

  check_archive(path)
  obj = torch.load(os.fspath(path), map_location="cpu", weights_only=False, mmap=False,
                   pickle_module=RESTRICTED_PICKLE_MODULE)
  return _plain(obj)
