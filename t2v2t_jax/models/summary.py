"""Parameter count per part of the model, without allocating weights (`nnx.eval_shape`).

  python -m t2v2t_jax.models.summary                  # paper size, every fusion mode
  python -m t2v2t_jax.models.summary --vision S/16 --text small --frames 12

At paper size `v2t` is VindLU's model: its count is compared with VindLU's pretraining
model (238,221,833 parameters, MLM head included, as ours always has one) less the unused
temporal `linear` layers (12 x 590,592) that VindLU creates and this project does not.
"""

from __future__ import annotations

import argparse
import collections

import numpy as np

from t2v2t_jax.models.config import FUSION_MODES, model_config
from t2v2t_jax.models.t2v2t import abstract_params
from t2v2t_jax.tree_paths import flatten

VINDLU_PRETRAIN_PARAMS = 238_221_833
VINDLU_UNUSED_TEMPORAL_LINEAR = 12 * 590_592


def count_by_part(config) -> dict[str, int]:
  """{top-level part or fusion sub-part: parameter count} for one model config."""
  _, params = abstract_params(config)
  counts = collections.OrderedDict()
  for path, leaf in flatten(params).items():
    names = path.split(".")
    part = names[0]
    if part == "fusion_encoder" and len(names) > 1 and names[1] in ("t2v", "t2v_blocks"):
      part = "fusion_encoder.t2v (bypass)"
    counts[part] = counts.get(part, 0) + int(np.prod(leaf.shape))
  return counts


def format_summary(vision="B/16", text="base", frames=4, modes=FUSION_MODES) -> str:
  lines = []
  baseline = None
  for mode in modes:
    config = model_config(vision, text, mode)
    config.vision.num_frames = frames
    counts = count_by_part(config)
    total = sum(counts.values())
    if mode == "v2t":
      baseline = total
    lines.append(f"{mode}  (vision {vision}, text {text}, {frames} frames)")
    for part, n in counts.items():
      lines.append(f"  {part:32s} {n:>14,d}")
    lines.append(f"  {'total':32s} {total:>14,d}")
    if mode == "v2t" and (vision, text) == ("B/16", "base"):
      ref = VINDLU_PRETRAIN_PARAMS - VINDLU_UNUSED_TEMPORAL_LINEAR
      lines.append(f"  VindLU pretraining model: {VINDLU_PRETRAIN_PARAMS:,d} "
                   f"({ref:,d} without its unused temporal linear layers); difference "
                   f"{total - ref:+,d}")
    if baseline is not None and mode != "v2t":
      lines.append(f"  adds {total - baseline:+,d} parameters to v2t")
    lines.append("")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--vision", default="B/16")
  parser.add_argument("--text", default="base")
  parser.add_argument("--frames", type=int, default=4)
  parser.add_argument("--mode", choices=FUSION_MODES, action="append",
                      help="fusion mode(s); default: all, v2t first")
  args = parser.parse_args(argv)
  modes = args.mode or ["v2t"] + [m for m in FUSION_MODES if m != "v2t"]
  print(format_summary(args.vision, args.text, args.frames, modes))


if __name__ == "__main__":
  main()
