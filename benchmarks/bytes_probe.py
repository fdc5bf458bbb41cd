"""Compiled cost of the TPU train step: FLOPs, bytes accessed, HBM and an HLO census.

  python benchmarks/bytes_probe.py                      # the proxy, v5e:1x1, 8 clips a chip
  python benchmarks/bytes_probe.py --set model.remat=save_dots --set model.attention_impl=explicit
  python benchmarks/bytes_probe.py --size paper --topology v5e:2x4 --batch 64

Why: issue 26 asks to cut the work outside the matrix products of the accelerator programs
without an accelerator. libtpu compiles the step here (`compile_plan`, deviceless AOT), and
the compiled program's `cost_analysis()` (FLOPs, bytes accessed) and optimised HLO
(`compiled.as_text()`) say how much memory traffic a change removes or adds. These are
compiled figures, not run: no step time.

Sizes:
  proxy  the paper's widths (768, 12 heads, 224 px, 4 frames, text 32, bf16, full remat) but
         2 video layers, 2 text layers and 1 fusion layer: compiles in about a minute on
         this 2-core host, where the paper-size step takes 5-10 minutes.
  paper  `configs/webvid_pretrain.py` as it is (12 + 9 + 3 layers).
Layers are unrolled by default (`--scan on` as the TPU recipe runs them): XLA's cost
analysis counts a loop body once, so a scanned stack hides all but one layer's cost. The
T2V block's per-frame loop stays a loop either way (counted once).

The census counts the instructions of the computations that run as kernels (the entry,
loop bodies and conditions; not the computations inside fusions or reducers) by opcode,
fusions by kind, the copies and transposes with their bytes (top-level ones and fusions
whose root is a copy or transpose), and the random-bit generators. The last stdout line is
a JSON object (`--json-out` appends it to a file).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

GIB = 2 ** 30
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8}
_ARRAY = re.compile(r"\b(pred|[subfc]\d+|bf16)\[([0-9,]*)\]")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (\([^()]*\)|\S+) ([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+) \(.*\{\s*$")


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape (an array or a tuple of arrays), layouts already stripped."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) if dims else 1
    total += n * _BYTES.get(dtype, 4)
  return total


def _strip_braces(line: str) -> str:
  # Layouts ({1,0:T(8,128)}), metadata and backend configs are in braces, some nested:
  # dropped so that shapes and the opcode parse with simple patterns.
  previous = None
  while previous != line:
    previous, line = line, re.sub(r"\{[^{}]*\}", "", line)
  return line


def census(hlo: str) -> dict:
  """Counts of the optimised HLO module text `hlo` (see the module docstring)."""
  computations: dict[str, list] = {}
  current = None
  for raw in hlo.splitlines():
    m = _COMP.match(raw)
    if m and not raw.startswith(" "):
      current = m.group(1)
      computations[current] = []
      continue
    if current is None or not raw.startswith(" "):
      continue
    m = _INSTR.match(_strip_braces(raw))
    if m:
      name, shape, opcode, rest = m.groups()
      computations[current].append((name, shape, opcode, rest, raw))
  # Computations that do not run as kernels of their own: fusion bodies and the small
  # computations reducers, sorts and scatters apply.
  inner = set()
  for instrs in computations.values():
    for _, _, opcode, _, raw in instrs:
      for key in ("calls", "to_apply"):
        if opcode in ("while", "conditional", "call") and key == "calls":
          continue
        for called in re.findall(rf"{key}=%?([\w.\-]+)", raw):
          inner.add(called)
  roots = {}
  has_product = {}
  for comp, instrs in computations.items():
    has_product[comp] = any(op in ("dot", "convolution") for _, _, op, _, _ in instrs)
    for _, _, opcode, _, raw in instrs:
      if raw.lstrip().startswith("ROOT"):
        roots[comp] = opcode
  # Bytes each kernel reads and writes (operand and result shapes, as printed): an upper
  # bound of its traffic that splits the program's bytes into products and the rest.
  traffic = collections.Counter()
  ops = collections.Counter()
  fusion_kinds = collections.Counter()
  copies = {"copy": [0, 0], "transpose": [0, 0], "copy_fusion": [0, 0],
            "transpose_fusion": [0, 0]}
  rng = [0, 0]
  for comp, instrs in computations.items():
    if comp in inner:
      continue
    # Operands are printed by name only: their bytes come from their definitions.
    sizes = {name: shape_bytes(shape) for name, shape, _, _, _ in instrs}
    for name, shape, opcode, rest, raw in instrs:
      if opcode in ("parameter", "constant", "get-tuple-element", "tuple", "bitcast"):
        continue
      ops[opcode] += 1
      b = shape_bytes(shape)
      operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
      moved = b + sum(sizes.get(o, 0) for o in operands)
      if opcode in ("while", "conditional", "call", "copy-done", "all-reduce-done"):
        moved = 0   # their bodies' kernels are counted themselves
      called = re.search(r"calls=%?([\w.\-]+)", raw)
      if opcode in ("dot", "convolution") or (
          opcode == "fusion" and called and has_product.get(called.group(1))):
        traffic["products"] += moved
      elif opcode in ("copy", "transpose") or (
          opcode == "fusion" and called and roots.get(called.group(1)) in ("copy", "transpose")):
        traffic["copies"] += moved
      elif opcode in ("rng-bit-generator", "rng"):
        traffic["rng"] += moved
      elif opcode in ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                      "collective-permute", "all-reduce-start", "all-gather-start"):
        traffic["collectives"] += moved
      else:
        traffic["other"] += moved
      # copy-start/copy-done pairs are asynchronous moves between memory spaces (TPU
      # prefetches into on-chip memory), not layout changes: counted as ops only.
      if opcode in ("copy", "transpose"):
        key = opcode
        copies[key][0] += 1
        copies[key][1] += b
      elif opcode == "fusion":
        kind = re.search(r"kind=(\w+)", raw)
        fusion_kinds[kind.group(1) if kind else "?"] += 1
        root = roots.get(called.group(1)) if called else None
        if root in ("copy", "transpose"):
          copies[f"{root}_fusion"][0] += 1
          copies[f"{root}_fusion"][1] += b
      elif opcode in ("rng-bit-generator", "rng"):
        rng[0] += 1
        rng[1] += b
  return {"ops": dict(ops.most_common()), "fusions": sum(fusion_kinds.values()),
          "fusion_kinds": dict(fusion_kinds),
          "copies": {k: {"n": v[0], "bytes": v[1]} for k, v in copies.items()},
          "copy_like_n": sum(v[0] for v in copies.values()),
          "copy_like_bytes": sum(v[1] for v in copies.values()),
          "rng": {"n": rng[0], "bytes": rng[1]},
          "traffic": dict(traffic),
          "custom_calls": ops.get("custom-call", 0), "while": ops.get("while", 0),
          "reduce": ops.get("reduce", 0) + ops.get("reduce-window", 0)}


def _parse_value(text: str):
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return {"True": True, "False": False, "None": None}.get(text, text)


def build_config(size: str, overrides: list[str]):
  from configs import webvid_pretrain  # noqa: PLC0415
  c = webvid_pretrain.get_config()
  if size == "proxy":
    c.model.vision.depth = 2
    c.model.text.num_layers = 3     # 2 text layers + 1 fusion layer
    c.model.text.fusion_layer = 2
  for item in overrides:
    key, _, value = item.partition("=")
    node = c
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = _parse_value(value)
  return c


def probe(config, topology: str, batch_per_chip: int, scan: str, dump_hlo: str | None = None,
          forms=()):
  from t2v2t_jax.models import cpu_ops  # noqa: PLC0415
  from t2v2t_jax.training import compile_plan, tpu_topology  # noqa: PLC0415
  from t2v2t_jax.training import train_step as step_lib  # noqa: PLC0415
  from t2v2t_jax import sharding as sharding_lib  # noqa: PLC0415

  devices = tpu_topology.topology_devices(topology)
  config.model.scan_layers = scan
  config.batch_size = batch_per_chip * len(devices)
  chosen = contextlib.nullcontext() if forms is None else cpu_ops.accelerator_forms(forms)
  with cpu_ops.portable_forms(), chosen:
    planner = compile_plan.Planner(config, devices)
    c = config
    settings = step_lib.objective_settings(c, config.batch_size, planner.mesh)
    step = step_lib.jit_train_step(
        step_lib.make_train_step(
            planner.graphdef, planner.tx, special_ids=compile_plan.special_ids(
                c.model.text.vocab_size),
            temp_bounds=(c.model.temp_min, c.model.temp_max), **settings),
        planner.shardings, planner.mesh)
    size = c.model.vision.image_size
    batch_sh = sharding_lib.batch_sharding(planner.mesh)
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sh)
    b = config.batch_size
    batch = {"frames": sds((b, c.num_frames, size, size, 3), jnp.uint8),
             "input_ids": sds((b, c.data.max_len), jnp.int32),
             "attention_mask": sds((b, c.data.max_len), jnp.int32),
             "video_idx": sds((b,), jnp.int32)}
    t0 = time.perf_counter()
    lowered = step.lower(sharding_lib.with_shardings(planner.abstract, planner.shardings),
                         batch)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  mem = compiled.memory_analysis()
  hlo = compiled.as_text()
  if dump_hlo:
    with open(dump_hlo, "w") as f:
      f.write(hlo)
  total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
           + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  return {"flops": float(cost.get("flops", float("nan"))),
          "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
          "transcendentals": float(cost.get("transcendentals", float("nan"))),
          "temp_bytes": int(mem.temp_size_in_bytes), "total_bytes": int(total),
          "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
          "census": census(hlo)}


def attention_check(topology: str, groups: int, tokens: int = 197, heads: int = 12,
                    head_dim: int = 64) -> list[dict]:
  """One video layer's attention (forward + backward, bf16, shared relative-position bias
  [1, H, N, N] whose gradient is summed over the groups), compiled for one TPU chip three
  ways: XLA's (`jax.nn.dot_product_attention`, what the model runs), the heads-major
  explicit form (`cpu_ops.attention_shared_bias`), and the Pallas TPU flash-attention
  kernel. The kernel needs sequence lengths that its blocks (128) divide and a bias of the
  full batch [G, H, Lq, Lk]: the 197 tokens are padded to 256 (padding keys masked by
  segment ids) and the bias broadcast over the groups, its gradient summed back."""
  from jax.experimental.pallas.ops.tpu import flash_attention as fa  # noqa: PLC0415
  from t2v2t_jax.models import cpu_ops  # noqa: PLC0415
  from t2v2t_jax.training import tpu_topology  # noqa: PLC0415

  device = tpu_topology.topology_devices(topology)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  g, n, h, d = groups, tokens, heads, head_dim
  sds = lambda shape, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  args = (sds((g, n, h, d)), sds((g, n, h, d)), sds((g, n, h, d)), sds((1, h, n, n), jnp.float32),
          sds((g, n, h, d)))

  def xla(q, k, v, bias):
    return jax.nn.dot_product_attention(q, k, v, bias=bias.astype(q.dtype))

  def heads_major(q, k, v, bias):
    return cpu_ops.attention_shared_bias(q, k, v, bias)

  def flash(q, k, v, bias):
    pad = (-n) % 128
    lp = n + pad
    to_heads = lambda a: jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    ab = jnp.pad(bias, ((0, 0), (0, 0), (0, pad), (0, pad)))
    ab = jnp.broadcast_to(ab, (g, h, lp, lp))
    seg = jnp.broadcast_to((jnp.arange(lp) >= n).astype(jnp.int32), (g, lp))
    out = fa.flash_attention(to_heads(q), to_heads(k), to_heads(v), ab=ab,
                             segment_ids=fa.SegmentIds(seg, seg), sm_scale=d ** -0.5)
    return out.transpose(0, 2, 1, 3)[:, :n]

  results = []
  for name, fn in (("xla", xla), ("heads_major", heads_major), ("pallas_flash", flash)):
    def step(q, k, v, bias, ct, fn=fn):
      out, vjp = jax.vjp(fn, q, k, v, bias)
      return out, vjp(ct)
    t0 = time.perf_counter()
    try:
      compiled = jax.jit(step).lower(*args).compile()
    except Exception as e:  # noqa: BLE001 (report why a form does not compile)
      results.append({"form": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
      print(f"attention {name:<14} does not compile: {results[-1]['error']}")
      continue
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    mem = compiled.memory_analysis()
    cen = census(compiled.as_text())
    r = {"form": name, "flops": float(cost.get("flops", 0)),
         "bytes_accessed": float(cost.get("bytes accessed", 0)),
         "temp_bytes": int(mem.temp_size_in_bytes), "fusions": cen["fusions"],
         "copy_like_n": cen["copy_like_n"], "custom_calls": cen["custom_calls"],
         "compile_s": round(time.perf_counter() - t0, 1)}
    results.append(r)
    print(f"attention {name:<14} GFLOP {r['flops'] / 1e9:7.2f}  GB accessed "
          f"{r['bytes_accessed'] / 1e9:6.3f}  temps {r['temp_bytes'] / 1e9:6.3f} GB  fusions "
          f"{r['fusions']}  copies/transposes {r['copy_like_n']}  custom calls {r['custom_calls']}")
  return results


def layer_check(topology: str, clips: int, form_sets, remat: str = "full") -> list[dict]:
  """The video encoder with one layer (patch embedding, one BEiT layer with its temporal
  block, pooling; training mode: drop-path on), forward + backward of a sum of its outputs,
  bf16, at paper width, compiled for one TPU chip once per set of op forms. A minute a
  compile here where the proxy train step takes several: for choosing what to try on it."""
  from flax import nnx  # noqa: PLC0415
  from t2v2t_jax.models import cpu_ops  # noqa: PLC0415
  from t2v2t_jax.models.config import model_config  # noqa: PLC0415
  from t2v2t_jax.models.vision_encoder import VideoEncoder  # noqa: PLC0415
  from t2v2t_jax.training import tpu_topology  # noqa: PLC0415

  device = tpu_topology.topology_devices(topology)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  cfg = model_config().vision
  cfg.depth = 1
  results = []
  for forms in form_sets:
    with cpu_ops.portable_forms(), cpu_ops.accelerator_forms(forms):
      enc = nnx.eval_shape(lambda: VideoEncoder(cfg, dtype="bfloat16", remat=remat,
                                                rngs=nnx.Rngs(0)))
      graphdef, params = nnx.split(enc)
      params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                            params)
      x = jax.ShapeDtypeStruct((clips, 4, 224, 224, 3), jnp.bfloat16, sharding=sharding)
      key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=sharding)

      def loss(params, x, key):
        model = nnx.merge(graphdef, params)
        rngs = nnx.Rngs(dropout=jax.random.wrap_key_data(key, impl="threefry2x32"))
        hidden, pooled = model(x, deterministic=False, rngs=rngs)
        return hidden.astype(jnp.float32).sum() + pooled.astype(jnp.float32).sum()

      t0 = time.perf_counter()
      compiled = jax.jit(jax.grad(loss)).lower(params, x, key).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    cen = census(compiled.as_text())
    r = {"forms": list(forms), "flops": float(cost.get("flops", 0)),
         "bytes_accessed": float(cost.get("bytes accessed", 0)),
         "temp_bytes": int(compiled.memory_analysis().temp_size_in_bytes),
         "fusions": cen["fusions"], "copy_like_n": cen["copy_like_n"],
         "copy_like_bytes": cen["copy_like_bytes"], "traffic": cen["traffic"],
         "compile_s": round(time.perf_counter() - t0, 1)}
    results.append(r)
    print(f"layer {','.join(forms) or 'portable':<34} GFLOP {r['flops'] / 1e9:7.1f}  GB accessed "
          f"{r['bytes_accessed'] / 1e9:6.2f}  temps {r['temp_bytes'] / 1e9:5.2f} GB  fusions "
          f"{r['fusions']:4d}  copies/transposes {r['copy_like_n']:3d} "
          f"({r['copy_like_bytes'] / 1e9:.2f} GB)  " +
          "  ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(r["traffic"].items())), flush=True)
  return results


def summary_line(label: str, r: dict) -> str:
  cen = r["census"]
  cp = cen["copies"]
  return (f"{label:<28} GFLOP {r['flops'] / 1e9:9.1f}  GB acc {r['bytes_accessed'] / 1e9:8.2f}  "
          f"temps {r['temp_bytes'] / GIB:6.2f} GiB  total {r['total_bytes'] / GIB:6.2f}  "
          f"fusions {cen['fusions']:5d}  copy {cp['copy']['n']:4d} "
          f"({cp['copy']['bytes'] / 1e9:.2f} GB)  transpose {cp['transpose']['n']:3d} "
          f"({cp['transpose']['bytes'] / 1e9:.2f} GB)  copy/transpose fusions "
          f"{cp['copy_fusion']['n'] + cp['transpose_fusion']['n']:4d} "
          f"({(cp['copy_fusion']['bytes'] + cp['transpose_fusion']['bytes']) / 1e9:.2f} GB)  "
          f"reduce {cen['reduce']:4d}  rng {cen['rng']['n']:3d}  custom {cen['custom_calls']:3d}  "
          f"compile {r['compile_s']:.0f} s\n{'':<28} kernel operand+result GB: " +
          "  ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(cen["traffic"].items())))


def cpu_ops_forms():
  from t2v2t_jax.models import cpu_ops  # noqa: PLC0415
  return cpu_ops.ACCELERATOR_FORMS


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--size", choices=("proxy", "paper"), default="proxy")
  p.add_argument("--topology", default="v5e:1x1")
  p.add_argument("--batch", type=int, default=8, help="clips per chip")
  p.add_argument("--scan", choices=("on", "off"), default="off")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="config override, e.g. model.remat=save_dots (repeatable)")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable set before tracing (repeatable)")
  p.add_argument("--forms", default=None,
                 help="comma-separated ops whose CPU form the TPU program takes "
                      "(cpu_ops.FORM_NAMES: dense, layer_norm, gelu, attention); 'none': "
                      "the portable forms only (the programs before issue 26); default: "
                      "cpu_ops.ACCELERATOR_FORMS")
  p.add_argument("--label", default=None)
  p.add_argument("--dump-hlo", default=None, help="write the optimised HLO text here")
  p.add_argument("--json-out", default=None)
  p.add_argument("--census-of", default=None, metavar="HLO_TXT",
                 help="only print the census of a dumped optimised HLO file")
  p.add_argument("--attention-check", action="store_true",
                 help="compile one video layer's attention three ways (XLA, heads-major, "
                      "Pallas flash) for --topology's chip at --batch clips x 4 frames")
  p.add_argument("--layer-check", default=None, metavar="SETS",
                 help="compile a one-layer video encoder per set of forms: sets separated "
                      "by ';', forms by ',' (an empty set: the portable forms)")
  args = p.parse_args(argv)
  if args.layer_check is not None:
    sets = [tuple(f for f in part.split(",") if f) for part in args.layer_check.split(";")]
    print(json.dumps(layer_check(args.topology, args.batch, sets,
                                 remat=dict(o.split("=") for o in args.set).get("model.remat",
                                                                                "full"))))
    return
  if args.attention_check:
    results = attention_check(args.topology, args.batch * 4)
    print(json.dumps(results))
    return
  if args.census_of:
    with open(args.census_of) as f:
      print(json.dumps(census(f.read()), indent=1))
    return
  for item in args.env:
    k, _, v = item.partition("=")
    os.environ[k] = v
  config = build_config(args.size, args.set)
  forms = (None if args.forms is None else
           tuple(f for f in args.forms.split(",") if f and f != "none"))
  r = probe(config, args.topology, args.batch, args.scan, args.dump_hlo, forms)
  label = args.label or (",".join(args.set + args.env + list(forms or ())) or
                         ("forms " + (args.forms or "default")))
  r.update(label=label, size=args.size, topology=args.topology, batch_per_chip=args.batch,
           scan=args.scan, overrides=args.set,
           forms=sorted(cpu_ops_forms()) if forms is None else list(forms), env=args.env, jax=jax.__version__,
           date=time.strftime("%Y-%m-%d %H:%M"))
  print(summary_line(label, r))
  print("ops:", json.dumps(dict(list(r["census"]["ops"].items())[:25])))
  line = json.dumps(r)
  if args.json_out:
    with open(args.json_out, "a") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
