"""Census of a compiled XLA program: what its optimized HLO does, and its roofline.

  from t2v2t_jax.training import hlo_census
  c = hlo_census.census(compiled, chip="v5e", model_flops=...)   # jit(f).lower(...).compile()
  print(hlo_census.format_census(c))

Pure functions over a compiled object (its `cost_analysis()`, `memory_analysis()` and
optimized HLO text, `as_text()`), so they run on programs compiled for any backend: a TPU
slice or a GPU compiled from this host without the chips (`tpu_topology`, `gpu_topology`),
or the CPU. These are compiled figures, not run ones: what XLA planned, not a timing.

What the census counts, over the ops that run as kernels (the entry computation and the
bodies of its loops, conditionals and calls; not the insides of fusions):
  - copies and transposes (unfused `copy`/`transpose`, and fusions that only move data:
    their computations hold nothing but copies, transposes, reshapes and bitcasts),
  - fusions by kind (loop / input / output / custom, and a custom fusion's own kind, e.g.
    a Triton GEMM or a cuDNN fusion),
  - reductions (unfused `reduce`, and fusions whose computation reduces),
  - matrix products (`dot`/`convolution`, fused or not, and cuBLAS GEMM custom calls) with
    their FLOPs,
  - collectives (all-reduce, all-gather, reduce-scatter, all-to-all, collective-permute),
  - custom calls by target (`__cublas$gemm`, `__cudnn$...`, TPU ones),
each with its count and bytes. A loop body is counted as many times as the loop runs
(XLA's `known_trip_count`): a scanned layer stack is then counted layer by layer. Both
branches of a conditional are counted once a call (an upper bound); `branch_bytes` says
how much of the total they are (gradient accumulation's update runs once in k calls).

Where the bytes come from: `largest_sources` groups the kernels by kind and by the source
line in this project that made them (read from the stack-frame tables JAX writes at the
head of the HLO text), with the pass (`forward`, `backward`, `recomputed` by remat) from
the op name; kernels XLA added itself (copies for loop state and layouts, TPU slices)
carry no source and are grouped by the shape they move.

Why our own count beside XLA's `cost_analysis()`: XLA's counts a `while` body once, so
with scanned layers (on TPU) its FLOPs and bytes are for one layer of each stack; and a
GPU program compiled without a GPU has no cost analysis at all (jax 0.10.2 returns None).
The census's bytes are each kernel's operands plus its results in HBM (a slice of a
larger operand counted at the slice's size, also inside nested fusions, an in-place update
at the update's; arrays XLA:TPU placed in on-chip memory, layout memory space `S(1)`, and
buffers a fusion only hands on are not counted), an estimate of HBM traffic that ignores
caches; its FLOPs are the matrix products' alone (2 x multiply-adds), as the MFU
convention counts them.

Roofline: time = max(FLOPs / peak FLOP/s, bytes / HBM bandwidth) at the chip's published
bf16 dense peak and HBM bandwidth (`CHIPS`). The MFU bound is the model's FLOPs time at
peak over that roofline time: no step of this program can reach a higher MFU on that chip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

# -- chips ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float      # bf16 dense matrix FLOP/s
  hbm_bytes_per_s: float
  hbm_bytes: float


# Published per-chip figures (bf16 dense, no sparsity; HBM bandwidth; HBM capacity):
#   H100 SXM5: 989 TFLOP/s bf16 dense (1,979 "with sparsity"), 3.35 TB/s, 80 GB: NVIDIA H100
#     Tensor Core GPU datasheet (SXM column).
#   H200 SXM: 989 TFLOP/s bf16 dense, 4.8 TB/s, 141 GB: NVIDIA H200 Tensor Core GPU
#     datasheet (SXM column; the same compute die as the H100 SXM, more and faster HBM3e).
#   TPU v4: 275 TFLOP/s bf16, 1,200 GB/s, 32 GiB; v5e: 197 TFLOP/s, 819 GB/s, 16 GiB;
#   v5p: 459 TFLOP/s, 2,765 GB/s, 95 GiB; v6e (Trillium): 918 TFLOP/s, 1,640 GB/s, 32 GiB:
#     Google Cloud TPU documentation, "System architecture" pages of each generation.
# The H100 figure is the SXM part's: a PCIe H100 (756 TFLOP/s, 2.0 TB/s) is another chip.
CHIPS = {
    "h100": Chip("H100 SXM", 989e12, 3.35e12, 80e9),
    "h200": Chip("H200 SXM", 989e12, 4.8e12, 141e9),
    "v4": Chip("TPU v4", 275e12, 1.2e12, 32 * 2 ** 30),
    "v5e": Chip("TPU v5e", 197e12, 819e9, 16 * 2 ** 30),
    "v5p": Chip("TPU v5p", 459e12, 2.765e12, 95 * 2 ** 30),
    "v6e": Chip("TPU v6e", 918e12, 1.64e12, 32 * 2 ** 30),
}

# `device_kind` as the runtimes name the chips (libtpu; the CUDA plugin, from the card).
_KINDS = [("TPU v5 lite", "v5e"), ("TPU v5e", "v5e"), ("TPU v5p", "v5p"), ("TPU v5", "v5p"),
          ("TPU v6 lite", "v6e"), ("TPU v6e", "v6e"), ("TPU v4", "v4"),
          ("H100 PCIe", None),   # not the SXM part: its peaks are lower; no entry here
          ("H100", "h100"), ("H200", "h200")]


def chip_for_device_kind(device_kind: str) -> str | None:
  """The `CHIPS` key for a runtime's `device_kind` (None: a chip without figures here)."""
  for needle, key in _KINDS:
    if needle in device_kind:
      return key
  return None


# -- HLO text --------------------------------------------------------------------------------

# Bytes per element; sub-byte types count as fractions (s4 is half a byte).
_DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
    "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4,
    "f64": 8, "c64": 8, "c128": 16, "token": 0, "tf32": 4,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=?]*)\]")
_ARRAY_LAYOUT = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,<=?]*)\](\{[^{}]*\})")
_SPACE = re.compile(r"S\((\d+)\)")
_COMMENT = re.compile(r"/\*.*?\*/")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*(.*)$")
_OPCODE = re.compile(r"^\s*([a-z][a-z0-9\-]*)\(")
_TRIP = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?([0-9]+)')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_OP_NAME = re.compile(r'op_name="([^"]+)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
# How many of the largest (kind, source op) groups a census lists.
TOP_SOURCES = 40
_FUSION_KIND = re.compile(r"\bkind=k([A-Za-z]+)")
_CUSTOM_FUSION_KIND = re.compile(r'"fusion_backend_config"\s*:\s*\{[^{}]*?"kind"\s*:\s*"([^"]+)"')


def _dtype_bytes(dtype: str) -> float:
  if dtype in _DTYPE_BYTES:
    return _DTYPE_BYTES[dtype]
  m = re.match(r"^[a-z]+?([0-9]+)", dtype)      # f8e4m3fn, f8e5m2, ...: the leading width
  return int(m.group(1)) / 8 if m else 0


def shape_dims(type_str: str) -> list[tuple[str, list[int]]]:
  """Every array in an HLO type (a tuple gives several): [(dtype, dims)]."""
  out = []
  for dtype, dims in _ARRAY.findall(_COMMENT.sub("", type_str)):
    if dtype not in _DTYPE_BYTES and not dtype.startswith("f8") and not dtype.startswith("f4"):
      continue      # e.g. layout tiles `T(8,128)` never match, but guard against others
    out.append((dtype, [int(d.replace("<=", "")) for d in dims.split(",") if d.strip("<=?")]))
  return out


def _array_bytes(array: tuple[str, list[int]]) -> float:
  dtype, dims = array
  n = 1
  for d in dims:
    n *= d
  return n * _dtype_bytes(dtype)


def shape_bytes(type_str: str) -> int:
  return int(sum(_array_bytes(a) for a in shape_dims(type_str)))


def _balanced(text: str, start: int) -> int:
  """Index just past the bracket group opening at text[start]."""
  depth = 0
  pairs = {"(": ")", "{": "}", "[": "]"}
  closing = set(pairs.values())
  i = start
  while i < len(text):
    ch = text[i]
    if ch in pairs:
      depth += 1
    elif ch in closing:
      depth -= 1
      if depth == 0:
        return i + 1
    elif ch == '"':            # skip strings (backend configs hold braces in strings)
      j = text.find('"', i + 1)
      while j != -1 and text[j - 1] == "\\":
        j = text.find('"', j + 1)
      i = len(text) if j == -1 else j
    i += 1
  return len(text)


@dataclasses.dataclass
class Instr:
  name: str
  type_str: str
  opcode: str
  operands: list[str]
  attrs: str
  is_root: bool = False
  param_index: int | None = None    # N of `parameter(N)`
  literal: str | None = None        # the value of a `constant(...)`


@dataclasses.dataclass
class Computation:
  name: str
  instrs: list[Instr]
  is_entry: bool = False


def parse_hlo(text: str) -> dict[str, Computation]:
  """Computations of an HLO module's text, by name (the entry one has is_entry)."""
  comps: dict[str, Computation] = {}
  current = None
  for raw in text.splitlines():
    line = _COMMENT.sub("", raw).rstrip()
    if not line.strip():
      continue
    if current is None:
      m = _HEADER.match(line)
      if m and not line.startswith(" "):
        current = Computation(m.group(2), [], bool(m.group(1)))
        comps[current.name] = current
      continue
    if line.strip() == "}":
      current = None
      continue
    m = _INSTR.match(line)
    if not m:
      continue
    rest = m.group(3)
    if rest.startswith("("):
      end = _balanced(rest, 0)
    else:
      end = rest.find(" ")
      end = len(rest) if end == -1 else end
    type_str, tail = rest[:end], rest[end:]
    op = _OPCODE.match(tail)
    if not op:
      continue
    open_at = tail.index("(", op.start(1))
    close_at = _balanced(tail, open_at)
    inside = tail[open_at + 1:close_at - 1]
    operands = re.findall(r"%([^\s,()]+)", inside)
    index = int(inside) if op.group(1) == "parameter" and inside.strip().isdigit() else None
    literal = inside.strip() if op.group(1) == "constant" else None
    current.instrs.append(Instr(m.group(2), type_str, op.group(1), operands,
                                tail[close_at:], bool(m.group(1)), index, literal))
  return comps


def _called(attrs: str, key: str) -> list[str]:
  m = re.search(rf"\b{key}=\{{([^}}]*)\}}", attrs)
  if m:
    return re.findall(r"%?([^\s,{}]+)", m.group(1))
  m = re.search(rf"\b{key}=%?([^\s,]+)", attrs)
  return [m.group(1)] if m else []


# Ops that launch no kernel and move no data of their own.
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota",
         "while", "conditional", "call", "async-start", "async-update", "async-done",
         "copy-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
         "send-done", "recv-done", "get-dimension-size", "domain"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "ragged-all-to-all", "collective-broadcast")
_LAYOUT_ONLY = {"parameter", "copy", "transpose", "bitcast", "reshape", "tuple",
                "get-tuple-element"}
_SLICING = {"dynamic-slice", "slice", "gather"}


def _matmul_flops(ins: Instr, types: dict[str, str]) -> float:
  """2 x multiply-adds of a dot or convolution (0 when shapes cannot be read)."""
  out = shape_dims(ins.type_str)
  if not out or not ins.operands:
    return 0.0
  out_n = 1
  for d in out[0][1]:
    out_n *= d
  lhs = shape_dims(types.get(ins.operands[0], ""))
  if ins.opcode == "dot":
    m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
    if not lhs or not m:
      return 0.0
    k = 1
    for i in (int(x) for x in m.group(1).split(",") if x):
      k *= lhs[0][1][i]
    return 2.0 * out_n * k
  if ins.opcode == "convolution" and len(ins.operands) > 1:
    return _convolution_flops(ins, types)
  return 0.0


def _window_pairs(out_len: int, in_len: int, size: int, stride: int, pad_lo: int,
                  lhs_dilation: int = 1) -> int:
  """(output position, window position) pairs of one spatial dimension that read an input
  element, not padding nor the holes of a dilated input."""
  last = (in_len - 1) * lhs_dilation      # the dilated input's last element
  total = 0
  for j in range(out_len):
    lo = max(0, j * stride - pad_lo)
    hi = min(last, j * stride - pad_lo + size - 1)
    if hi >= lo:                           # the multiples of the dilation in [lo, hi]
      total += hi // lhs_dilation - (lo + lhs_dilation - 1) // lhs_dilation + 1
  return total


def _convolution_flops(ins: Instr, types: dict[str, str]) -> float:
  """2 x multiply-adds of a convolution, padding excluded.

  XLA:TPU writes batched matrix products as convolutions whose window runs over a padded
  dimension (e.g. `window={size=1x12 pad=0_0x11_11 rhs_reversal=0x1}`, input size 1 there):
  counting the whole window would count the padding's products too.
  """
  out = shape_dims(ins.type_str)
  lhs = shape_dims(types.get(ins.operands[0], ""))
  rhs = shape_dims(types.get(ins.operands[1], ""))
  m = re.search(r"dim_labels=([^_\s]+)_([^-\s]+)->([^,\s]+)", ins.attrs)
  if not out or not lhs or not rhs or not m:
    return 0.0
  ll, rl, ol = m.groups()
  out_d, lhs_d, rhs_d = out[0][1], lhs[0][1], rhs[0][1]
  if len(ll) != len(lhs_d) or len(rl) != len(rhs_d) or len(ol) != len(out_d):
    return 0.0
  window = re.search(r"window=\{([^}]*)\}", ins.attrs)
  w = window.group(1) if window else ""
  field = lambda key: (re.search(rf"\b{key}=([^\s]+)", w) or [None, None])[1]
  spatial = [c for c in ol if c.isdigit()]
  stride = [int(x) for x in field("stride").split("x")] if field("stride") else [1] * len(spatial)
  pads = ([int(p.split("_")[0]) for p in field("pad").split("x")] if field("pad")
          else [0] * len(spatial))
  lhs_dil = ([int(x) for x in field("lhs_dilate").split("x")] if field("lhs_dilate")
             else [1] * len(spatial))
  # XLA:TPU also writes batch dimensions as windows over a dilated input (`size=256x12
  # stride=255x11 lhs_dilate=256x12`: one input element per output position).
  macs = out_d[ol.index("b")] * out_d[ol.index("f")] * rhs_d[rl.index("i")]
  for n, c in enumerate(spatial):
    size, o_len = rhs_d[rl.index(c)], out_d[ol.index(c)]
    if field("rhs_dilate"):   # rare here; not modelled: every window position counted
      macs *= o_len * size
    else:
      macs *= _window_pairs(o_len, lhs_d[ll.index(c)], size, stride[n], pads[n], lhs_dil[n])
  return 2.0 * macs


def _gemm_custom_call_flops(ins: Instr, types: dict[str, str]) -> float:
  """FLOPs of a cuBLAS GEMM custom call, from its dot dimension numbers."""
  out = shape_dims(ins.type_str)
  lhs = shape_dims(types.get(ins.operands[0], "")) if ins.operands else []
  m = re.search(r'"lhs_contracting_dimensions"\s*:\s*\[([^\]]*)\]', ins.attrs)
  if not out or not lhs or not m:
    return 0.0
  out_n = 1
  for d in out[0][1]:      # the product; a second tuple element is cuBLAS's workspace
    out_n *= d
  k = 1
  for i in re.findall(r"[0-9]+", m.group(1)):
    k *= lhs[0][1][int(i)]
  return 2.0 * out_n * k


@dataclasses.dataclass
class _Tally:
  count: float = 0
  bytes: float = 0

  def add(self, n, b):
    self.count += n
    self.bytes += n * b


def _hbm_view(type_str: str) -> str:
  """`type_str` with every array that lives in on-chip memory (a layout memory space
  `S(n)`, n >= 1: XLA:TPU's memory-space assignment prefetches into on-chip memory and
  keeps small scalars and sync flags there) replaced by a 0-byte `token[]`, tuple positions
  kept: what a kernel reads and writes in HBM."""
  if "S(" not in type_str:
    return type_str
  def one(m):
    space = _SPACE.search(m.group(3))
    return "token[]" if space and int(space.group(1)) >= 1 else m.group(0)
  return _ARRAY_LAYOUT.sub(one, type_str)


def census_from_text(text: str, on_chip: bool = False) -> dict:
  """The census of an optimized HLO module's text (see the module docstring). Arrays in
  on-chip memory spaces are not counted unless `on_chip` (the census estimates HBM
  traffic)."""
  comps = parse_hlo(text)
  if not on_chip:
    for comp in comps.values():
      for ins in comp.instrs:
        ins.type_str = _hbm_view(ins.type_str)
  types = {i.name: i.type_str for c in comps.values() for i in c.instrs}
  by_name = {i.name: i for c in comps.values() for i in c.instrs}
  entry = next((c for c in comps.values() if c.is_entry), None)
  if entry is None:
    raise ValueError("no ENTRY computation in this HLO text")

  # How many times each computation runs per call of the program.
  runs: dict[str, float] = {}
  in_branch: set[str] = set()   # computations that run as (part of) a conditional's branch
  unknown_trips = 0
  stack = [(entry.name, 1.0, False)]
  while stack:
    name, n, branch = stack.pop()
    if name not in comps:
      continue
    runs[name] = runs.get(name, 0.0) + n
    if branch:
      in_branch.add(name)
    for ins in comps[name].instrs:
      if ins.opcode == "while":
        trip = _TRIP.search(ins.attrs)
        t = float(trip.group(1)) if trip else _trip_from_condition(comps, ins, by_name)
        if t is None:
          unknown_trips += 1
          t = 1.0
        stack += [(b, n * t, branch) for b in _called(ins.attrs, "body")]
        stack += [(b, n * (t + 1), branch) for b in _called(ins.attrs, "condition")]
      elif ins.opcode == "conditional":
        # One branch runs; which is unknown here: each is counted once (an upper bound;
        # `branch_bytes` says how much of the total that is).
        for key in ("branch_computations", "true_computation", "false_computation"):
          stack += [(b, n, True) for b in _called(ins.attrs, key)]
      elif ins.opcode == "call":
        stack += [(b, n, branch) for b in _called(ins.attrs, "to_apply")]
      elif ins.opcode == "async-start":
        stack += [(b, n, branch) for b in _called(ins.attrs, "calls")]

  fusion_kinds: dict[str, _Tally] = {}
  custom_calls: dict[str, _Tally] = {}
  collectives: dict[str, _Tally] = {}
  other_ops: dict[str, _Tally] = {}
  cats = {k: _Tally() for k in ("copy", "transpose", "layout_fusion", "reduction", "matmul",
                                "elementwise_fusion")}
  matmul_flops = 0.0
  kernels = 0.0
  kernel_bytes = 0.0
  branch_bytes = 0.0
  by_source: dict[tuple[str, str], _Tally] = {}
  frames = stack_frame_sources(text)

  def fusion_io_bytes(ins: Instr, fused: Computation | None) -> float:
    """Operands + results of a fusion, slices and in-place updates at their own size."""
    if fused is None:
      return sum(shape_bytes(types.get(o, "")) for o in ins.operands) + shape_bytes(ins.type_str)
    params = {i.param_index: i.name for i in fused.instrs if i.opcode == "parameter"}
    total = 0.0
    by_name = {i.name: i for i in fused.instrs}
    root = next((i for i in fused.instrs if i.is_root), None)
    # The results: a multi-output fusion's root is a tuple of them.
    results = ([by_name.get(o) for o in root.operands] if root is not None and
               root.opcode == "tuple" else [root])
    in_place = {r.operands[0] for r in results
                if r is not None and r.opcode == "dynamic-update-slice" and r.operands}
    for idx, operand in enumerate(ins.operands):
      pname = params.get(idx)
      full = shape_bytes(types.get(operand, ""))
      if pname is None:
        total += full
        continue
      if pname in in_place:
        continue          # updated in place: not read
      total += _read_bytes(comps, fused, pname, full)
    for r in results:
      if r is None:
        return total + shape_bytes(ins.type_str)   # unreadable: the whole result
    for r in results:
      if r.opcode == "parameter":
        # A buffer the fusion hands on untouched (XLA:TPU's asynchronous collective
        # fusions carry their in-flight buffers this way): neither read nor written.
        continue
      if r.opcode == "dynamic-update-slice" and len(r.operands) > 1:
        total += shape_bytes(types.get(r.operands[1], ""))   # written in place: the update
      else:
        total += shape_bytes(r.type_str)
    return total

  for cname, n in runs.items():
    for ins in comps[cname].instrs:
      op = ins.opcode
      if op in _FREE or op.endswith("-done"):
        continue
      base = op[:-6] if op.endswith("-start") else op
      if op == "fusion":
        fused = comps.get(next(iter(_called(ins.attrs, "calls")), ""))
        b = fusion_io_bytes(ins, fused)
        kind_m = _FUSION_KIND.search(ins.attrs)
        kind = kind_m.group(1).lower() if kind_m else "unknown"
        if kind == "custom":
          sub = _CUSTOM_FUSION_KIND.search(ins.attrs)
          kind = f"custom:{sub.group(1)}" if sub else "custom"
        fusion_kinds.setdefault(kind, _Tally()).add(n, b)
        inner = _fused_ops(comps, fused)
        flops = sum(_matmul_flops(i, types) for i in _fused_instrs(comps, fused)
                    if i.opcode in ("dot", "convolution"))
        if flops or "dot" in inner or "convolution" in inner:
          label = "matmul"
          matmul_flops += n * flops
        elif "reduce" in inner or "reduce-window" in inner:
          label = "reduction"
        elif inner <= _LAYOUT_ONLY and inner & {"copy", "transpose"}:
          label = "layout_fusion"
        else:
          label = "elementwise_fusion"
        cats[label].add(n, b)
      else:
        out_bytes = (sum(_array_bytes(a) for a in _start_results(ins, types))
                     if op.endswith("-start") else shape_bytes(ins.type_str))
        b = sum(shape_bytes(types.get(o, "")) for o in ins.operands) + out_bytes
        if base in ("dynamic-slice", "slice", "gather"):
          b = 2 * out_bytes        # reads the slice, not the sliced buffer
        elif base == "dynamic-update-slice" and len(ins.operands) > 1:
          b = 2 * shape_bytes(types.get(ins.operands[1], ""))
        label = f"other:{op}"
        if base in _COLLECTIVES:
          # What a collective moves: its result (for an all-reduce, the reduced buffer).
          collectives.setdefault(base, _Tally()).add(n, out_bytes)
          label = f"collective:{base}"
        elif op in ("copy", "copy-start"):
          # Reads its source, writes its destination; on TPU one of them is often on-chip
          # memory (a prefetch or an eviction), which is not counted.
          cats["copy"].add(n, b)
          label = "copy"
        elif op == "transpose":
          cats["transpose"].add(n, b)
          label = "transpose"
        elif op in ("reduce", "reduce-window"):
          cats["reduction"].add(n, b)
          label = "reduction"
        elif op in ("dot", "convolution"):
          cats["matmul"].add(n, b)
          matmul_flops += n * _matmul_flops(ins, types)
          label = "matmul"
        elif op == "custom-call":
          # A library call's trailing byte-typed results are its scratch space (cuBLAS's
          # and cuDNN's workspace), not data it reads or writes in HBM for the program.
          arrays = shape_dims(ins.type_str)
          while len(arrays) > 1 and arrays[-1][0] in ("s8", "u8"):
            arrays.pop()
          b = (sum(shape_bytes(types.get(o, "")) for o in ins.operands)
               + sum(_array_bytes(a) for a in arrays))
          target_m = _TARGET.search(ins.attrs)
          target = target_m.group(1) if target_m else "?"
          custom_calls.setdefault(target, _Tally()).add(n, b)
          label = f"custom:{target}"
          if "gemm" in target.lower() or "matmul" in target.lower():
            cats["matmul"].add(n, b)
            matmul_flops += n * _gemm_custom_call_flops(ins, types)
            label = "matmul"
        else:
          other_ops.setdefault(op, _Tally()).add(n, b)
      kernels += n
      kernel_bytes += n * b
      if cname in in_branch:
        branch_bytes += n * b
      # Where the bytes come from: the project line that made the kernel and its pass.
      by_source.setdefault((label, _source(ins, frames)), _Tally()).add(n, b)

  as_dict = lambda d: {k: {"count": int(v.count), "bytes": int(v.bytes)}
                       for k, v in sorted(d.items(), key=lambda kv: -kv[1].bytes)}
  return {
      "kernels": int(kernels),
      "kernel_bytes": int(kernel_bytes),
      "branch_bytes": int(branch_bytes),
      "matmul_flops": matmul_flops,
      "categories": as_dict(cats),
      "fusions_by_kind": as_dict(fusion_kinds),
      "custom_calls": as_dict(custom_calls),
      "collectives": as_dict(collectives),
      "other_ops": as_dict(other_ops),
      "loops": sum(1 for c in runs for i in comps[c].instrs if i.opcode == "while"),
      "loops_without_trip_count": unknown_trips,
      "largest_sources": [
          {"kind": k, "source": src, "count": int(v.count), "bytes": int(v.bytes)}
          for (k, src), v in sorted(by_source.items(), key=lambda kv: -kv[1].bytes)[:TOP_SOURCES]],
  }


def stack_frame_sources(text: str) -> dict[int, str]:
  """`stack_frame_id` -> `file.py:line function` of the innermost frame in this project's
  code (`t2v2t_jax/`), else the innermost outside site-packages, else the innermost, from
  the FileNames / FunctionNames / FileLocations / StackFrames tables JAX writes at the head
  of an HLO module's text (ids 1-based; a parent id is printed one above the parent's, 0
  or 1 meaning none)."""
  tables: dict[str, dict[int, str]] = {}
  current = None
  for line in text.splitlines():
    if line.startswith(("HloModule", " ")) or not line:
      continue
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      current = tables.setdefault(line, {})
      continue
    if _HEADER.match(line):
      break     # the computations begin
    if current is None or not line[0].isdigit():
      continue
    key, _, value = line.partition(" ")
    current[int(key)] = value
  if "StackFrames" not in tables:
    return {}
  files = {k: v.strip('"') for k, v in tables.get("FileNames", {}).items()}
  funcs = {k: v.strip('"') for k, v in tables.get("FunctionNames", {}).items()}
  locs, parents = {}, {}
  for k, v in tables.get("FileLocations", {}).items():
    f = re.search(r"file_name_id=(\d+) function_name_id=(\d+) line=(\d+)", v)
    if f:
      path = files.get(int(f.group(1)), "?")
      cut = path.rfind("/t2v2t_jax/")
      short = path[cut + 1:] if cut >= 0 else os.path.basename(path)
      locs[k] = (path, f"{short}:{f.group(3)} {funcs.get(int(f.group(2)), '?')}")
  for k, v in tables["StackFrames"].items():
    f = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", v)
    if f:
      parents[k] = (int(f.group(1)), int(f.group(2)) - 1)
  out = {}
  for frame in parents:
    chain, seen, f = [], set(), frame
    while f in parents and f not in seen and len(chain) < 64:
      seen.add(f)
      loc, parent = parents[f]
      if loc in locs:
        chain.append(locs[loc])
      f = parent
    pick = (next((c for c in chain if "/t2v2t_jax/" in c[0]), None)
            or next((c for c in chain if "site-packages" not in c[0]), None)
            or (chain[0] if chain else None))
    if pick:
      out[frame] = pick[1]
  return out


def _source(ins: Instr, frames: dict[int, str]) -> str:
  """Where a kernel comes from: the project's source line (from its stack frame) and the
  JAX op name's transforms (`transpose(jvp())`: the backward pass; `rematted_computation`:
  recomputed by remat). Kernels XLA added itself (copies for loop state and layouts) have
  no source: their result shape says what they move."""
  attrs = ins.attrs
  m = _OP_NAME.search(attrs)
  if not m and not _FRAME.search(attrs):
    return f"(added by XLA) {ins.opcode} -> {re.sub(r'{[^{}]*}', '', ins.type_str)[:90]}"
  op = re.sub(r"^jit\([^)]*\)/", "", m.group(1)) if m else ""
  parts = [p for p in op.split("/") if p not in ("while", "body", "closed_call", "cond")]
  passes = "backward" if op.startswith("transpose(") else "forward" if op else ""
  if "rematted_computation" in op:
    passes += " (recomputed)"
  what = parts[-1] if parts else "?"
  f = _FRAME.search(attrs)
  where = frames.get(int(f.group(1))) if f else None
  return " ".join(x for x in (where or "?", what, passes and f"[{passes}]") if x)


def _read_bytes(comps: dict, fused: Computation, pname: str, full: float,
                depth: int = 0) -> float:
  """Bytes a fusion reads of its parameter `pname` (`full` bytes): the slices it takes
  where every use is a slice (a scanned layer's stacked weights or saved activations, of
  which one layer is read), following the parameter into nested fusions (XLA:TPU nests
  them); nothing for the kernel's own results tuple, which only hands it on; else all."""
  users = [i for i in fused.instrs if pname in i.operands]
  if not users or depth > 8:
    return full
  read = 0.0
  for u in users:
    if depth == 0 and u.is_root and u.opcode == "tuple":
      continue            # handed on untouched as a result (not written either: below)
    if u.opcode in _SLICING and u.operands[0] == pname:
      read += shape_bytes(u.type_str)
    elif u.opcode == "fusion":
      inner = comps.get(next(iter(_called(u.attrs, "calls")), ""))
      if inner is None:
        return full
      params = {i.param_index: i.name for i in inner.instrs if i.opcode == "parameter"}
      for idx, operand in enumerate(u.operands):
        if operand == pname and idx in params:
          read += _read_bytes(comps, inner, params[idx], full, depth + 1)
    else:
      return full
  return min(read, full)


def _trip_from_condition(comps: dict, loop: Instr, by_name: dict) -> float | None:
  """Iterations of a `while` whose condition is `counter < N` (or <=, >, >= mirrored),
  the counter starting at the constant the loop's initial tuple holds (else 0)."""
  cond = comps.get(next(iter(_called(loop.attrs, "condition")), ""))
  root = next((i for i in cond.instrs if i.is_root), None) if cond else None
  if root is None or root.opcode != "compare" or len(root.operands) != 2:
    return None
  local = {i.name: i for i in cond.instrs}
  a, b = (local.get(o) for o in root.operands)
  direction = (re.search(r"direction=([A-Z]+)", root.attrs) or [None, ""])[1]
  if a is not None and a.opcode == "constant":     # N > i is i < N
    a, b = b, a
    direction = {"GT": "LT", "GE": "LE", "LT": "GT", "LE": "GE"}.get(direction, "")
  if (a is None or b is None or a.opcode != "get-tuple-element" or b.opcode != "constant"
      or direction not in ("LT", "LE")):
    return None
  try:
    bound = int(b.literal)
  except (TypeError, ValueError):
    return None
  index = int((re.search(r"index=([0-9]+)", a.attrs) or [None, "0"])[1])
  start = 0
  init = by_name.get(loop.operands[0]) if loop.operands else None
  if init is not None and init.opcode == "tuple" and index < len(init.operands):
    first = by_name.get(init.operands[index])
    if first is not None and first.opcode == "constant":
      try:
        start = int(first.literal)
      except (TypeError, ValueError):
        pass
  return float(max(0, bound - start + (1 if direction == "LE" else 0)))


def _start_results(ins: Instr, types: dict[str, str]) -> list:
  """The arrays an asynchronous `*-start` op produces: its type is a tuple of (its operands
  (a nested tuple, when listed), its results, scalar contexts); a `copy-start`'s is
  (destination, source, context)."""
  arrays = shape_dims(ins.type_str)
  if ins.opcode == "copy-start":
    return arrays[:1]
  if ins.type_str.startswith("(("):
    arrays = arrays[sum(len(shape_dims(types.get(o, ""))) for o in ins.operands):]
  return [a for a in arrays if a[1]]


def _fused_instrs(comps: dict, fused: Computation | None):
  """A fused computation's instructions, nested fusions' included."""
  if fused is None:
    return
  for i in fused.instrs:
    yield i
    if i.opcode == "fusion":
      yield from _fused_instrs(comps, comps.get(next(iter(_called(i.attrs, "calls")), "")))


def _fused_ops(comps: dict, fused: Computation | None) -> set[str]:
  return {i.opcode for i in _fused_instrs(comps, fused)}


# -- a compiled program ----------------------------------------------------------------------


def xla_costs(compiled) -> dict:
  """FLOPs and bytes accessed from XLA's cost analysis ({} where the backend gives none:
  a GPU program compiled without a GPU)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # noqa: BLE001 (backends without a cost model raise)
    return {}
  cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
  if not cost:
    return {}
  out = {}
  if "flops" in cost:
    out["flops"] = float(cost["flops"])
  if "bytes accessed" in cost:
    out["bytes_accessed"] = float(cost["bytes accessed"])
  return out


def memory(compiled) -> dict:
  """Per-device bytes from XLA's memory analysis; total as `compile_plan` counts it."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # noqa: BLE001
    return {}
  if m is None:
    return {}
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
  out = {f.replace("_size_in_bytes", "_bytes"): int(getattr(m, f, 0) or 0) for f in fields}
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"] + out["generated_code_bytes"])
  return out


def roofline(flops: float, bytes_: float, chip: Chip, model_flops: float | None = None) -> dict:
  """Roofline time of `flops` and `bytes_` on `chip`, and the MFU bound for `model_flops`."""
  compute_s = flops / chip.peak_flops
  memory_s = bytes_ / chip.hbm_bytes_per_s
  t = max(compute_s, memory_s)
  out = {"compute_s": compute_s, "memory_s": memory_s, "roofline_s": t,
         "bound": "memory" if memory_s > compute_s else "compute"}
  if model_flops is not None and t > 0:
    out["mfu_bound"] = (model_flops / chip.peak_flops) / t
  return out


def census(compiled, *, chip: str | None = None, model_flops: float | None = None,
           hlo_text: str | None = None) -> dict:
  """Everything this module reports for one compiled program (per device).

  `chip`: a `CHIPS` key for the roofline (None: none). `model_flops`: the model's FLOPs
  per device per call (the MFU numerator; e.g. benchmarks/flops.py's count over the
  devices). `hlo_text`: the optimized HLO, when already at hand.
  """
  text = compiled.as_text() if hlo_text is None else hlo_text
  out = {"figures": "compiled (XLA's plan for the target; not measured on a device)",
         "hlo": census_from_text(text), "xla_cost": xla_costs(compiled),
         "memory": memory(compiled), "chip": chip, "model_flops": model_flops}
  if chip is not None:
    spec = CHIPS[chip]
    out["chip_figures"] = dataclasses.asdict(spec)
    h = out["hlo"]
    # The census's own counts take every loop iteration; XLA's take a loop body once.
    out["roofline"] = roofline(h["matmul_flops"], h["kernel_bytes"], spec, model_flops)
    x = out["xla_cost"]
    if "flops" in x and "bytes_accessed" in x:
      out["roofline_xla_cost"] = roofline(x["flops"], x["bytes_accessed"], spec, model_flops)
  return out


def _g(b: float) -> str:
  return f"{b / 1e9:.2f}"


def format_census(c: dict, title: str = "") -> str:
  """A census as a readable table (bytes in GB = 1e9 bytes, per device)."""
  h, lines = c["hlo"], []
  head = f"HLO census{' of ' + title if title else ''}, per device; {c['figures']}"
  lines += [head, "-" * min(len(head), 100)]
  mem = c.get("memory") or {}
  if mem:
    lines.append(f"memory (GiB): arguments {mem['argument_bytes'] / 2**30:.2f}, outputs "
                 f"{mem['output_bytes'] / 2**30:.2f}, aliased {mem['alias_bytes'] / 2**30:.2f}, "
                 f"temporaries {mem['temp_bytes'] / 2**30:.2f}, total {mem['total_bytes'] / 2**30:.2f}")
  x = c.get("xla_cost") or {}
  xla = ("XLA cost analysis: none for this backend" if not x else
         f"XLA cost analysis: {x.get('flops', 0) / 1e12:.3f} TFLOP, "
         f"{_g(x.get('bytes_accessed', 0))} GB accessed (a loop body counted once)")
  lines.append(xla)
  lines.append(f"census: {h['kernels']:,} kernels, {_g(h['kernel_bytes'])} GB kernel operands + "
               f"results, {h['matmul_flops'] / 1e12:.3f} TFLOP in matrix products; "
               f"{h['loops']} loop(s)"
               + (f", {h['loops_without_trip_count']} without a known trip count (counted once)"
                  if h["loops_without_trip_count"] else ", every iteration counted"))
  rows = [(f"  {k}", v) for k, v in h["categories"].items()]
  rows += [(f"  fusion kind {k}", v) for k, v in h["fusions_by_kind"].items()]
  rows += [(f"  collective {k}", v) for k, v in h["collectives"].items()]
  rows += [(f"  custom call {k}", v) for k, v in h["custom_calls"].items()]
  top_other = list(h["other_ops"].items())[:8]
  rows += [(f"  other {k}", v) for k, v in top_other]
  lines.append(f"  {'what':<46} {'count':>10} {'GB':>10} {'% bytes':>8}")
  total = max(h["kernel_bytes"], 1)
  for name, v in rows:
    lines.append(f"{name:<48} {v['count']:>10,} {_g(v['bytes']):>10} "
                 f"{100 * v['bytes'] / total:>7.1f}%")
  top = h.get("largest_sources") or []
  if top:
    lines.append("largest groups by bytes (kind, the JAX operation that made the kernels):")
    for row in top[:12]:
      lines.append(f"  {row['kind']:<20} {row['count']:>8,} {_g(row['bytes']):>9} GB  "
                   f"{row['source'][:110]}")
  if c.get("chip"):
    spec = c["chip_figures"]
    lines.append(f"roofline on {spec['name']} ({spec['peak_flops'] / 1e12:.0f} TFLOP/s bf16 dense, "
                 f"{spec['hbm_bytes_per_s'] / 1e12:.3g} TB/s HBM):")
    for label, key in (("census counts", "roofline"), ("XLA cost analysis", "roofline_xla_cost")):
      r = c.get(key)
      if not r:
        continue
      mfu = f", MFU bound {100 * r['mfu_bound']:.1f}%" if "mfu_bound" in r else ""
      lines.append(f"  {label:<18} compute {r['compute_s'] * 1e3:8.2f} ms, memory "
                   f"{r['memory_s'] * 1e3:8.2f} ms -> {r['roofline_s'] * 1e3:8.2f} ms "
                   f"({r['bound']}-bound){mfu}")
    if c.get("model_flops"):
      lines.append(f"  (MFU bound: the model's {c['model_flops'] / 1e12:.3f} TFLOP per device at "
                   f"peak, over the roofline time)")
  return "\n".join(lines)


def to_json(c: dict) -> str:
  return json.dumps(c, indent=1, sort_keys=True)
