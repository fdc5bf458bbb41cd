"""Where a jitted step spends its device time: a kernel table from a JAX profiler trace.

`train_step.py --profile N` traces N steps with `jax.profiler.trace` and calls
`summarize`, which reads the trace (`jax.profiler.ProfileData`, no TensorBoard or
TensorFlow needed), sums the duration of every kernel on the accelerator's planes by
name and by kind (matrix products, attention, fusions, copies and transposes, random
numbers, reductions, collectives, other), and returns the top kernels. On a GPU the
kernel names are those of cuBLAS/cuDNN and of XLA's fusions; on a CPU there is no device
plane and the table is empty (the function says so rather than guess).

  python benchmarks/kernel_profile.py TRACE_DIR [--steps N]
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os

import jax

# Substrings of kernel names, first match wins (lower case).
KINDS = (
    ("attention", ("flash", "fmha", "cudnn", "attention", "sdpa")),
    ("matmul", ("gemm", "xmma", "cutlass", "cublas", "matmul", "dot", "wgmma", "sm90_", "sm80_",
                "nvjet", "convolution")),
    ("rng", ("rng", "philox", "threefry", "random")),
    ("collective", ("nccl", "all-reduce", "all_reduce", "allreduce", "all-gather", "reduce-scatter")),
    ("copy/transpose", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice",
                        "dynamic_update_slice", "concatenate")),
    ("reduce", ("reduce", "reduction")),
    ("fusion", ("fusion", "loop_", "input_", "triton")),
)


def kind_of(name: str) -> str:
  low = name.lower()
  for kind, keys in KINDS:
    if any(k in low for k in keys):
      return kind
  return "other"


def _xspace_files(trace_dir: str) -> list[str]:
  return sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True))


def summarize(trace_dir: str, *, steps: int, top: int = 25) -> dict:
  """Kernel time per step on the device planes of the newest trace under `trace_dir`."""
  files = _xspace_files(trace_dir)
  if not files:
    return {"error": f"no .xplane.pb under {trace_dir}"}
  data = jax.profiler.ProfileData.from_file(files[-1])
  by_name = collections.Counter()
  count = collections.Counter()
  planes, lines_seen = [], set()
  device_planes = [p for p in data.planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  for plane in data.planes:
    planes.append(plane.name)
  for plane in device_planes:
    lines = list(plane.lines)
    lines_seen.update(line.name for line in lines)
    # GPU planes hold one line per CUDA stream plus summary lines ("XLA Modules",
    # "XLA Ops", "Steps"): the streams are the kernels. Without stream lines (another
    # profiler version or a TPU), every line but the module/step summaries is used.
    streams = [line for line in lines if line.name.lower().startswith("stream")]
    if not streams:
      streams = [line for line in lines if line.name not in ("XLA Modules", "Steps", "XLA TraceMe")]
    for line in streams:
      for event in line.events:
        by_name[event.name] += event.duration_ns
        count[event.name] += 1
  if not by_name:
    return {"error": "no device kernels in the trace (CPU run?)", "planes": planes,
            "lines": sorted(lines_seen)}
  total = sum(by_name.values())
  by_kind = collections.Counter()
  for name, ns in by_name.items():
    by_kind[kind_of(name)] += ns
  per_step = lambda ns: ns / steps / 1e6  # noqa: E731 (ms per step)
  return {
      "steps": steps,
      "lines": sorted(lines_seen),
      "kernel_ms_per_step": per_step(total),
      "by_kind_ms_per_step": {k: per_step(v) for k, v in by_kind.most_common()},
      "top_kernels": [{"name": n[:120], "kind": kind_of(n), "ms_per_step": per_step(ns),
                       "calls_per_step": count[n] / steps, "share": ns / total}
                      for n, ns in by_name.most_common(top)],
  }


def format_summary(summary: dict, step_ms: float | None = None) -> str:
  if "error" in summary:
    return f"[profile] {summary['error']}"
  lines = [f"[profile] kernel time {summary['kernel_ms_per_step']:.1f} ms per step"
           + ("" if step_ms is None else f" of {step_ms:.1f} ms wall "
              f"({100 * summary['kernel_ms_per_step'] / step_ms:.0f}% busy)")]
  lines.append("[profile] by kind: " + ", ".join(
      f"{k} {v:.1f} ms" for k, v in summary["by_kind_ms_per_step"].items()))
  for k in summary["top_kernels"]:
    lines.append(f"[profile]   {k['ms_per_step']:7.2f} ms {100 * k['share']:5.1f}% "
                 f"x{k['calls_per_step']:<5.0f} {k['kind']:<15} {k['name']}")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("trace_dir")
  parser.add_argument("--steps", type=int, default=1, help="steps the trace covers")
  parser.add_argument("--top", type=int, default=25)
  args = parser.parse_args()
  summary = summarize(args.trace_dir, steps=args.steps, top=args.top)
  print(format_summary(summary))
  print(json.dumps(summary))


if __name__ == "__main__":
  main()
