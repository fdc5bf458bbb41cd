"""Crafted `.pth` files against the VindLU reader: each must be refused quickly, in little
memory, with one clear line, writing nothing and changing nothing for later loads.

The classes (issue 15):
  format       legacy pickle / tar / junk with a zip appended or prepended, TorchScript,
               damaged archives (truncated, flipped bits, bad names, other compressions)
  shared       BUILD on the rebuild functions, dtypes, classes and tensors; calls of
               storages, dtypes and tensor classes; disallowed globals and opcodes
  memory       bytearray, storage and tensor calls with huge sizes, zip bombs, lying
               storage sizes, stride-0 / overlapping / out-of-bounds views, views repeated,
               deep nesting, huge literals
  keys         a valid VindLU checkpoint of the tiniest model with keys of layers the model
               lacks, or weights that are int64, bool, NaN or inf
  after        (issue 25) what runs after the reader: one fp16 storage under 300 / 2,000
               keys, zero-element tensors stating an architecture (through `convert`), a
               zero-element or too wide temporal embedding, a layer index of 30,000,000,
               layers stated by stray 1-element keys, float8 weights (loaded), 200,000
               keys (the message stays short); and Hugging Face folders: the shared fp16
               storage in a pytorch_model.bin, int64 / bool / NaN weights, a malformed
               config.json, an index naming itself and a shard `../` outside the folder
  run_folder   (issue 25) one of our run folders given as `init_from`: a flipped byte that
               its integrity record catches, `_METADATA` replaced by a JSON list, a
               `.zarray` claiming [1e6, 1e6] (it aborted the process), a NaN weight

  python benchmarks/crafted_checkpoints.py --out /tmp/crafted

builds every file in --out (outside the project), then, in this one process, loads each
with `load_vindlu_params` (what `--config.init_from=X.pth` runs; a case may instead run
`convert` on it, or read it as a Hugging Face BERT folder) and prints per file the
outcome, the seconds and the peak memory above the process's resident size before the
load (Linux: the peak is reset through /proc/self/clear_refs). After each file it checks
that no file appeared (in --out and in the working directory) and that a reference fp16
checkpoint still loads to the same values, through this loader and through
`torch.load(weights_only=True)`. Exit status 1 if any check fails.

`tests/test_safe_load_hardening.py` builds one file of each kind with the same builders.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import os
import pickle
import re
import struct
import sys
import tarfile
import time
import warnings
import zipfile
import zlib
from typing import Callable

# The repository root first: `benchmarks/input_pipeline.py` must not shadow the
# `input_pipeline` package (Python puts this script's folder first on the path).
_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT, _HERE] + [p for p in sys.path
                                if os.path.abspath(p or ".") not in (_ROOT, _HERE)]

import numpy as np  # noqa: E402

UNSAFE, VINDLU = "UnsafeCheckpointError", "VindluCheckpointError"
BERT, HF = "BertImportError", "HfCheckpointError"
GiB = 1 << 30


# ----------------------------------------------------------------------------------------
# A pickle assembler (protocol 2 opcodes) and a torch.save-shaped zip writer.
# ----------------------------------------------------------------------------------------

class Pickle:
  """Opcodes appended one call at a time: `Pickle().glob("os", "system").str("x")...`."""

  def __init__(self, proto: int = 2):
    self.b = bytearray(b"\x80" + bytes([proto]))

  def op(self, raw: bytes) -> Pickle:
    self.b += raw
    return self

  def glob(self, module, name):
    return self.op(b"c" + f"{module}\n{name}\n".encode())

  def str(self, s: str):
    e = s.encode()
    return self.op(b"X" + struct.pack("<I", len(e)) + e)

  def int(self, n: int):
    if -2 ** 31 <= n < 2 ** 31:
      return self.op(b"J" + struct.pack("<i", n))
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return self.op(b"\x8a" + bytes([len(raw)]) + raw)

  def tuple_of(self, values):
    self.mark()
    for v in values:
      self.int(v)
    return self.op(b"t")

  def mark(self):
    return self.op(b"(")

  def tuple(self):
    return self.op(b"t")

  def reduce(self):
    return self.op(b"R")

  def build(self):
    return self.op(b"b")

  def stop(self) -> bytes:
    return bytes(self.op(b".").b)

  def ordered_dict(self):
    return self.glob("collections", "OrderedDict").op(b")").reduce()

  def storage(self, key: str, numel: int, kind: str = "FloatStorage"):
    """A persistent id ('storage', type, key, 'cpu', numel) on the stack."""
    self.mark().str("storage").glob("torch", kind).str(key).str("cpu").int(numel).tuple()
    return self.op(b"Q")

  def tensor(self, key, numel, size, stride, offset=0, kind="FloatStorage"):
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    self.glob("torch._utils", "_rebuild_tensor_v2").mark()
    self.storage(key, numel, kind).int(offset).tuple_of(size).tuple_of(stride)
    return self.op(b"\x89").ordered_dict().tuple().reduce()


def torch_zip(pkl: bytes, records: dict[str, bytes] | None = None, *, prefix="archive",
              compression=zipfile.ZIP_STORED) -> bytes:
  """A zip shaped like torch.save's: `prefix/data.pkl`, `prefix/byteorder`, `prefix/data/<k>`."""
  out = io.BytesIO()
  with zipfile.ZipFile(out, "w", compression) as z:
    z.writestr(f"{prefix}/data.pkl", pkl)
    z.writestr(f"{prefix}/byteorder", b"little")
    for name, data in (records or {}).items():
      z.writestr(f"{prefix}/{name}", data)
    z.writestr(f"{prefix}/version", b"3\n")
  return out.getvalue()


def float_record(n: int) -> bytes:
  return np.arange(n, dtype=np.float32).tobytes()


def state_pickle(body: Callable[[Pickle], Pickle]) -> bytes:
  """{'model': <what body pushes>} as a pickle."""
  return body(Pickle().op(b"}").str("model")).op(b"s").stop()


def one_tensor(numel, size, stride, offset=0, record_elems=None) -> bytes:
  record_elems = numel if record_elems is None else record_elems
  pkl = state_pickle(lambda p: p.ordered_dict().str("w").tensor("0", numel, size, stride, offset)
                     .op(b"s"))
  return torch_zip(pkl, {"data/0": float_record(record_elems)})


def bomb_zip(uncompressed: int) -> bytes:
  """A data.pkl record that inflates to `uncompressed` bytes (a valid deflate of zeros)."""
  comp = zlib.compressobj(9, zlib.DEFLATED, -15)
  chunk = bytes(64 << 20)
  parts, left, crc = [], uncompressed, 0
  while left:
    piece = chunk[:min(left, len(chunk))]
    crc = zlib.crc32(piece, crc)
    parts.append(comp.compress(piece))
    left -= len(piece)
  parts.append(comp.flush())
  data = b"".join(parts)
  name = b"archive/data.pkl"
  local = struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 8, 0, 0, crc, len(data), uncompressed,
                      len(name), 0) + name
  central = struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 8, 0, 0, crc, len(data),
                        uncompressed, len(name), 0, 0, 0, 0, 0, 0) + name
  end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, len(central),
                    len(local) + len(data), 0)
  return local + data + central + end


def lie_about_size(blob: bytes, name: str, size: int) -> bytes:
  """`blob` with the central directory claiming `size` uncompressed bytes for `name`."""
  raw = bytearray(blob)
  at = raw.find(b"PK\x01\x02")
  while at != -1:
    n = struct.unpack_from("<H", raw, at + 28)[0]
    if raw[at + 46:at + 46 + n].decode() == name:
      struct.pack_into("<L", raw, at + 24, size)
      return bytes(raw)
    at = raw.find(b"PK\x01\x02", at + 4)
  raise ValueError(name)


def nested_lists(levels: int) -> bytes:
  """`levels` lists, each inside the one before (EMPTY_LIST x n, then APPEND x n-1)."""
  return torch_zip(Pickle().op(b"]" * levels + b"a" * (levels - 1)).stop())


def nested_tuples(levels: int) -> bytes:
  return torch_zip(Pickle().op(b")" + b"\x85" * levels).stop())


def easydict_deep(levels: int) -> bytes:
  p = Pickle()
  for _ in range(levels):
    p.glob("utils.easydict", "EasyDict").op(b")").reduce().str("c")
  p.op(b"}")
  p.op(b"s" * levels)
  return torch_zip(p.stop())


# ----------------------------------------------------------------------------------------
# The cases.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class Case:
  name: str
  kind: str         # format | shared | memory | keys | after | run_folder
  build: Callable[[str], bytes | dict | str]  # (folder of the suite) -> file contents,
                                        # {file name: contents} of a Hugging Face folder,
                                        # or the path of a folder it wrote itself
  error: str        # the exception class expected
  match: str        # a regex the one-line message must match
  run: str = "init_from"  # init_from | convert | hf_bert | run_folder (see `run_case`)
  max_seconds: float = 2.0  # issue 25's bar is 5 s a file; most take milliseconds


def _torch_save_bytes(obj, **kw) -> bytes:
  import torch
  buf = io.BytesIO()
  torch.save(obj, buf, **kw)
  return buf.getvalue()


def good_fp16() -> bytes:
  """The reference checkpoint: a few fp16 tensors (the values a mutated rebuild changes)."""
  import torch
  sd = {"w": torch.linspace(-2, 2, 16, dtype=torch.float16).reshape(4, 4),
        "b": torch.arange(4, dtype=torch.float16)}
  return _torch_save_bytes({"model": sd})


def _legacy_module_with_zip(folder: str) -> bytes:
  """torch's legacy format of a whole nn.Module (its persistent ids carry the module's
  source: the path on which `dump_patches` writes a .patch file), then a valid zip."""
  import torch
  legacy = _torch_save_bytes(torch.nn.Linear(2, 2), _use_new_zipfile_serialization=False)
  return legacy + good_fp16()


def _tar_with_zip(folder: str) -> bytes:
  out = io.BytesIO()
  with tarfile.open(fileobj=out, mode="w") as tar:
    for name, data in (("sys_info", pickle.dumps({})), ("pickle", pickle.dumps({"model": {}})),
                       ("storages", pickle.dumps(0)), ("tensors", pickle.dumps(0))):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return out.getvalue() + good_fp16()


def _torchscript(folder: str) -> bytes:
  import torch
  buf = io.BytesIO()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit: still what old files are
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), buf)
  return buf.getvalue()


def _flip_bits(folder: str) -> bytes:
  """The reference checkpoint with one byte of its first tensor's data inverted."""
  raw = bytearray(good_fp16())
  info = zipfile.ZipFile(io.BytesIO(bytes(raw))).getinfo("archive/data/0")
  name_len, extra_len = struct.unpack_from("<2H", raw, info.header_offset + 26)
  raw[info.header_offset + 30 + name_len + extra_len] ^= 0xFF
  return bytes(raw)


def _shell(folder: str) -> str:
  return f"touch {os.path.join(folder, 'PWNED')}"


def _build_on(module, name, state: Callable[[Pickle], Pickle]) -> Callable[[str], bytes]:
  return lambda folder: torch_zip(state(Pickle().glob(module, name)).build().stop())


def _dict_state(p: Pickle) -> Pickle:
  return p.op(b"}").str("__defaults__").op(b")").op(b"s")


def _slot_state(p: Pickle) -> Pickle:
  return p.op(b"N").op(b"}").str("__code__").str("x").op(b"s").op(b"\x86")


def _many_views(folder: str) -> bytes:
  n = 1 << 16    # one 256 KiB storage, viewed 5,000 times in full
  def body(p):
    p.op(b"]").mark()
    for _ in range(5000):
      p.tensor("0", n, (n,), (1,))
    return p.op(b"e")
  return torch_zip(state_pickle(body), {"data/0": float_record(n)})


def format_cases() -> list[Case]:
  return [
      Case("legacy_module_plus_zip", "format", _legacy_module_with_zip, UNSAFE,
           r"no zip header at byte 0"),
      Case("legacy_pickle_plus_zip", "format",
           lambda f: pickle.dumps({"model": {}}, protocol=2) + good_fp16(), UNSAFE,
           r"no zip header at byte 0"),
      Case("tar_plus_zip", "format", _tar_with_zip, UNSAFE, r"no zip header at byte 0"),
      Case("junk_then_zip", "format", lambda f: b"#!junk\n\x00\x00" + good_fp16(), UNSAFE,
           r"no zip header at byte 0"),
      Case("two_zips", "format", lambda f: good_fp16() + good_fp16(), UNSAFE,
           r"no zip record starts at byte 0"),
      Case("empty_file", "format", lambda f: b"", UNSAFE, r"no zip header at byte 0"),
      Case("junk", "format", lambda f: os.urandom(4096), UNSAFE, r"no zip header at byte 0"),
      Case("zip_header_only", "format", lambda f: b"PK\x03\x04" + bytes(64), UNSAFE,
           r"damaged or malformed checkpoint \(BadZipFile"),
      Case("torchscript", "format", _torchscript, UNSAFE, r"a TorchScript archive"),
      Case("zip_without_data_pkl", "format", lambda f: _zip({"a/other.pkl": b"x"}), UNSAFE,
           r"without data.pkl"),
      Case("duplicate_records", "format",
           lambda f: _zip([("a/data.pkl", Pickle().op(b"}").stop()),
                           ("a/data.pkl", Pickle().op(b"]").stop())]), UNSAFE,
           r"holds record 'a/data.pkl' twice"),
      Case("record_outside_archive", "format",
           lambda f: _zip({"a/data.pkl": Pickle().op(b"}").stop(), "b/data/0": b"1234"}),
           UNSAFE, r"record 'b/data/0' lies outside the archive folder"),
      Case("bzip2_records", "format",
           lambda f: torch_zip(Pickle().op(b"}").stop(), compression=zipfile.ZIP_BZIP2),
           UNSAFE, r"uses zip compression method 12"),
      Case("truncated", "format", lambda f: good_fp16()[:-300], UNSAFE,
           r"damaged or malformed checkpoint \(BadZipFile"),
      Case("bits_flipped", "format", _flip_bits, UNSAFE, r"Bad CRC-32"),
      Case("big_endian", "format",
           lambda f: _zip({"a/data.pkl": Pickle().op(b"}").stop(), "a/byteorder": b"big"}),
           UNSAFE, r"only little-endian"),
  ]


def _zip(records) -> bytes:
  """A plain zip of `{name: bytes}` or `[(name, bytes)]` (a list may repeat a name)."""
  out = io.BytesIO()
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # zipfile warns about a repeated name
    with zipfile.ZipFile(out, "w") as z:
      for name, data in (records.items() if isinstance(records, dict) else records):
        z.writestr(name, data)
  return out.getvalue()


def shared_cases() -> list[Case]:
  rebuild = ("torch._utils", "_rebuild_tensor_v2")
  not_created = r"BUILD on <global {}>, which this file did not create"
  return [
      Case("build_dict_on_rebuild_v2", "shared", _build_on(*rebuild, _dict_state), UNSAFE,
           not_created.format("torch._utils._rebuild_tensor_v2")),
      Case("build_slots_on_rebuild_v2", "shared", _build_on(*rebuild, _slot_state), UNSAFE,
           not_created.format("torch._utils._rebuild_tensor_v2")),
      Case("build_on_parameter_rebuild", "shared",
           _build_on("torch._utils", "_rebuild_parameter", _dict_state), UNSAFE,
           not_created.format("torch._utils._rebuild_parameter")),
      Case("build_on_ordereddict_class", "shared",
           _build_on("collections", "OrderedDict", _dict_state), UNSAFE,
           not_created.format("collections.OrderedDict")),
      Case("build_on_storage_class", "shared", _build_on("torch", "HalfStorage", _dict_state),
           UNSAFE, not_created.format("torch.HalfStorage")),
      Case("build_on_tensor_class", "shared", _build_on("torch", "Tensor", _dict_state),
           UNSAFE, not_created.format("torch.Tensor")),
      Case("build_on_dtype", "shared", _build_on("torch", "float16", _dict_state), UNSAFE,
           r"BUILD on torch.float16, which this file did not create"),
      Case("build_on_codecs_encode", "shared", _build_on("_codecs", "encode", _dict_state),
           UNSAFE, not_created.format("_codecs.encode")),
      Case("build_on_loaded_tensor", "shared",
           lambda f: torch_zip(Pickle().tensor("0", 4, (4,), (1,)).op(b"}").str("data")
                               .op(b"N").op(b"s").build().stop(), {"data/0": float_record(4)}),
           UNSAFE, r"BUILD on tensor\(\[0\., 1\., 2\., 3\.\]\), which this file did not create"),
      Case("build_slots_on_ordereddict", "shared",
           lambda f: torch_zip(_slot_state(Pickle().ordered_dict()).build().stop()), UNSAFE,
           r"BUILD with slot state"),
      Case("build_dunder_on_ordereddict", "shared",
           lambda f: torch_zip(Pickle().ordered_dict().op(b"}").str("__class__").op(b"N")
                               .op(b"s").build().stop()), UNSAFE,
           r"is not a dict of plain attribute names"),
      Case("call_storage_class", "shared",
           lambda f: torch_zip(Pickle().glob("torch", "FloatStorage").mark().int(2 ** 28)
                               .tuple().reduce().stop()), UNSAFE,
           r"calls <global torch.FloatStorage>, which is not an allowed constructor"),
      Case("call_dtype", "shared",
           lambda f: torch_zip(Pickle().glob("torch", "float32").op(b")").reduce().stop()),
           UNSAFE, r"calls torch.float32, which is not an allowed constructor"),
      Case("os_system", "shared",
           lambda f: torch_zip(Pickle().glob("os", "system").mark().str(_shell(f)).tuple()
                               .reduce().stop()), UNSAFE, r"refusing to load global os\.system"),
      Case("posix_system_protocol4", "shared",
           lambda f: torch_zip(Pickle(4).str("posix").str("system").op(b"\x93").mark()
                               .str(_shell(f)).tuple().reduce().stop()), UNSAFE,
           r"refusing to load global posix\.system"),
      Case("builtins_eval", "shared",
           lambda f: torch_zip(Pickle().glob("builtins", "eval").mark().str("1+1").tuple()
                               .reduce().stop()), UNSAFE, r"refusing to load global builtins\.eval"),
      Case("builtins_getattr", "shared",
           lambda f: torch_zip(Pickle().glob("builtins", "getattr").stop()), UNSAFE,
           r"refusing to load global builtins\.getattr"),
      Case("storage_load_from_bytes", "shared",
           lambda f: torch_zip(Pickle().glob("torch.storage", "_load_from_bytes").stop()),
           UNSAFE, r"refusing to load global torch\.storage\._load_from_bytes"),
      Case("inst_opcode", "shared",
           lambda f: torch_zip(Pickle().mark().str(_shell(f)).op(b"ios\nsystem\n").stop()),
           UNSAFE, r"pickle opcode INST"),
      Case("ext1_opcode", "shared", lambda f: torch_zip(Pickle().op(b"\x82\x01").stop()),
           UNSAFE, r"pickle opcode EXT1"),
      Case("newobj_tensor_class", "shared",
           lambda f: torch_zip(Pickle().glob("torch", "Tensor").mark().int(2 ** 28).tuple()
                               .op(b"\x81").stop()), UNSAFE,
           r"NEWOBJ of <global torch\.Tensor>"),
      Case("codecs_rot13", "shared",
           lambda f: torch_zip(Pickle().glob("_codecs", "encode").mark().str("x").str("rot13")
                               .tuple().reduce().stop()), UNSAFE,
           r"_codecs\.encode with encoding 'rot13' is not allowed"),
      Case("negative_bit_metadata", "shared",
           lambda f: torch_zip(state_pickle(
               lambda p: p.glob("torch._utils", "_rebuild_tensor_v2").mark()
               .storage("0", 4, "HalfStorage").int(0).tuple_of((4,)).tuple_of((1,)).op(b"\x89")
               .ordered_dict().op(b"}").str("neg").op(b"\x88").op(b"s").tuple().reduce()),
               {"data/0": np.ones(4, np.float16).tobytes()}), UNSAFE,
           r"non-empty tensor metadata \{'neg': True\}"),
      Case("parameter_with_state", "shared",
           lambda f: torch_zip(Pickle().glob("torch._utils", "_rebuild_parameter_with_state")
                               .mark().tensor("0", 4, (4,), (1,)).op(b"\x89").ordered_dict()
                               .op(b"}").str("data").op(b"N").op(b"s").tuple().reduce().stop(),
                               {"data/0": float_record(4)}), UNSAFE,
           r"non-empty Parameter attributes"),
      Case("from_type_with_dict", "shared",
           lambda f: torch_zip(Pickle().glob("torch._tensor", "_rebuild_from_type_v2").mark()
                               .glob("torch._utils", "_rebuild_tensor_v2")
                               .glob("collections", "OrderedDict").op(b")").op(b"N").tuple()
                               .reduce().stop()), UNSAFE,
           r"_rebuild_from_type_v2 to <global collections\.OrderedDict>"),
  ]


def memory_cases() -> list[Case]:
  big = 2 ** 28
  return [
      Case("bytearray_1_4GB", "memory",
           lambda f: torch_zip(Pickle().glob("builtins", "bytearray").mark().int(1_400_000_000)
                               .tuple().reduce().stop()), UNSAFE,
           r"refusing to load global builtins\.bytearray"),
      Case("bytearray_py2_name", "memory",
           lambda f: torch_zip(Pickle().glob("__builtin__", "bytearray").mark().int(2 ** 31)
                               .tuple().reduce().stop()), UNSAFE,
           r"refusing to load global builtins\.bytearray"),
      Case("untyped_storage_call", "memory",
           lambda f: torch_zip(Pickle().glob("torch", "UntypedStorage").mark().int(2 ** 31)
                               .tuple().reduce().stop()), UNSAFE,
           r"calls <global torch\.UntypedStorage>, which is not an allowed constructor"),
      Case("zip_bomb_64MB", "memory", lambda f: bomb_zip(64 << 20), UNSAFE,
           r"declare 67,108,864 bytes uncompressed, more than 4 x the file's"),
      Case("zip_bomb_1_4GB", "memory", lambda f: bomb_zip(1_400_000_000), UNSAFE,
           r"declare 1,400,000,000 bytes uncompressed"),
      Case("record_size_lie", "memory",
           lambda f: lie_about_size(one_tensor(4, (4,), (1,)), "archive/data/0", 0xFFFFFFF0),
           UNSAFE, r"declare 4,294,967,\d+ bytes uncompressed"),
      Case("storage_numel_lie", "memory", lambda f: one_tensor(big, (4,), (1,), record_elems=4),
           UNSAFE, r"storage '0' claims 268,435,456 x torch\.float32 .* record holds 16 bytes"),
      Case("stride0_2pow28", "memory", lambda f: one_tensor(1, (big,), (0,)), UNSAFE,
           r"has 268,435,456 elements but its storage '0' holds 1"),
      Case("stride0_2d", "memory", lambda f: one_tensor(4, (2 ** 14, 2 ** 14), (0, 1)),
           UNSAFE, r"has 268,435,456 elements but its storage '0' holds 4"),
      Case("overlapping_strides", "memory", lambda f: one_tensor(2 ** 15, (2 ** 14, 2 ** 14), (1, 1)),
           UNSAFE, r"has 268,435,456 elements but its storage '0' holds 32,768"),
      Case("out_of_bounds_offset", "memory", lambda f: one_tensor(4, (4,), (1,), offset=2),
           UNSAFE, r"reaches past the end of its storage '0'"),
      Case("out_of_bounds_stride", "memory", lambda f: one_tensor(4, (2,), (100,)),
           UNSAFE, r"reaches past the end of its storage '0'"),
      Case("negative_size", "memory", lambda f: one_tensor(4, (-4,), (1,)), UNSAFE,
           r"size of a tensor on storage '0' is -4, not an integer >= 0"),
      Case("huge_dimension_count", "memory", lambda f: one_tensor(4, (1,) * 100, (1,) * 100),
           UNSAFE, r"not a tuple of at most 64 integers"),
      Case("many_views_of_one_storage", "memory", _many_views, UNSAFE,
           r"view .* bytes of 262,144 bytes of storage \(more than 4 x"),
      Case("nested_lists_100k", "memory", lambda f: nested_lists(100_000), UNSAFE,
           r"objects nest more than 100 levels deep"),
      Case("nested_dicts_10k", "memory",
           lambda f: torch_zip(Pickle().op(b"}" + b"X\x01\x00\x00\x00k}" * 10_000)
                               .op(b"s" * 10_000).stop()), UNSAFE,
           r"objects nest more than 100 levels deep"),
      Case("nested_easydicts_5k", "memory", lambda f: easydict_deep(5000), UNSAFE,
           r"objects nest more than 100 levels deep"),
      Case("nested_tuples_50k", "memory", lambda f: nested_tuples(50_000), UNSAFE,
           r"objects nest more than 100 levels deep"),
      Case("long_literal_1M_digits", "memory",
           lambda f: torch_zip(Pickle().op(b"L" + b"9" * 1_000_000 + b"L\n").stop()), UNSAFE,
           r"damaged or malformed checkpoint \(ValueError: Exceeds the limit"),
      Case("unicode_length_lie", "memory",
           lambda f: torch_zip(Pickle().op(b"\x8d" + struct.pack("<Q", 2 ** 40) + b"abc").stop()),
           UNSAFE, r"damaged or malformed checkpoint"),
      Case("self_containing_list", "memory",
           lambda f: torch_zip(Pickle().op(b"]q\x00h\x00a").stop()), VINDLU,
           r"expected \{'model': state_dict, \.\.\.\} or a state dict, got list"),
  ]


def key_cases() -> list[Case]:
  def changed(edit):
    def build(folder):
      state = dict(_valid_state())
      edit(state)
      return _save_state(state)
    return build

  def add(key, value):
    return changed(lambda s: s.__setitem__(key, value))

  def retype(key, fn):
    return changed(lambda s: s.__setitem__(key, fn(s[key])))

  linear = "vision_encoder.encoder.layer.{}.temp_model.linear.weight"
  index = ("vision_encoder.encoder.layer.{}.attention.attention.relative_position_bias."
           "relative_position_index")
  w = "vision_proj.weight"
  return [
      Case("valid_vindlu_control", "keys", changed(lambda s: None), "", "loaded"),
      Case("vision_layer_99_unused_linear", "keys",
           add(linear.format(99), np.zeros((32, 32), np.float32)), VINDLU,
           r"source key 'vision_encoder\.encoder\.layer\.99\.temp_model\.linear\.weight' "
           r"belongs to vision layer 99, which this model lacks \(it has 2\)"),
      Case("vision_layer_2_buffer", "keys",
           changed(lambda s: s.__setitem__(index.format(2), s[index.format(0)])), VINDLU,
           r"belongs to vision layer 2, which this model lacks"),
      Case("text_layer_7", "keys",
           add("text_encoder.encoder.layer.7.output.dense.bias", np.zeros(32, np.float32)),
           VINDLU, r"belongs to text layer 7, which this model lacks \(it has 4\)"),
      Case("int64_weight", "keys", retype(w, lambda v: v.astype(np.int64)), VINDLU,
           r"source key 'vision_proj\.weight' has dtype int64 \(weights must be floating point\)"),
      Case("bool_weight", "keys", retype(w, lambda v: v > 0), VINDLU,
           r"source key 'vision_proj\.weight' has dtype bool"),
      Case("nan_weight", "keys", retype(w, lambda v: np.where(v > 0, np.nan, v)), VINDLU,
           r"source key 'vision_proj\.weight' holds \d+ non-finite value\(s\)"),
      Case("inf_temperature", "keys", retype("temp", lambda v: np.full_like(v, np.inf)), VINDLU,
           r"source key 'temp' holds 1 non-finite value\(s\)"),
      Case("float_position_index", "keys",
           retype(index.format(1), lambda v: v.astype(np.float32)), VINDLU,
           r"relative_position_index' .* is not the standard BEiT relative position index"),
      Case("position_ids_stride0", "keys", lambda f: _stride0_position_ids(), UNSAFE,
           r"has 268,435,456 elements but its storage"),
  ]


# The valid checkpoint that the key cases edit: the tiniest model, exported to VindLU keys.
def tiny_model_config():
  from t2v2t_jax.models.config import model_config
  c = model_config("test/16", "test", "v2t")
  c.vision.image_size, c.vision.num_frames, c.text.vocab_size, c.embed_dim = 32, 4, 100, 16
  return c


_STATE: dict = {}


def _valid_state() -> dict:
  if not _STATE:
    import jax
    from t2v2t_jax.checkpoints import vindlu_export
    from t2v2t_jax.checkpoints.params import flatten_params
    from t2v2t_jax.models.t2v2t import create_model
    with jax.default_device(jax.devices("cpu")[0]):
      params = flatten_params(create_model(tiny_model_config(), seed=0))
    _STATE.update(vindlu_export.export_vindlu(params, naming="finetune")[0])
  return _STATE


def _save_state(state: dict) -> bytes:
  import tempfile
  from t2v2t_jax.checkpoints import vindlu_export
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "x.pth")
    vindlu_export.save_vindlu_checkpoint(state, path)
    with open(path, "rb") as f:
      return f.read()


def _stride0_position_ids() -> bytes:
  """A valid checkpoint whose position_ids buffer is a 2^28-element stride-0 view."""
  import torch
  state = {k: torch.from_numpy(np.array(v)) for k, v in _valid_state().items()}
  state["text_encoder.embeddings.position_ids"] = torch.zeros(1, dtype=torch.int64).expand(2 ** 28)
  return _torch_save_bytes({"model": state})


# ----------------------------------------------------------------------------------------
# After the reader (issue 25).
# ----------------------------------------------------------------------------------------

def _torch_state(edit=None) -> dict:
  """The valid state as torch tensors (what torch.save writes), edited by `edit`."""
  import torch
  state = {k: torch.from_numpy(np.array(v)) for k, v in _valid_state().items()}
  if edit:
    edit(state)
  return state


def _shared_fp16(keys: int):
  """One 2 MiB fp16 tensor saved under `keys` names (pickled once, referenced `keys` times)."""
  def edit(state):
    import torch
    shared = torch.ones(1 << 20, dtype=torch.float16)
    for i in range(keys):
      state[f"extra.{i}"] = shared
  return lambda folder: _torch_save_bytes({"model": _torch_state(edit)})


def _numpy_edit(edit) -> Callable[[str], bytes]:
  def build(folder):
    state = dict(_valid_state())
    edit(state)
    return _save_state(state)
  return build


def _empty_architecture(state):
  """Every weight zero-element, its shape stating a model 32x wider (4.4 KB in the issue)."""
  for key, value in list(state.items()):
    if value.dtype.kind == "f" and value.ndim:
      shape = tuple(n * 32 if n in (32, 64) else n for n in value.shape)
      state[key] = np.zeros((0,) + shape[1:], np.float32)


def _stray_layers(state):
  """Vision layers 2..39 stated by 1-element tensors under every key of layer 0."""
  layer0 = [k for k in state if k.startswith("vision_encoder.encoder.layer.0.")]
  for i in range(2, 40):
    for key in layer0:
      state[key.replace(".layer.0.", f".layer.{i}.")] = np.ones(1, np.float32)


def _many_keys(state):
  tiny = np.ones(1, np.float32)
  for i in range(200_000):
    state[f"junk.{i}"] = tiny


def _float8(folder):
  """vision_proj.weight saved by torch as float8_e4m3fn (loads: converted to float32)."""
  import torch
  def edit(state):
    state["vision_proj.weight"] = state["vision_proj.weight"].to(torch.float8_e4m3fn)
  return _torch_save_bytes({"model": _torch_state(edit)})


def _hf_bert_files(edit=None, config_edit=None, weights: bytes | None = None) -> dict:
  """A Hugging Face BERT folder of the tiny model's text side (VindLU's fine-tune keys
  without `text_encoder.`), as safetensors, edited."""
  import json

  from safetensors.numpy import save
  state = {k[len("text_encoder."):]: np.asarray(v) for k, v in _valid_state().items()
           if k.startswith("text_encoder.") and not k.endswith("position_ids")}
  if edit:
    edit(state)
  c = tiny_model_config().text
  config = {"model_type": "bert", "hidden_size": c.width, "num_hidden_layers": c.num_layers,
            "num_attention_heads": c.num_heads, "intermediate_size": c.mlp_dim,
            "vocab_size": c.vocab_size, "max_position_embeddings": c.max_position,
            "type_vocab_size": c.type_vocab_size, "layer_norm_eps": 1e-12}
  if config_edit:
    config_edit(config)
  files = {"config.json": json.dumps(config).encode()}
  if weights is not None:
    files["pytorch_model.bin"] = weights
  else:
    files["model.safetensors"] = save(state)
  return files


def _hf_shared_fp16_bin(folder):
  import torch
  shared = torch.ones(1 << 20, dtype=torch.float16)
  return _hf_bert_files(weights=_torch_save_bytes({f"junk.{i}": shared for i in range(2000)}))


def _hf_index(weight_map) -> Callable[[str], dict]:
  import json
  def build(folder):
    files = _hf_bert_files()
    del files["model.safetensors"]
    files["model.safetensors.index.json"] = json.dumps({"weight_map": weight_map}).encode()
    return files
  return build


def after_cases() -> list[Case]:
  temporal = "vision_encoder.embeddings.temporal_position_embeddings"
  q = "encoder.layer.0.attention.self.query.weight"

  def setting(key, value):
    return lambda s: s.__setitem__(key, value)

  return [
      Case("fp16_storage_300_keys", "after", _shared_fp16(300), VINDLU,
           r"unexpected source key 'extra\.0' .* \(and 299 more, below\)"),
      Case("fp16_storage_2000_keys", "after", _shared_fp16(2000), VINDLU,
           r"unexpected source key 'extra\.0' .* \(and 1,999 more, below\)"),
      Case("empty_tensors_state_a_model", "after", _numpy_edit(_empty_architecture), VINDLU,
           r"tensor\(s\) hold no elements", run="convert"),
      Case("empty_temporal_embedding_2pow28", "after",
           _numpy_edit(setting(temporal, np.zeros((1, 0, 1, 2 ** 28), np.float32))), VINDLU,
           r"source key 'vision_encoder\.embeddings\.temporal_position_embeddings' is empty"),
      Case("wide_temporal_embedding", "after",
           _numpy_edit(setting(temporal, np.ones((1, 1, 1, 2 ** 20), np.float32))), VINDLU,
           r"expects \(1, 4, 1, 32\), got \(1, 4, 1, 1048576\)"),
      Case("layer_index_30M", "after",
           _numpy_edit(setting("vision_encoder.encoder.layer.30000000.temp_model.linear.weight",
                               np.ones((2, 2), np.float32))), VINDLU,
           r"belongs to vision layer 30000000, which this model lacks"),
      Case("layer_index_30M_convert", "after",
           _numpy_edit(setting("vision_encoder.encoder.layer.30000000.lambda_1",
                               np.ones(2, np.float32))), VINDLU,
           r"names layer 30000000, more than the 1000 layers", run="convert"),
      Case("stray_layers_convert", "after", _numpy_edit(_stray_layers), VINDLU,
           r"the layers are not alike, as this model's are: vision layer 2 differs",
           run="convert"),
      Case("float8_weight_control", "after", _float8, "", "loaded"),
      # The reader's pure-Python unpickler alone takes about 2.5 s for 200,000 entries.
      Case("keys_200k", "after", _numpy_edit(_many_keys), VINDLU,
           r"unexpected source key 'junk\.0' .* \(and 199,999 more, below\)", max_seconds=5.0),
      Case("hf_fp16_storage_2000_keys", "after", _hf_shared_fp16_bin, BERT,
           r"missing source key", run="hf_bert"),
      Case("hf_int64_weight", "after",
           lambda f: _hf_bert_files(setting(q, np.ones((32, 32), np.int64))), BERT,
           rf"'{q}' \(in .*model\.safetensors\) has dtype int64", run="hf_bert"),
      Case("hf_bool_weight", "after",
           lambda f: _hf_bert_files(setting(q, np.ones((32, 32), bool))), BERT,
           rf"'{q}' \(in .*model\.safetensors\) has dtype bool", run="hf_bert"),
      Case("hf_nan_weight", "after",
           lambda f: _hf_bert_files(setting(q, np.full((32, 32), np.nan, np.float32))), BERT,
           rf"'{q}' \(in .*model\.safetensors\) holds 1024 non-finite", run="hf_bert"),
      Case("hf_config_value_malformed", "after",
           lambda f: _hf_bert_files(config_edit=setting("hidden_size", "32")), BERT,
           r"config\.json: field 'hidden_size' is \"32\", expected an integer", run="hf_bert"),
      Case("hf_config_not_json", "after",
           lambda f: {**_hf_bert_files(), "config.json": b"{"}, HF,
           r"config\.json: not valid JSON", run="hf_bert"),
      Case("hf_index_names_itself", "after",
           _hf_index({"a": "model.safetensors.index.json"}), HF,
           r"model\.safetensors\.index\.json: field 'weight_map' names files that are not "
           r"\.safetensors shards", run="hf_bert"),
      Case("hf_index_shard_outside", "after",
           _hf_index({"a": "../other/model-00001-of-00001.safetensors"}), HF,
           r"file '\.\./other/model-00001-of-00001\.safetensors' lies outside the folder",
           run="hf_bert"),
  ]


# ----------------------------------------------------------------------------------------
# Our own run folders given as init_from (issue 25).
# ----------------------------------------------------------------------------------------

def _run_folder(out: str, name: str, poison_nan: bool = False) -> str:
  """A run folder of the tiny model with one step (1), as training writes it."""
  import jax.numpy as jnp
  from flax import nnx

  from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer
  from t2v2t_jax.models.t2v2t import create_model
  _, params = nnx.split(create_model(tiny_model_config(), seed=0), nnx.Param)
  if poison_nan:
    kernel = params["text_proj"]["kernel"]
    kernel[...] = jnp.asarray(kernel[...]).at[0, 0].set(jnp.nan)
  folder = os.path.join(out, name)
  ckpt = Checkpointer(os.path.join(folder, "checkpoints"), async_save=False)
  ckpt.save(1, {"params": params, "step": jnp.int32(1)})
  ckpt.close()
  return folder


def _step_state(folder: str) -> str:
  return os.path.join(folder, "checkpoints", "1", "state")


def _run_folder_flipped(out: str) -> str:
  """The largest value file with one bit flipped: the integrity record no longer matches."""
  folder = _run_folder(out, "run_folder_flipped_byte")
  files = [os.path.join(r, f) for r, _, fs in os.walk(_step_state(folder)) for f in fs
           if os.sep + "d" + os.sep in os.path.join(r, f)]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))
  return folder


def _run_folder_metadata_list(out: str) -> str:
  from t2v2t_jax.checkpoints import run_checkpoints
  folder = _run_folder(out, "run_folder_metadata_list")
  with open(os.path.join(_step_state(folder), "_METADATA"), "w") as f:
    f.write("[1, 2]")
  run_checkpoints.write_integrity(os.path.dirname(_step_state(folder)))  # as crafted
  return folder


def _run_folder_huge_zarray(out: str) -> str:
  """`text_proj.kernel`'s stored shape rewritten to [1e6, 1e6], the record rewritten to match."""
  import json

  import tensorstore as ts

  from t2v2t_jax.checkpoints import run_checkpoints
  folder = _run_folder(out, "run_folder_huge_zarray")
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{_step_state(folder)}/"}).result()
  key = next(k for k in kv.list().result()
             if k.endswith(b"/.zarray") and "text_proj.kernel" in k.decode())
  meta = json.loads(kv.read(key).result().value)
  meta["shape"] = meta["chunks"] = [1_000_000, 1_000_000]
  kv.write(key, json.dumps(meta).encode()).result()
  run_checkpoints.write_integrity(os.path.dirname(_step_state(folder)))
  return folder


def run_folder_cases() -> list[Case]:
  return [
      Case("run_folder_flipped_byte", "run_folder", _run_folder_flipped, "Refusal",
           r"no usable checkpoint step .*step 1: .*does not match", run="run_folder"),
      Case("run_folder_metadata_list", "run_folder", _run_folder_metadata_list, "Refusal",
           r"_METADATA: not Orbax metadata", run="run_folder"),
      Case("run_folder_huge_zarray", "run_folder", _run_folder_huge_zarray, "Refusal",
           r"text_proj.kernel is stored as \(1000000, 1000000\)", run="run_folder"),
      Case("run_folder_nan_weight", "run_folder",
           lambda out: _run_folder(out, "run_folder_nan_weight", poison_nan=True), "Refusal",
           r"text_proj.kernel holds 1 non-finite value", run="run_folder"),
  ]


def all_cases() -> list[Case]:
  return (format_cases() + shared_cases() + memory_cases() + key_cases() + after_cases()
          + run_folder_cases())


# ----------------------------------------------------------------------------------------
# Running them.
# ----------------------------------------------------------------------------------------

def _rss_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def _reset_peak() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _listing(*folders) -> set[str]:
  out = set()
  for folder in folders:
    for root, dirs, files in os.walk(folder):
      out.update(os.path.join(root, n) for n in dirs + files)
  return out


def run_case(path: str, model_config, run: str = "init_from") -> tuple[str, str]:
  """(exception class name or '', one-line message) of loading `path`:
  init_from  `load_vindlu_params` into `model_config` (what `--config.init_from=X.pth` runs)
  convert    `convert.vindlu_to_orbax` without a config (the architecture read off the file)
  hf_bert    `hf_bert.bert_values` of the folder `path` into the abstract tiny model (what
             `pretrained.bert` runs before a run's model exists)
  run_folder `restore.params_from` of our run folder `path` (`--config.init_from=RUN`)."""
  import shutil
  import tempfile
  try:
    if run == "init_from":
      from t2v2t_jax.checkpoints import vindlu
      vindlu.load_vindlu_params(path, model_config, verbose=False)
    elif run == "convert":
      from t2v2t_jax import convert
      out = os.path.join(tempfile.gettempdir(), f"crafted_convert_{os.getpid()}")
      try:
        convert.vindlu_to_orbax(path, out, verbose=False)
      finally:
        shutil.rmtree(out, ignore_errors=True)
    elif run == "hf_bert":
      from t2v2t_jax.checkpoints import hf_bert
      model = _abstract_model(model_config)
      hf_bert.bert_values(model.text_encoder, model.fusion_encoder, path)
    elif run == "run_folder":
      from t2v2t_jax.checkpoints import restore
      restore.params_from(path, model_config)
    else:
      raise ValueError(f"unknown run {run!r}")
  except Exception as e:  # noqa: BLE001 (the outcome is what is measured)
    return type(e).__name__, str(e)
  return "", "loaded"


_ABSTRACT: dict = {}


def _abstract_model(model_config):
  """The abstract model of the tiny config, traced once (seconds) outside the measurements:
  `pretrained.bert` checks against the run's abstract model, which exists already."""
  if "model" not in _ABSTRACT:
    from t2v2t_jax.models.t2v2t import abstract_model
    _ABSTRACT["model"] = abstract_model(model_config)
  return _ABSTRACT["model"]


def write_case(case: Case, out: str) -> str:
  """The case's file (`<name>.pth`) or folder (`<name>/`) in `out`; returns its path."""
  contents = case.build(out)
  if isinstance(contents, str):  # a folder the case wrote itself
    return contents
  if isinstance(contents, dict):
    folder = os.path.join(out, case.name)
    os.makedirs(folder, exist_ok=True)
    for name, data in contents.items():
      with open(os.path.join(folder, name), "wb") as f:
        f.write(data)
    return folder
  path = os.path.join(out, case.name + ".pth")
  with open(path, "wb") as f:
    f.write(contents)
  return path


def _size(path: str) -> int:
  if os.path.isdir(path):
    return sum(os.path.getsize(os.path.join(r, n)) for r, _, fs in os.walk(path) for n in fs)
  return os.path.getsize(path)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out", default="/tmp/crafted", help="folder for the crafted files "
                      "(outside the project)")
  parser.add_argument("--only", default="", help="regex: run only the cases it matches")
  args = parser.parse_args(argv)
  import torch
  from t2v2t_jax.checkpoints.safe_torch_load import safe_torch_load

  out = os.path.abspath(args.out)
  os.makedirs(out, exist_ok=True)
  cases = [c for c in all_cases() if re.search(args.only, c.name)]
  print(f"Building {len(cases)} files in {out} ...", flush=True)
  paths = {case.name: write_case(case, out) for case in cases}
  reference = os.path.join(out, "good_reference.pth")
  with open(reference, "wb") as f:
    f.write(good_fp16())
  want = {k: v.clone() for k, v in safe_torch_load(reference)["model"].items()}
  config = tiny_model_config()
  # JAX, the model, its abstract shapes and a first import, outside the measurements.
  from t2v2t_jax.checkpoints import vindlu
  vindlu.import_vindlu(dict(_valid_state()), config)
  _abstract_model(config)
  run_case(reference, config)
  cwd = os.getcwd()
  before = _listing(out, cwd)
  has_peak = _reset_peak()

  failed, rows, process_peak = 0, [], 0.0
  for case in cases:
    path = paths[case.name]
    base = _rss_kib("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    error, message = run_case(path, config, case.run)
    seconds = time.perf_counter() - t0
    peak_kib = _rss_kib("VmHWM")
    peak_mib = (peak_kib - base) / 1024 if has_peak else float("nan")
    process_peak = max(process_peak, peak_kib / 1024)
    problems = []
    first = message.split("\n", 1)[0]
    if error != case.error or not re.search(case.match, first):
      problems.append(f"expected {case.error or 'a load'} matching {case.match!r}")
    if case.error and path not in first:
      problems.append("the first line does not name the file")
    if error == UNSAFE and "\n" in message:
      problems.append("the message is not one line")
    if len(message) > 20_000:
      problems.append(f"a message of {len(message):,} characters")
    if seconds > case.max_seconds:
      problems.append(f"took {seconds:.2f} s")
    if peak_mib > 1024:
      problems.append(f"peak {peak_mib:.0f} MiB")
    written = _listing(out, cwd) - before
    if written:
      problems.append(f"files written: {sorted(written)}")
    later = safe_torch_load(reference)["model"]
    plain = torch.load(reference, weights_only=True)["model"]
    if any(not torch.equal(later[k], v) or not torch.equal(plain[k], v) for k, v in want.items()):
      problems.append("a later load of the reference checkpoint changed")
    failed += bool(problems)
    size = _size(path)
    rows.append((case.kind, case.name, size, seconds, peak_mib, error or "-",
                 first.replace(path + ": ", "").replace(path, "FILE"), problems))

  print(f"\n{'class':<10} {'file':<30} {'bytes':>11} {'s':>6} {'MiB':>6}  outcome")
  for kind, name, size, seconds, peak, error, message, problems in rows:
    line = f"{kind:<10} {name:<30} {size:>11,} {seconds:>6.3f} {peak:>6.0f}  {error}: {message[:110]}"
    print(line + ("".join(f"\n    FAILED: {p}" for p in problems)))
  refused = [r for r, c in zip(rows, cases) if c.error]
  print(f"\n{len(refused)} crafted files: {sum(1 for r in refused if not r[7])} refused as "
        f"expected; slowest {max(r[3] for r in refused):.3f} s; largest peak above the "
        f"resident size {max(r[4] for r in refused):.0f} MiB (the whole process, torch and "
        f"JAX loaded: at most {process_peak:.0f} MiB); no file written and "
        f"later loads unchanged: {'yes' if not failed else 'NO'}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
