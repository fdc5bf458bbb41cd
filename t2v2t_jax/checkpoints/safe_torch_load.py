"""Read PyTorch `.pth` checkpoints without executing anything from the file, in time and
memory bounded by the file's size.

A `torch.save` file is a zip archive whose `data.pkl` is a pickle; the tensors' bytes are
the archive's `data/<key>` records. `torch.load` runs whatever globals the pickle names,
and `torch.load(weights_only=True)` rejects VindLU checkpoints (their config is a pickled
`utils.easydict.EasyDict`). So this module reads the archive itself and never calls
`torch.load`; every refusal is one `UnsafeCheckpointError` line `"<file>: <reason>"`.

1. Format, decided as torch decides it: a zip local-file header (`PK\\x03\\x04`) at byte 0
   is a zip archive; anything else is what torch would hand to its legacy (pre-1.6 pickle
   or tar) loader and is refused. (`zipfile.is_zipfile` looks for the end record near the
   end of the file, so a legacy file with a zip appended passes it while torch reads the
   legacy part.)
2. The archive: one top folder (torch's archive name) holding `data.pkl`, no
   `constants.pkl` (TorchScript), no duplicate names, stored or deflated records only, a
   record starting at byte 0, and declared uncompressed sizes within `MAX_EXPANSION` x the
   file size + `EXPANSION_SLACK` in all, `MAX_RECORD_BYTES` each and `MAX_PICKLE_BYTES`
   for `data.pkl`, checked before anything is read. Records are read up to their declared
   size and their CRC is checked.
3. `data.pkl` runs on Python's pickle machine with a restricted opcode table:
   - GLOBAL resolves only the names of `ALLOWED`, to a fresh inert token; no object shared
     with the rest of the process (a torch function, a class) ever reaches the pickle.
   - REDUCE / NEWOBJ call only this module's own constructors, which check their arguments:
     tensor rebuilding (`_rebuild_tensor{,_v2,_v3}`, parameters, `_rebuild_from_type_v2`),
     `OrderedDict`, the EasyDict stand-in, set / frozenset / complex / slice, `torch.Size`,
     `torch.device` and `_codecs.encode` to latin-1 (protocol-2 `bytes`).
   - BUILD applies only to an OrderedDict or EasyDict stand-in that this load created, and
     only sets plain attributes (OrderedDict) or items (EasyDict).
   - INST, OBJ, NEWOBJ_EX, EXT1/2/4, BYTEARRAY8 and out-of-band buffers are refused
     (`torch.save` writes none of them).
   - A storage (persistent id) is its `data/<key>` record, whose size must be exactly its
     element count x element size. A tensor must lie inside its storage and view at most as
     many elements as the storage holds (an expanded, stride-0 view is refused: importing
     it would materialise it), and all tensors together at most `MAX_VIEW_RATIO` x the
     storages' bytes.
4. The result is walked without recursion to at most `MAX_NESTING` levels, and the EasyDict
   stand-ins become plain dicts.

Tensors come back, as the caller asks, as numpy arrays (`tensors="numpy"`: bfloat16 and
float8 as `ml_dtypes` types, a Parameter as its array, `torch.Size` as a tuple,
`torch.device` as its name; torch is never imported, so weights load where torch is not
installed) or as CPU torch tensors (`tensors="torch"`, the default: torch is imported
lazily). Either way they view the records' bytes (tied weights share their storage, as
with `torch.load`). The checks above are the same for both: only the objects that the
tensor constructors at the end of the chain build differ (`_NumpyTensors`,
`_TorchTensors`). A path may be a `gs://...` URL (read through `etils.epath`).

Why one module of about 850 lines: it is one security boundary. The archive checks, the
opcode table, the allow-list of globals and the constructors it may call decide together
what a hostile file can do, and a review of the boundary has to see all of them at once
(benchmarks/crafted_checkpoints.py attacks it as a whole); split, a part of the allow-list
would sit out of sight of the code that relies on it.
"""

from __future__ import annotations

import collections
import io
import math
import os
import pickle
import re
import zipfile
from typing import Any

import numpy as np

from t2v2t_jax.errors import Refusal

# Sizes, in bytes (see step 2 of the module docstring). A torch.save file stores its
# records uncompressed, so its records add up to less than the file; a re-zipped one may
# deflate them, which real tensors barely survive (random floats compress by ~10%).
MAX_EXPANSION = 4
EXPANSION_SLACK = 1 << 20
MAX_RECORD_BYTES = 16 << 30     # larger than any single tensor of a ViT-L / BERT-L model
MAX_PICKLE_BYTES = 64 << 20     # VindLU's data.pkl (model + optimizer): well under 1 MiB
MAX_VIEW_RATIO = 4              # tied weights view a storage twice; more is amplification
MAX_NESTING = 100               # VindLU's config nests 4 levels deep
MAX_DIMS = 64                   # torch's own limit on tensor dimensions
_QUOTE = 80                     # characters of a name from the file quoted in a message

ZIP_MAGIC = b"PK\x03\x04"

_STORAGE_DTYPES = {
    "ByteStorage": "uint8", "CharStorage": "int8", "ShortStorage": "int16",
    "IntStorage": "int32", "LongStorage": "int64", "HalfStorage": "float16",
    "FloatStorage": "float32", "DoubleStorage": "float64", "BoolStorage": "bool",
    "BFloat16Storage": "bfloat16", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "UntypedStorage": "uint8",
}
_TENSOR_REBUILDS = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3")


def _allowed() -> dict[tuple[str, str], tuple[str, str]]:
  """`{(module, name): (kind, what)}`: every global a checkpoint may name.

  kinds: 'call' (REDUCE calls the `_Unpickler` method `what`; for 'new' also NEWOBJ),
  'storage' (a persistent id's storage type, dtype `what`), 'dtype' (the torch dtype
  `what` itself: dtypes are immutable; `_rebuild_tensor_v3` takes one), 'type' (a tensor
  class, only as an argument of `_rebuild_from_type_v2`)."""
  table = {}
  for name in _TENSOR_REBUILDS:
    table[("torch._utils", name)] = ("call", name)
  for name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
    table[("torch._utils", name)] = ("call", name)
  table[("torch._tensor", "_rebuild_from_type_v2")] = ("call", "_rebuild_from_type_v2")
  for name, dtype in _STORAGE_DTYPES.items():
    table[("torch", name)] = ("storage", dtype)
    table[("torch.storage", name)] = ("storage", dtype)
  table[("torch", "Size")] = ("call", "_size")
  table[("torch", "device")] = ("call", "_device")
  for module, name in (("torch", "Tensor"), ("torch._tensor", "Tensor"),
                       ("torch.nn.parameter", "Parameter")):
    table[(module, name)] = ("type", name)
  table[("collections", "OrderedDict")] = ("new", "_ordered_dict")
  for name in ("set", "frozenset", "complex", "slice"):
    table[("builtins", name)] = ("call", "_" + name)
  table[("_codecs", "encode")] = ("call", "_codecs_encode")
  for module in ("utils.easydict", "easydict"):
    table[(module, "EasyDict")] = ("new", "_easydict")
  for name in ("uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
               "float16", "float32", "float64", "bfloat16", "bool", "complex64", "complex128",
               "half", "float", "double", "long", "int", "short", "cfloat", "cdouble",
               "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    table[("torch", name)] = ("dtype", name)
  return table


ALLOWED = _allowed()
# Old module names that pickles still use (torch renamed torch.tensor; Python 2 builtins).
MODULE_ALIASES = {"torch.tensor": "torch._tensor", "__builtin__": "builtins"}
REFUSED_OPCODES = {
    pickle.INST: "INST", pickle.OBJ: "OBJ", pickle.NEWOBJ_EX: "NEWOBJ_EX",
    pickle.EXT1: "EXT1", pickle.EXT2: "EXT2", pickle.EXT4: "EXT4",
    pickle.BYTEARRAY8: "BYTEARRAY8", pickle.NEXT_BUFFER: "NEXT_BUFFER",
    pickle.READONLY_BUFFER: "READONLY_BUFFER",
}


class UnsafeCheckpointError(pickle.UnpicklingError, Refusal):
  """A checkpoint this loader refuses: a global outside `ALLOWED`, a construct torch.save
  does not write, a size that does not add up, or damage. The message is one line.
  Still an UnpicklingError (what callers of a pickle loader catch) and a `Refusal` (what
  `main.py` / `convert` print as one `FATAL:` line)."""

  def __init__(self, message: str, global_name: str | None = None):
    super().__init__(message)
    self.global_name = global_name


def _quote(value) -> str:
  """`repr` of something the file chose, cut short (a message must stay one short line).
  A numpy array is shown as the tensor it is in the file (the same words either way)."""
  if isinstance(value, np.ndarray):
    text = f"tensor({np.array2string(value, separator=', ', threshold=8)})"
  else:
    text = repr(value)
  return text if len(text) <= _QUOTE else text[:_QUOTE] + "...'"


def _one_line(text: str) -> str:
  return " ".join(str(text).split())


class _Token:
  """What GLOBAL pushes: an inert, immutable name for an allowed global, new per load."""
  __slots__ = ("name", "kind", "what")

  def __init__(self, name: str, kind: str, what: str):
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "kind", kind)
    object.__setattr__(self, "what", what)

  def __setattr__(self, key, value):
    raise UnsafeCheckpointError(f"the pickle tried to set {key!r} on {self.name}")

  def __repr__(self):
    return f"<global {self.name}>"


class _EasyDictStandIn(dict):
  """Receives a pickled EasyDict: items via SETITEMS, its `__dict__` (a mirror of the
  items) via BUILD. Replaced by a plain dict once loading is done."""


class _Storage:
  """A storage of this file: one `data/<key>` record as a 1-D tensor of its dtype."""
  __slots__ = ("key", "dtype", "numel", "data")

  def __init__(self, key, dtype, numel, data):
    self.key, self.dtype, self.numel, self.data = key, dtype, numel, data


# ----------------------------------------------------------------------------------------
# What tensors become: numpy arrays (no torch) or torch tensors.
# ----------------------------------------------------------------------------------------

# torch's dtype aliases, and the canonical name torch prints for each.
_DTYPE_ALIASES = {"half": "float16", "float": "float32", "double": "float64", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64",
                  "cdouble": "complex128"}


def _numpy_dtype(name: str) -> np.dtype:
  if name == "bfloat16" or name.startswith("float8_"):
    import ml_dtypes  # noqa: PLC0415 (a dependency of JAX: always there)
    return np.dtype(getattr(ml_dtypes, name))
  return np.dtype(name)


class _DType:
  """A torch dtype named by the file, without torch: inert and immutable; printed as torch
  prints it (`torch.float16`), so that messages read the same for both kinds of tensors."""
  __slots__ = ("name", "numpy")

  def __init__(self, name: str):
    name = _DTYPE_ALIASES.get(name, name)
    object.__setattr__(self, "name", name)
    object.__setattr__(self, "numpy", _numpy_dtype(name))

  def __setattr__(self, key, value):
    raise UnsafeCheckpointError(f"the pickle tried to set {key!r} on {self}")

  def __eq__(self, other):
    return isinstance(other, _DType) and other.name == self.name

  def __hash__(self):
    return hash(self.name)

  def __repr__(self):
    return f"torch.{self.name}"

  __str__ = __repr__


class _NumpyTensors:
  """Tensors as numpy arrays viewing the records' bytes; torch is never imported."""

  @staticmethod
  def dtype(name: str):
    try:
      return _DType(name)
    except (TypeError, AttributeError):
      raise UnsafeCheckpointError(f"torch.{name} has no numpy equivalent") from None

  @staticmethod
  def is_dtype(value) -> bool:
    return isinstance(value, _DType)

  @staticmethod
  def itemsize(dtype) -> int:
    return dtype.numpy.itemsize

  @staticmethod
  def storage(buf: bytearray, dtype):
    return np.frombuffer(buf, dtype=dtype.numpy)

  @staticmethod
  def same_dtype(data, dtype) -> bool:
    return data.dtype == dtype.numpy

  @staticmethod
  def reinterpret(data, dtype):
    return data.view(dtype.numpy)

  @staticmethod
  def numel(data) -> int:
    return data.size

  @staticmethod
  def element_size(data) -> int:
    return data.itemsize

  @staticmethod
  def strided(data, size, stride, offset):
    # Bounds were checked by the caller: the view lies inside `data`. as_strided goes
    # through `__array_interface__`, whose type string numpy cannot parse back for the
    # ml_dtypes types (float8: '<f1'), so those are strided as same-sized unsigned ints.
    raw = data if data.dtype.isbuiltin == 1 else data.view(f"u{data.itemsize}")
    view = np.lib.stride_tricks.as_strided(
        raw[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride))
    return view if raw is data else view.view(data.dtype)

  @staticmethod
  def is_size(value) -> bool:
    return False  # `_size` gives a plain tuple

  @staticmethod
  def is_tensor(value) -> bool:
    return isinstance(value, np.ndarray)

  @staticmethod
  def parameter(data, requires_grad):
    return data  # numpy has no parameters: the array is the weight

  @staticmethod
  def size(values: tuple):
    return values

  @staticmethod
  def device(kind: str, index):
    return kind if index is None else f"{kind}:{index}"


class _TorchTensors:
  """Tensors as CPU torch tensors viewing the records' bytes (torch imported here only)."""

  def __init__(self):
    import torch  # noqa: PLC0415 (only when torch tensors are asked for)
    self.torch = torch

  def dtype(self, name: str):
    dtype = getattr(self.torch, name, None)
    if not isinstance(dtype, self.torch.dtype):
      raise UnsafeCheckpointError(f"torch.{name} is not a dtype of this torch version")
    return dtype

  def is_dtype(self, value) -> bool:
    return isinstance(value, self.torch.dtype)

  def itemsize(self, dtype) -> int:
    return self.torch.empty((), dtype=dtype).element_size()

  def storage(self, buf: bytearray, dtype):
    if not buf:
      return self.torch.empty(0, dtype=dtype)
    return self.torch.frombuffer(buf, dtype=dtype)

  @staticmethod
  def same_dtype(data, dtype) -> bool:
    return data.dtype == dtype

  def reinterpret(self, data, dtype):
    return data.view(dtype) if data.numel() else self.torch.empty(0, dtype=dtype)

  @staticmethod
  def numel(data) -> int:
    return data.numel()

  @staticmethod
  def element_size(data) -> int:
    return data.element_size()

  @staticmethod
  def strided(data, size, stride, offset):
    return data.as_strided(size, stride, offset)

  def is_size(self, value) -> bool:
    return isinstance(value, self.torch.Size)

  def is_tensor(self, value) -> bool:
    return isinstance(value, self.torch.Tensor)

  def parameter(self, data, requires_grad):
    return self.torch.nn.Parameter(data, requires_grad=requires_grad)

  def size(self, values: tuple):
    return self.torch.Size(values)

  def device(self, kind: str, index):
    return self.torch.device(kind) if index is None else self.torch.device(kind, index)


# ----------------------------------------------------------------------------------------
# The archive.
# ----------------------------------------------------------------------------------------

def _is_url(path: str) -> bool:
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None

class _Archive:
  """A torch.save zip, checked as step 2 of the module docstring describes."""

  def __init__(self, path: str):
    # A URL (gs://...) is read through etils.epath as a seekable file; a local path as
    # before, by name.
    self.file = None
    if _is_url(path):
      from etils import epath  # noqa: PLC0415
      self.file = epath.Path(path).open("rb")
      source = self.file
    else:
      source = path
    try:
      if self.file is not None:
        head = self.file.read(len(ZIP_MAGIC))
        self.file.seek(0, io.SEEK_END)
        self.size = self.file.tell()
        self.file.seek(0)
      else:
        with open(path, "rb") as f:
          head = f.read(len(ZIP_MAGIC))
        self.size = os.path.getsize(path)
      if head != ZIP_MAGIC:
        raise UnsafeCheckpointError(
            "not a zip-format torch.save file (no zip header at byte 0: torch would read it "
            "with its legacy pre-1.6 pickle/tar loader, which this loader does not run; "
            "re-save it with torch >= 1.6)")
      self.zip = zipfile.ZipFile(source)
    except BaseException:
      if self.file is not None:
        self.file.close()
      raise
    try:
      self._check()
    except BaseException:
      self.close()
      raise

  def _check(self) -> None:
    infos = self.zip.infolist()
    if not infos:
      raise UnsafeCheckpointError("an empty zip archive, not a torch.save file")
    names = [i.filename for i in infos]
    if len(set(names)) != len(names):
      dup = next(n for n in names if names.count(n) > 1)
      raise UnsafeCheckpointError(f"the zip holds record {_quote(dup)} twice (zip readers "
                                  "disagree on which one counts)")
    if min(i.header_offset for i in infos) != 0:
      raise UnsafeCheckpointError("no zip record starts at byte 0 (data before the archive: "
                                  "torch and Python's zipfile would read different things)")
    # torch's reader takes the archive's name from its first record's folder.
    self.prefix = names[0].split("/", 1)[0] + "/"
    outside = [n for n in names if not n.startswith(self.prefix)]
    if outside:
      raise UnsafeCheckpointError(f"record {_quote(outside[0])} lies outside the archive "
                                  f"folder {_quote(self.prefix)}")
    self.infos = {n[len(self.prefix):]: i for n, i in zip(names, infos)}
    if "constants.pkl" in self.infos:
      raise UnsafeCheckpointError("a TorchScript archive, not a state-dict checkpoint "
                                  "(TorchScript code would be run to load it)")
    if "data.pkl" not in self.infos:
      raise UnsafeCheckpointError("a zip file without data.pkl, not a torch.save file")
    total = 0
    for info in infos:
      if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise UnsafeCheckpointError(f"record {_quote(info.filename)} uses zip compression "
                                    f"method {info.compress_type} (torch.save stores records)")
      if info.file_size > MAX_RECORD_BYTES:
        raise UnsafeCheckpointError(
            f"record {_quote(info.filename)} declares {info.file_size:,} bytes, more than "
            f"the {MAX_RECORD_BYTES:,}-byte limit per record")
      total += info.file_size
    limit = MAX_EXPANSION * self.size + EXPANSION_SLACK
    if total > limit:
      raise UnsafeCheckpointError(
          f"its records declare {total:,} bytes uncompressed, more than {MAX_EXPANSION} x "
          f"the file's {self.size:,} bytes + {EXPANSION_SLACK:,} (a decompression bomb?)")
    if self.infos["data.pkl"].file_size > MAX_PICKLE_BYTES:
      raise UnsafeCheckpointError(
          f"data.pkl declares {self.infos['data.pkl'].file_size:,} bytes, more than the "
          f"{MAX_PICKLE_BYTES:,}-byte limit")
    byteorder = self.read("byteorder") if "byteorder" in self.infos else b"little"
    if bytes(byteorder) != b"little":
      raise UnsafeCheckpointError(f"byteorder {_quote(bytes(byteorder)[:16])}: only "
                                  "little-endian checkpoints are read")

  def read(self, name: str) -> bytearray:
    """The record `name` (relative to the archive folder), exactly its declared size."""
    info = self.infos[name]
    buf = bytearray(info.file_size)
    view = memoryview(buf)
    pos = 0
    with self.zip.open(info) as f:
      while pos < len(buf):
        chunk = f.read(min(1 << 22, len(buf) - pos))
        if not chunk:
          raise UnsafeCheckpointError(f"record {_quote(info.filename)} ends after {pos:,} of "
                                      f"its {len(buf):,} bytes (the file is truncated)")
        view[pos:pos + len(chunk)] = chunk
        pos += len(chunk)
      if not buf:
        f.read()  # an empty record's CRC is checked at its (immediate) end
    return buf

  def close(self):
    self.zip.close()
    if self.file is not None:
      self.file.close()


# ----------------------------------------------------------------------------------------
# The pickle.
# ----------------------------------------------------------------------------------------

def _check_int(value, what: str, low: int = 0) -> int:
  if type(value) is not int or value < low:  # noqa: E721 (bool is an int subclass)
    raise UnsafeCheckpointError(f"{what} is {_quote(value)}, not an integer >= {low}")
  return value


def _check_shape(values, what: str) -> tuple[int, ...]:
  if not isinstance(values, tuple) or len(values) > MAX_DIMS:
    raise UnsafeCheckpointError(f"{what} is {_quote(values)}, not a tuple of at most "
                                f"{MAX_DIMS} integers")
  return tuple(_check_int(v, what) for v in values)


def _check_empty(value, what: str) -> None:
  """Hooks, metadata and tensor state: torch.save writes them empty for plain tensors."""
  if value is None or (isinstance(value, (dict, tuple, list)) and not value):
    return
  if isinstance(value, dict) and all(isinstance(k, str) and v is False for k, v in value.items()):
    return  # metadata {'neg': False, ...}
  raise UnsafeCheckpointError(f"non-empty {what} {_quote(value)} (plain tensors have none)")


class _Unpickler(pickle._Unpickler):  # the Python machine: its opcode table can be changed
  """Runs data.pkl as step 3 of the module docstring describes."""

  dispatch = dict(pickle._Unpickler.dispatch)

  def __init__(self, data: bytes, archive: _Archive, tensors):
    super().__init__(io.BytesIO(data), encoding="utf-8")
    self.archive = archive
    self.tensors = tensors  # _NumpyTensors or _TorchTensors
    self.storages: dict[str, _Storage] = {}
    self.storage_bytes = 0
    self.view_bytes = 0
    self.buildable: dict[int, Any] = {}  # id -> object created here (kept alive: ids stay unique)

  # -- globals ----------------------------------------------------------------------------
  def find_class(self, module, name):
    module = MODULE_ALIASES.get(module, module)
    entry = ALLOWED.get((module, name))
    if entry is None:
      full = f"{module}.{name}"
      raise UnsafeCheckpointError(
          f"refusing to load global {_quote(full)[1:-1]}: not a tensor rebuild function, "
          "storage type, torch dtype or plain container (the checkpoint would have called or "
          "instantiated it; nothing was executed)", full)
    kind, what = entry
    if kind == "dtype":  # dtypes are immutable; BUILD and REDUCE refuse them anyway
      return self.tensors.dtype(what)
    return _Token(f"{module}.{name}", kind, what)

  # -- calls ------------------------------------------------------------------------------
  def _call(self, func, args):
    if not isinstance(func, _Token) or func.kind not in ("call", "new"):
      raise UnsafeCheckpointError(f"the pickle calls {_quote(func)}, which is not an "
                                  "allowed constructor")
    if not isinstance(args, tuple):
      raise UnsafeCheckpointError(f"arguments of {func.name} are not a tuple")
    try:
      return getattr(self, func.what)(*args)
    except TypeError as e:  # a wrong argument count, say
      raise UnsafeCheckpointError(f"{func.name}{_quote(args)}: {e}") from None

  def load_reduce(self):
    args = self.stack.pop()
    self.stack[-1] = self._call(self.stack[-1], args)

  def load_newobj(self):
    args = self.stack.pop()
    cls = self.stack.pop()
    if not isinstance(cls, _Token) or cls.kind != "new" or args != ():
      raise UnsafeCheckpointError(f"NEWOBJ of {_quote(cls)} with {_quote(args)}: only "
                                  "OrderedDict and EasyDict are created that way, without "
                                  "arguments")
    self.append(self._call(cls, ()))

  def load_build(self):
    state = self.stack.pop()
    inst = self.stack[-1]
    if id(inst) not in self.buildable:
      raise UnsafeCheckpointError(
          f"BUILD on {_quote(inst)}, which this file did not create (BUILD would change an "
          "object shared with the rest of the process)")
    slots = None
    if isinstance(state, tuple) and len(state) == 2:
      state, slots = state
    if slots:
      raise UnsafeCheckpointError(f"BUILD with slot state {_quote(slots)} (attributes set "
                                  "through setattr are not allowed)")
    if state is None:
      return
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and not k.startswith("__") for k in state):
      raise UnsafeCheckpointError(f"BUILD state {_quote(state)} is not a dict of plain "
                                  "attribute names")
    if isinstance(inst, _EasyDictStandIn):
      for key, value in state.items():  # EasyDict mirrors its items as attributes
        inst.setdefault(key, value)
    else:
      inst.__dict__.update(state)

  def _refuse(self, code=None):
    raise UnsafeCheckpointError(f"pickle opcode {REFUSED_OPCODES[code]} (torch.save does not "
                                "write it)")

  for _code, _name in REFUSED_OPCODES.items():
    dispatch[_code[0]] = (lambda code: lambda self: self._refuse(code))(_code)
  dispatch[pickle.REDUCE[0]] = load_reduce
  dispatch[pickle.NEWOBJ[0]] = load_newobj
  dispatch[pickle.BUILD[0]] = load_build
  del _code, _name

  # -- storages ---------------------------------------------------------------------------
  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
      raise UnsafeCheckpointError(f"persistent id {_quote(pid)} is not "
                                  "('storage', type, key, location, numel)")
    _, token, key, location, numel = pid
    if isinstance(key, bytes):
      key = key.decode("ascii", "replace")
    if not isinstance(token, _Token) or token.kind != "storage":
      raise UnsafeCheckpointError(f"storage type {_quote(token)} is not a torch storage class")
    if not isinstance(key, str) or not re.fullmatch(r"[0-9A-Za-z_]{1,64}", key):
      raise UnsafeCheckpointError(f"storage key {_quote(key)} is not a record name")
    if not isinstance(location, (str, bytes)):
      raise UnsafeCheckpointError(f"storage location {_quote(location)} is not a device name")
    numel = _check_int(numel, f"element count of storage {key!r}")
    dtype = self.tensors.dtype(token.what)
    if key in self.storages:
      storage = self.storages[key]
      if storage.dtype != dtype or storage.numel != numel:
        raise UnsafeCheckpointError(f"storage {key!r} is named as {storage.numel} x "
                                    f"{storage.dtype} and as {numel} x {dtype}")
      return storage
    record = f"data/{key}"
    if record not in self.archive.infos:
      raise UnsafeCheckpointError(f"storage {key!r} has no record {record!r}")
    itemsize = self.tensors.itemsize(dtype)
    size = self.archive.infos[record].file_size
    if numel * itemsize != size:
      raise UnsafeCheckpointError(f"storage {key!r} claims {numel:,} x {dtype} "
                                  f"({numel * itemsize:,} bytes) but its record holds "
                                  f"{size:,} bytes")
    buf = self.archive.read(record)
    data = self.tensors.storage(buf, dtype)
    storage = _Storage(key, dtype, numel, data)
    self.storages[key] = storage
    self.storage_bytes += size
    return storage

  # -- tensors ----------------------------------------------------------------------------
  def _view(self, storage, offset, size, stride, dtype=None):
    """The tensor [offset; size; stride] of `storage` (in elements of `dtype`)."""
    if not isinstance(storage, _Storage):
      raise UnsafeCheckpointError(f"tensor storage {_quote(storage)} is not a storage of "
                                  "this file")
    tensors = self.tensors
    if tensors.is_size(size):
      size = tuple(size)
    size = _check_shape(size, f"size of a tensor on storage {storage.key!r}")
    stride = _check_shape(stride, f"stride of a tensor on storage {storage.key!r}")
    offset = _check_int(offset, f"offset of a tensor on storage {storage.key!r}")
    if len(size) != len(stride):
      raise UnsafeCheckpointError(f"tensor on storage {storage.key!r}: size {size} and "
                                  f"stride {stride} differ in length")
    data = storage.data
    if dtype is not None and not tensors.same_dtype(data, dtype):
      itemsize = tensors.itemsize(dtype)
      nbytes = tensors.numel(data) * tensors.element_size(data)
      if nbytes % itemsize:
        raise UnsafeCheckpointError(f"storage {storage.key!r} of {nbytes} bytes is not "
                                    f"a whole number of {dtype}")
      data = tensors.reinterpret(data, dtype)
    available = tensors.numel(data)
    numel = math.prod(size)
    described = f"tensor of size {size}, stride {stride}, offset {offset}"
    if numel > available:
      raise UnsafeCheckpointError(
          f"{described} has {numel:,} elements but its storage {storage.key!r} holds "
          f"{available:,} (an expanded or overlapping view, which would be materialised)")
    if numel and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= available:
      raise UnsafeCheckpointError(f"{described} reaches past the end of its storage "
                                  f"{storage.key!r} ({available:,} elements)")
    if offset > available:
      raise UnsafeCheckpointError(f"{described} starts past the end of its storage "
                                  f"{storage.key!r} ({available:,} elements)")
    self.view_bytes += numel * tensors.element_size(data)
    if self.view_bytes > MAX_VIEW_RATIO * self.storage_bytes + EXPANSION_SLACK:
      raise UnsafeCheckpointError(
          f"its tensors view {self.view_bytes:,} bytes of {self.storage_bytes:,} bytes of "
          f"storage (more than {MAX_VIEW_RATIO} x: the same data viewed over and over)")
    return tensors.strided(data, size, stride, offset)

  def _rebuild_tensor(self, storage, offset, size, stride):
    return self._view(storage, offset, size, stride)

  def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad, hooks,
                         metadata=None):
    _check_empty(hooks, "backward hooks")
    _check_empty(metadata, "tensor metadata")
    return self._view(storage, offset, size, stride)

  def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, hooks, dtype,
                         metadata=None):
    _check_empty(hooks, "backward hooks")
    _check_empty(metadata, "tensor metadata")
    if not self.tensors.is_dtype(dtype):
      raise UnsafeCheckpointError(f"tensor dtype {_quote(dtype)} is not a torch dtype")
    return self._view(storage, offset, size, stride, dtype)

  def _parameter(self, data, requires_grad):
    if not self.tensors.is_tensor(data) or type(requires_grad) is not bool:
      raise UnsafeCheckpointError(f"Parameter of {_quote(data)}, {_quote(requires_grad)}")
    return self.tensors.parameter(data, requires_grad)

  def _rebuild_parameter(self, data, requires_grad, hooks):
    _check_empty(hooks, "backward hooks")
    return self._parameter(data, requires_grad)

  def _rebuild_parameter_with_state(self, data, requires_grad, hooks, state):
    _check_empty(hooks, "backward hooks")
    _check_empty(state, "Parameter attributes")
    return self._parameter(data, requires_grad)

  def _rebuild_from_type_v2(self, func, new_type, args, state):
    _check_empty(state, "tensor attributes")
    if not (isinstance(func, _Token) and func.what in _TENSOR_REBUILDS):
      raise UnsafeCheckpointError(f"_rebuild_from_type_v2 of {_quote(func)} (only tensor "
                                  "rebuilds)")
    if not (isinstance(new_type, _Token) and new_type.kind == "type"):
      raise UnsafeCheckpointError(f"_rebuild_from_type_v2 to {_quote(new_type)} (only "
                                  "Tensor and Parameter)")
    tensor = self._call(func, args)
    if new_type.what == "Parameter":
      return self.tensors.parameter(tensor, getattr(tensor, "requires_grad", False))
    return tensor

  # -- small constructors -----------------------------------------------------------------
  def _created(self, obj):
    self.buildable[id(obj)] = obj
    return obj

  def _ordered_dict(self, items=()):
    if not isinstance(items, (list, tuple)) or not all(
        isinstance(p, tuple) and len(p) == 2 for p in items):
      raise UnsafeCheckpointError(f"OrderedDict of {_quote(items)} (expected key/value pairs)")
    return self._created(collections.OrderedDict(items))

  def _easydict(self, items=None):
    if items is not None and not isinstance(items, dict):
      raise UnsafeCheckpointError(f"EasyDict of {_quote(items)} (expected a dict)")
    return self._created(_EasyDictStandIn(items or {}))

  def _set(self, items=()):
    return set(self._iterable(items, "set"))

  def _frozenset(self, items=()):
    return frozenset(self._iterable(items, "frozenset"))

  @staticmethod
  def _iterable(items, what):
    if not isinstance(items, (list, tuple)):
      raise UnsafeCheckpointError(f"{what} of {_quote(items)} (expected a list)")
    return items

  def _complex(self, real=0.0, imag=0.0):
    if not all(type(v) in (int, float) for v in (real, imag)):
      raise UnsafeCheckpointError(f"complex({_quote(real)}, {_quote(imag)})")
    return complex(real, imag)

  def _slice(self, *args):
    if len(args) > 3 or not all(v is None or type(v) is int for v in args):
      raise UnsafeCheckpointError(f"slice{_quote(args)}")
    return slice(*args)

  def _size(self, values=()):
    return self.tensors.size(_check_shape(tuple(values) if isinstance(values, list) else values,
                                          "torch.Size"))

  def _device(self, kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
      raise UnsafeCheckpointError(f"torch.device({_quote(kind)}, {_quote(index)})")
    return self.tensors.device(kind, index)

  def _codecs_encode(self, text, encoding="latin1", errors="strict"):
    """How protocol-2 pickles store `bytes`; other codecs are refused."""
    if encoding not in ("latin1", "latin-1", "iso-8859-1") or not isinstance(text, str) \
        or errors != "strict":
      raise UnsafeCheckpointError(f"_codecs.encode with encoding {_quote(encoding)} is not "
                                  "allowed", "_codecs.encode")
    return text.encode("latin1")


# ----------------------------------------------------------------------------------------
# After unpickling.
# ----------------------------------------------------------------------------------------

def _plain(root):
  """`root` with every EasyDict stand-in replaced by a plain dict, checked to nest at most
  `MAX_NESTING` levels. Iterative (a crafted file may nest deeper than Python recurses);
  shared objects stay shared, lists and dicts are changed in place, tuples rebuilt only if
  something inside them changed."""
  containers = (dict, list, tuple, set, frozenset)
  new: dict[int, Any] = {}     # id -> replacement (the object itself if unchanged)
  order = []                   # post-order: children before parents
  seen = {id(root)}
  stack = [(root, 1, False)]
  while stack:
    obj, depth, done = stack.pop()
    if done:
      order.append(obj)
      continue
    if depth > MAX_NESTING:
      raise UnsafeCheckpointError(f"objects nest more than {MAX_NESTING} levels deep")
    stack.append((obj, depth, True))
    if isinstance(obj, _EasyDictStandIn):
      new[id(obj)] = {}        # made now, so that a cycle back to it finds it
    children = (list(obj.keys()) + list(obj.values()) if isinstance(obj, dict)
                else list(obj))
    for child in children:
      if isinstance(child, containers) and id(child) not in seen:
        seen.add(id(child))
        stack.append((child, depth + 1, False))

  def get(x):
    return new.get(id(x), x) if isinstance(x, containers) else x

  for obj in order:
    if isinstance(obj, _EasyDictStandIn):
      new[id(obj)].update((get(k), get(v)) for k, v in obj.items())
    elif isinstance(obj, dict):
      for k in list(obj):
        obj[k] = get(obj[k])
    elif isinstance(obj, list):
      obj[:] = [get(v) for v in obj]
    elif isinstance(obj, tuple):
      items = tuple(get(v) for v in obj)
      if any(a is not b for a, b in zip(items, obj)):
        new[id(obj)] = items
  return get(root)


def _is_file(path: str) -> bool:
  if _is_url(path):
    from etils import epath  # noqa: PLC0415
    return epath.Path(path).is_file()
  return os.path.isfile(path)


def safe_torch_load(path: str | os.PathLike, *, tensors: str = "torch"):
  """What `torch.save` stored in `path` (a local path or a `gs://...` URL), read as the
  module docstring describes.

  `tensors="torch"` returns CPU torch tensors; `tensors="numpy"` returns numpy arrays and
  never imports torch (what the weight importers use). EasyDicts come back as plain dicts.
  Raises `FileNotFoundError` for a missing file and `UnsafeCheckpointError` (one line
  `"<path>: <reason>"`) for anything refused, damaged or inconsistent.
  """
  if tensors not in ("torch", "numpy"):
    raise ValueError(f"tensors={tensors!r}: 'torch' or 'numpy'")
  path = os.fspath(path)
  if not _is_file(path):
    raise FileNotFoundError(f"{path}: checkpoint not found")
  kind = _TorchTensors() if tensors == "torch" else _NumpyTensors()
  archive = None
  try:
    archive = _Archive(path)
    data = bytes(archive.read("data.pkl"))
    return _plain(_Unpickler(data, archive, kind).load())
  except UnsafeCheckpointError as e:
    raise UnsafeCheckpointError(f"{path}: {_one_line(e)}", e.global_name) from None
  except Exception as e:  # noqa: BLE001 (whatever a crafted file provokes: one clear line)
    reason = _one_line(f"{type(e).__name__}: {e}")[:300]
    raise UnsafeCheckpointError(f"{path}: damaged or malformed checkpoint ({reason})") from e
  finally:
    if archive is not None:
      archive.close()
