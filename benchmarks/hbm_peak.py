"""What is live at a compiled program's memory peak, read from XLA's dump of it.

`--mode compile` states how much HBM a program needs; this says what fills it. Compile
with XLA's dumps on (the flags are read when JAX starts, so set them in the environment),
then point this at the dump folder:

  XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_as_text \\
      --xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_pass_re=^$" \\
    python main.py --config configs/webvid_pretrain.py --mode compile \\
      --config.compile.topology=v5e:1x1 --config.batch_size=64 \\
      --config.compile.eval_programs=False
  python benchmarks/hbm_peak.py /tmp/dump

The same works for a CPU or GPU compile (any jitted program). A program loaded from a
persistent compilation cache is not compiled, hence not dumped: turn the cache off
(JAX_ENABLE_COMPILATION_CACHE=false). XLA writes, per module,
the optimised HLO and its buffer live ranges ("Live ranges at T (peak)"): this prints the
largest buffers live at the peak of the module's top-level schedule with their shapes,
live ranges (schedule positions) and the JAX operation that made them (`op_name`), then
the same bytes grouped by operation. Buffers inside loop bodies (a scanned layer stack)
are accounted where the loop runs; the compiled total (`memory_analysis()`) also counts
fragmentation and is the figure that decides whether a program fits.

Used to find, in the paper-size pretraining step for TPU, the dropout bits every chip drew
for the whole global batch (docs/benchmarks.md, "TPU, compiled (not run)").
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import os
import re
import sys


@dataclasses.dataclass
class Buffer:
  name: str          # HLO value, e.g. "fusion.12{}" or "while.3{2}" (tuple element 2)
  bytes: int
  live: str          # "start-end" schedule positions, "" when not listed
  shape: str         # e.g. "bf16[64,4,197,768]", "" for tuple elements
  op_name: str       # the JAX operation from the HLO metadata, "" when none


@dataclasses.dataclass
class Peak:
  module: str
  time: int
  buffers: list[Buffer]

  @property
  def total(self) -> int:
    return sum(b.bytes for b in self.buffers)


def find_module(dump_dir: str, module: str) -> tuple[str, str]:
  """(live-range file, optimised HLO file) of the last module matching `module`."""
  ranges = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations-live-range.txt")))
  ranges = [f for f in ranges if re.search(module, os.path.basename(f))]
  if not ranges:
    raise SystemExit(f"{dump_dir}: no '*after_optimizations-live-range.txt' of a module "
                     f"matching {module!r}. Compile with XLA_FLAGS=\"--xla_dump_to={dump_dir} "
                     f"--xla_dump_hlo_as_text\" (see this script's help).")
  live = ranges[-1]
  hlo = live.replace("-live-range.txt", ".txt")
  if not os.path.exists(hlo):
    raise SystemExit(f"{hlo}: missing (the optimised HLO of {live})")
  return live, hlo


def read_peak(live_path: str, hlo_path: str) -> Peak:
  text = open(live_path).read()
  m = re.search(r"Live ranges at (\d+) \(peak\):\n((?:    .*\n)*)", text)
  if not m:
    raise SystemExit(f"{live_path}: no 'Live ranges at ... (peak)' section")
  ranges = dict(re.findall(r"^    (\S+\{[^}]*\}):(\d+-\d+)$", text, re.M))
  listed = re.findall(r"^    (\S+\{[^}]*\}): (\d+) bytes", m.group(2), re.M)
  wanted = {name.split("{")[0] for name, _ in listed}
  shapes, ops = {}, {}
  instruction = re.compile(r"^\s+(?:ROOT )?%?(\S+) = ([a-z0-9]+\[[0-9,]*\])")
  with open(hlo_path) as f:
    for line in f:
      im = instruction.match(line)
      if im and im.group(1) in wanted and im.group(1) not in shapes:
        shapes[im.group(1)] = im.group(2)
        om = re.search(r'op_name="([^"]*)"', line)
        ops[im.group(1)] = om.group(1) if om else ""
  buffers = []
  for name, size in listed:
    base, index = name.split("{")[0], name[name.index("{"):]
    whole = index == "{}"
    buffers.append(Buffer(name, int(size), ranges.get(name, ""),
                          shapes.get(base, "") if whole else "", ops.get(base, "")))
  module = re.split(r"\.(?:[a-z]+_)?after_optimizations", os.path.basename(live_path))[0]
  return Peak(module, int(m.group(1)), buffers)


def short_op(op_name: str, width: int = 72) -> str:
  op = op_name.replace("jit(train_step)/", "").replace("\\'", "'")
  return op if len(op) <= width else "..." + op[-(width - 3):]


def report(peak: Peak, top: int = 25) -> str:
  gib = 2 ** 30
  lines = [f"{peak.module}: peak of the top-level schedule at position {peak.time}: "
           f"{peak.total / gib:.2f} GiB in {len(peak.buffers)} buffers", "",
           f"{'MiB':>9}  {'live':>13}  {'shape':32}  operation"]
  for b in sorted(peak.buffers, key=lambda b: -b.bytes)[:top]:
    lines.append(f"{b.bytes / 2 ** 20:9.1f}  {b.live:>13}  {(b.shape or b.name)[:32]:32}  "
                 f"{short_op(b.op_name)}")
  groups = collections.Counter()
  for b in peak.buffers:
    groups[short_op(b.op_name) or "(no operation: parameters, loop state, copies)"] += b.bytes
  lines += ["", "By operation:", f"{'MiB':>9}  operation"]
  for op, size in groups.most_common(top):
    lines.append(f"{size / 2 ** 20:9.1f}  {op}")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog=__doc__.split("\n\n", 1)[1])
  parser.add_argument("dump_dir", help="the folder given to --xla_dump_to")
  parser.add_argument("--module", default="train_step",
                      help="regular expression on the module's file name (default: train_step)")
  parser.add_argument("--top", type=int, default=25, help="buffers and groups listed")
  args = parser.parse_args(argv)
  print(report(read_peak(*find_module(args.dump_dir, args.module)), args.top))
  return 0


if __name__ == "__main__":
  sys.exit(main())
