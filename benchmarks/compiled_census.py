"""Compiled census of the pretraining train step for a TPU slice, an H100/H200 or this CPU.

  python benchmarks/compiled_census.py --target v5e:2x4 --size paper --out /tmp/census_v5e
  python benchmarks/compiled_census.py --target h100 --size paper        # needs the CUDA plugin
  python benchmarks/compiled_census.py --target v5e:2x4 --size small --compare before.json
  python benchmarks/compiled_census.py --batch 8 --remat none --accum 8   # 8 micro-batches

Compiles exactly the step training compiles (`compile_plan.Planner`: the recipe's mesh over
the target's devices, the state's shardings, `make_train_step` + `jit_train_step`) for
configs/webvid_pretrain.py and reports, per device: HBM from XLA's memory analysis, FLOPs
and bytes accessed from its cost analysis (where the backend has one), the census of the
optimized HLO (`t2v2t_jax/training/hlo_census.py`: copies, transposes, fusions by kind,
reductions, collectives, custom calls and their bytes) and the roofline time and MFU bound
on the target chip, the model's FLOPs taken from benchmarks/flops.py. Compiled figures, not
measured ones: no step runs.

Sizes: `paper` (B/16 + BERT-base, 224 px, 4 frames, text 32, bf16), `small` (the same
program at Ti/16 with 4 layers + the 'tiny' text model, 8 clips per device: a quick
before/after check, 1-2 minutes on v5e:2x4) and `test` (the tiniest model, seconds).
Per-device batch: the recipe's (64 on v5e:2x4) on a TPU; on a GPU 32 clips, no remat and
unrolled layers, the configuration the H200 measured (docs/benchmarks.md), unless
`--batch`, `--remat`, `--scan` say otherwise.

Writes `census.json` (everything), `census.txt` (the tables) and, with `--hlo`,
`train_step.hlo.txt` (the optimized HLO) under `--out`; `--compare OLD.json` prints each
figure beside an earlier run's (what changed between two versions of the model), both per
optimizer update: with `--accum K` (gradient accumulation, `optimizer.grad_accum_steps`)
one update is K calls of the step, the update's own branch counted once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)
sys.path[:] = [_ROOT, _HERE] + [p for p in sys.path
                                if os.path.abspath(p or ".") not in (_ROOT, _HERE)]

import jax  # noqa: E402

import flops as flops_lib  # noqa: E402
from configs import webvid_pretrain  # noqa: E402
from t2v2t_jax.models import layer_stack  # noqa: E402
from t2v2t_jax.models.config import parse_text_variant, parse_vision_variant  # noqa: E402
from t2v2t_jax.training import compile_plan, hlo_census  # noqa: E402

GPU_BATCH = 32


def build_config(size: str):
  if size == "test":
    return webvid_pretrain.get_config("tiny")
  c = webvid_pretrain.get_config()
  if size == "small":
    # The paper program's structure (224 px, 4 frames, 197 tokens a frame, text 32, bf16,
    # every loss) with narrow, shallow encoders: the same kinds of kernels, far fewer.
    c.model.vision.update(parse_vision_variant("Ti/16"))
    c.model.vision.variant, c.model.vision.depth = "Ti/16", 4
    c.model.text.update(parse_text_variant("tiny"))
    c.model.text.variant = "tiny"
  elif size != "paper":
    raise ValueError(f"unknown size {size!r}")
  return c


def model_flops_per_sample(c) -> float:
  s = flops_lib.Sizes.from_config(c.model, frames=c.num_frames, text_len=c.data.max_len)
  w = c.loss_weights
  return float(flops_lib.train_step_per_sample(
      s, vtc=bool(w.get("vtc", 1)), vtm=bool(w.get("vtm", 1)), mlm=bool(w.get("mlm", 1)))["train"])


def run(args) -> dict:
  c = build_config(args.size)
  if args.frames:
    c.num_frames = c.eval.num_frames = args.frames
    c.model.vision.num_frames = max(c.model.vision.num_frames, args.frames)
  if args.no_mlm:
    c.loss_weights.mlm = 0.0
  if args.target == "cpu":
    devices = jax.devices("cpu")[:1]
  else:
    devices = compile_plan.target_devices(args.target)
  platform = devices[0].platform
  gpu = platform == "gpu"
  n = len(devices)
  per_device = args.batch or (GPU_BATCH if gpu and args.size == "paper" else
                              8 if args.size == "small" else max(1, c.batch_size // n))
  c.batch_size = per_device * n
  accum = max(1, args.accum or 1)
  c.optimizer.grad_accum_steps = accum
  if args.remat is not None:
    c.model.remat = args.remat
  elif gpu:
    c.model.remat = "none"
  scan = args.scan or c.model.get("scan_layers", "auto")
  c.model.scan_layers = "on" if layer_stack.resolve_scan(scan, platform) else "off"
  c.mesh.data = n   # one data-parallel axis over the target's devices
  c.mesh.fsdp = 1

  planner = compile_plan.Planner(c, devices)
  chip = planner.chip
  print(f"Compiling the pretraining train step for {args.target} ({n} x "
        f"{devices[0].device_kind}), size {args.size}: {c.model.vision.variant} + "
        f"{c.model.text.variant}, {c.num_frames} frames, {per_device} clips per device, "
        f"{c.model.dtype}, remat {c.model.remat}, scan_layers {c.model.scan_layers}"
        + (f", {accum} micro-batches an update" if accum > 1 else "") + " ...",
        flush=True)
  t0 = time.perf_counter()
  captured = {}
  real_compile = compile_plan._compile

  def capture(lowered, *options):
    captured["compiled"] = real_compile(lowered, *options)
    return captured["compiled"]

  compile_plan._compile = capture
  try:
    report = planner.train_step(per_device)
  finally:
    compile_plan._compile = real_compile
  if not report.compiled:
    raise SystemExit(f"the step does not fit the target: the compiler ran out of memory "
                     f"({report.temp_bytes / 2**30:.2f} GiB of temporaries named)")
  compiled = captured["compiled"]
  text = compiled.as_text()
  model_flops = model_flops_per_sample(c) * per_device
  result = hlo_census.census(compiled, chip=chip, model_flops=model_flops, hlo_text=text)
  result.update(
      benchmark="compiled_census", target=args.target, device_kind=devices[0].device_kind,
      devices=n, size=args.size, batch_per_device=per_device, frames=c.num_frames,
      mlm=bool(c.loss_weights.get("mlm", 1)), dtype=c.model.dtype, remat=c.model.remat,
      scan_layers=c.model.scan_layers, mode=c.model.fusion.mode, accum=accum,
      compile_s=round(time.perf_counter() - t0, 1), jax=jax.__version__,
      date=time.strftime("%Y-%m-%d"))
  if accum > 1:
    result["per_update"] = per_update(result, accum, chip)
  table = hlo_census.format_census(
      result, f"the pretraining train step ({args.size} size, {args.target})")
  if accum > 1:
    u = result["per_update"]
    table += (f"\nper optimizer update ({accum} micro-batches of {per_device} clips a device): "
              f"{u['kernel_bytes'] / 1e9:.2f} GB census bytes, {u['matmul_flops'] / 1e12:.3f} "
              f"TFLOP in products" + (f", roofline {u['roofline']['roofline_s'] * 1e3:.1f} ms, "
                                       f"MFU bound {100 * u['roofline']['mfu_bound']:.1f}%"
                                       if u.get("roofline") else "")
              + f" (the update's branch, {result['hlo']['branch_bytes'] / 1e9:.2f} GB, once)")
  print(table)
  print(f"compile {result['compile_s']:.0f} s (lowering included)")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "census.json"), "w") as f:
      f.write(hlo_census.to_json(result))
    with open(os.path.join(args.out, "census.txt"), "w") as f:
      f.write(table + "\n")
    if args.hlo:
      with open(os.path.join(args.out, "train_step.hlo.txt"), "w") as f:
        f.write(text)
  if args.json_out:
    with open(args.json_out, "a") as f:
      f.write(json.dumps(result) + "\n")
  if args.compare:
    with open(args.compare) as f:
      print(compare(json.load(f), result))
  return result


def per_update(result: dict, accum: int, chip: str | None) -> dict:
  """Figures of one optimizer update made of `accum` calls of the step (gradient
  accumulation, `optimizer.accumulate_every`): every kernel `accum` times, except the
  conditional's branches (the update, or the pass-through), which the census counts once a
  call and which run once an update."""
  h = result["hlo"]
  once = h["branch_bytes"]
  out = {"micro_batches": accum,
         "kernel_bytes": accum * (h["kernel_bytes"] - once) + once,
         "matmul_flops": accum * h["matmul_flops"],
         "model_flops": accum * (result.get("model_flops") or 0)}
  if chip is not None:
    out["roofline"] = hlo_census.roofline(out["matmul_flops"], out["kernel_bytes"],
                                          hlo_census.CHIPS[chip], out["model_flops"] or None)
  return out


def compare(old: dict, new: dict) -> str:
  """Each headline figure of two censuses side by side, with the change in percent."""
  def row(label, a, b, scale, unit):
    if a is None or b is None:
      return f"  {label:<40} {'-' if a is None else f'{a / scale:.3f}':>12} " \
             f"{'-' if b is None else f'{b / scale:.3f}':>12}"
    change = f"{100 * (b - a) / a:+.1f}%" if a else "-"
    return f"  {label:<40} {a / scale:>12.3f} {b / scale:>12.3f} {change:>8} {unit}"

  ho, hn = _per_update_view(old), _per_update_view(new)
  lines = [f"Compiled census, before -> after ({old.get('target')} {old.get('size')}, "
           f"{old.get('batch_per_device')} clips x {old.get('accum', 1)}, remat "
           f"{old.get('remat')}, {old.get('date')} -> {new.get('target')} {new.get('size')}, "
           f"{new.get('batch_per_device')} clips x {new.get('accum', 1)}, remat "
           f"{new.get('remat')}, {new.get('date')}), per optimizer update:",
           f"  {'figure':<40} {'before':>12} {'after':>12} {'change':>8}"]
  lines.append(row("census bytes (kernel operands+results)", ho["kernel_bytes"],
                   hn["kernel_bytes"], 1e9, "GB"))
  lines.append(row("XLA bytes accessed (loop body once)", old["xla_cost"].get("bytes_accessed"),
                   new["xla_cost"].get("bytes_accessed"), 1e9, "GB"))
  lines.append(row("matrix-product FLOPs", ho["matmul_flops"], hn["matmul_flops"], 1e12, "TFLOP"))
  lines.append(row("kernels", ho["kernels"], hn["kernels"], 1, ""))
  mo, mn = old.get("memory", {}), new.get("memory", {})
  lines.append(row("HBM total per device", mo.get("total_bytes"), mn.get("total_bytes"),
                   2 ** 30, "GiB"))
  for cat in hn["categories"]:
    a, b = ho["categories"].get(cat, {}), hn["categories"][cat]
    lines.append(row(f"{cat} bytes", a.get("bytes"), b["bytes"], 1e9, "GB"))
    lines.append(row(f"{cat} count", a.get("count"), b["count"], 1, ""))
  ro = (old.get("per_update") or old).get("roofline")
  rn = (new.get("per_update") or new).get("roofline")
  if ro and rn:
    lines.append(row("roofline time", ro["roofline_s"], rn["roofline_s"], 1e-3, "ms"))
    if "mfu_bound" in ro and "mfu_bound" in rn:
      lines.append(row("MFU bound", ro["mfu_bound"], rn["mfu_bound"], 0.01, "%"))
  return "\n".join(lines)


def _per_update_view(c: dict) -> dict:
  """The census of `c` with byte counts, kernel counts and FLOPs taken per optimizer update
  (unchanged for a step without gradient accumulation; XLA's own figures stay per call)."""
  h, k = dict(c["hlo"]), int(c.get("accum", 1) or 1)
  if k == 1:
    return h
  h["kernel_bytes"] = c["per_update"]["kernel_bytes"]
  h["matmul_flops"] = c["per_update"]["matmul_flops"]
  h["kernels"] = k * h["kernels"]
  h["categories"] = {name: {"count": k * v["count"], "bytes": k * v["bytes"]}
                     for name, v in h["categories"].items()}
  return h


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--target", default="v5e:2x4",
                 help="a TPU topology (v5e:2x4, v6e:2x4, v4:2x2x1, ...), h100, h200 or cpu")
  p.add_argument("--size", choices=("paper", "small", "test"), default="paper")
  p.add_argument("--batch", type=int, help="clips per device")
  p.add_argument("--frames", type=int, help="frames per clip (default: the recipe's 4)")
  p.add_argument("--no-mlm", action="store_true", help="drop the MLM loss (the fine-tuning step)")
  p.add_argument("--accum", type=int, metavar="K",
                 help="gradient accumulation: K micro-batches of --batch clips an update "
                      "(optimizer.grad_accum_steps); figures also given per update")
  p.add_argument("--remat", choices=("none", "full", "save_dots"),
                 help="per-layer remat (default: the recipe's on a TPU, none on a GPU)")
  p.add_argument("--scan", choices=("auto", "on", "off"),
                 help="scan the layer stacks (default: the recipe's, 'auto': on TPU only)")
  p.add_argument("--out", help="folder for census.json, census.txt (and the HLO with --hlo)")
  p.add_argument("--hlo", action="store_true", help="also write the optimized HLO text")
  p.add_argument("--json-out", help="append the JSON result as one line to this file")
  p.add_argument("--compare", metavar="OLD_JSON", help="a census.json to compare with")
  args = p.parse_args(argv)
  run(args)


if __name__ == "__main__":
  main()
