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

The census is the project's (`t2v2t_jax/training/hlo_census.py`, what `--mode compile`
prints): the kernels by kind with the bytes of their operands and results. The last stdout
line is a JSON object (`--json-out` appends it to a file).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from t2v2t_jax.training import hlo_census  # noqa: E402

GIB = 2 ** 30


def census(hlo: str) -> dict:
  """The project's census of an optimised HLO text (`training/hlo_census.py`: kernels by
  kind with their bytes, every loop iteration counted), with the totals this probe prints:
  fusions, copy-like kernels (copies, transposes, data-only fusions), random-bit generators
  and custom calls."""
  c = hlo_census.census_from_text(hlo)
  cats = c["categories"]
  copy_like = [cats.get(k, {"count": 0, "bytes": 0})
               for k in ("copy", "transpose", "layout_fusion")]
  rng = [v for k, v in c["other_ops"].items() if k.startswith("rng")]
  c.update(fusions=sum(v["count"] for v in c["fusions_by_kind"].values()),
           copy_like_n=sum(v["count"] for v in copy_like),
           copy_like_bytes=sum(v["bytes"] for v in copy_like),
           rng={"n": sum(v["count"] for v in rng), "bytes": sum(v["bytes"] for v in rng)},
           traffic={k: v["bytes"] for k, v in cats.items()},
           custom_call_n=sum(v["count"] for v in c["custom_calls"].values()))
  return c


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
         "copy_like_n": cen["copy_like_n"], "custom_calls": cen["custom_call_n"],
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
  cats = cen["categories"]
  kind = lambda k: (f"{k} {cats.get(k, {}).get('count', 0):5d} "
                    f"({cats.get(k, {}).get('bytes', 0) / 1e9:.2f} GB)")
  return (f"{label:<28} GFLOP {r['flops'] / 1e9:9.1f}  GB acc {r['bytes_accessed'] / 1e9:8.2f}  "
          f"temps {r['temp_bytes'] / GIB:6.2f} GiB  total {r['total_bytes'] / GIB:6.2f}  "
          f"fusions {cen['fusions']:5d}  rng {cen['rng']['n']:3d}  custom "
          f"{cen['custom_call_n']:3d}  compile {r['compile_s']:.0f} s\n{'':<28} kernels "
          f"{cen['kernels']}, operand+result bytes {cen['kernel_bytes'] / 1e9:.2f} GB: " +
          "  ".join(kind(k) for k in ("matmul", "elementwise_fusion", "reduction", "copy",
                                      "transpose", "layout_fusion")))


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
  print("other kernels:", json.dumps(r["census"]["other_ops"]))
  line = json.dumps(r)
  if args.json_out:
    with open(args.json_out, "a") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
