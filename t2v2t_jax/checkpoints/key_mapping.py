"""Key maps: which source tensor becomes which of our parameters, and how its layout changes.

Every importer (Hugging Face BEiT, Hugging Face BERT, VindLU) describes its checkpoint as
a list of `KeyMapping(source, target, transform, group)` rows and applies them with
`apply_transform`; the VindLU exporter walks the same rows backwards with
`inverse_transform`. The rows of one importer are reused by another with prefixes (the
VindLU map is the BEiT and BERT maps with `vision_encoder.` / `text_encoder.` in front).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from t2v2t_jax.models.vision_encoder import (resize_relative_position_table,
                                             resize_temporal_embedding)

TRANSFORMS = ("copy", "linear", "conv", "rel_pos_table", "in_proj_q", "in_proj_k", "in_proj_v",
              "temporal_interpolate", "temporal_zero_pad")
REQUIRED = "required"


@dataclasses.dataclass(frozen=True)
class KeyMapping:
  """One source tensor -> one of our params. A source key may appear in several mappings
  (a shared relative position table; a packed q/k/v projection).

  `group`: 'required', or the name of an optional group that is loaded all-or-nothing
  (e.g. BERT's MLM head: absent from a plain BertModel, but if any of its keys is there,
  all must be).
  """
  source: str
  target: str
  transform: str = "copy"
  group: str = REQUIRED

  def __post_init__(self):
    if self.transform not in TRANSFORMS:
      raise ValueError(f"unknown transform {self.transform!r} for {self.source!r}")


def linear(src: str, dst: str, *, bias: bool = True, group: str = REQUIRED) -> list[KeyMapping]:
  """A PyTorch `Linear` (`weight [out, in]`, `bias`) -> our `kernel [in, out]`, `bias`."""
  out = [KeyMapping(f"{src}.weight", f"{dst}.kernel", "linear", group)]
  if bias:
    out.append(KeyMapping(f"{src}.bias", f"{dst}.bias", "copy", group))
  return out


def layer_norm(src: str, dst: str, *, group: str = REQUIRED) -> list[KeyMapping]:
  """A PyTorch `LayerNorm` (`weight`, `bias`) -> our `scale`, `bias`."""
  return [KeyMapping(f"{src}.weight", f"{dst}.scale", "copy", group),
          KeyMapping(f"{src}.bias", f"{dst}.bias", "copy", group)]


def infer_square_grid(table_rows: int) -> int:
  """Patch grid side g of a square BEiT relative position table with (2g-1)^2 + 3 rows."""
  side = math.isqrt(table_rows - 3) if table_rows > 3 else 0
  if side * side != table_rows - 3 or side % 2 == 0:
    raise ValueError(f"a relative position table with {table_rows} rows is not (2g-1)^2 + 3 "
                     "for any grid g; pass the source grid explicitly")
  return (side + 1) // 2


def _grid_pair(grid) -> tuple[int, int]:
  return (int(grid), int(grid)) if isinstance(grid, (int, np.integer)) else \
      (int(grid[0]), int(grid[1]))


def transformed_shape(kind: str, shape: Sequence[int], *, target_shape: Sequence[int],
                      src_grid=None, dst_grid=None) -> tuple[int, ...]:
  """The shape `apply_transform` would return, computed from shapes alone.

  Why: importers compare it with the model's shape BEFORE transforming anything. A
  crafted zero-element temporal embedding `[1, 0, 1, 10**9]` would otherwise be padded to
  `[1, T, 1, 10**9]` before its width is ever compared. Raises ValueError as
  `apply_transform` would for a shape the transform cannot take.
  """
  s = tuple(int(n) for n in shape)
  if kind == "copy":
    return s
  if kind == "linear":
    if len(s) != 2:
      raise ValueError(f"linear weight must be 2-D, got shape {s}")
    return s[::-1]
  if kind == "conv":
    if len(s) != 4:
      raise ValueError(f"conv weight must be [O, I, kh, kw], got shape {s}")
    return (s[2], s[3], s[1], s[0])
  if kind == "rel_pos_table":
    if len(s) != 2:
      raise ValueError(f"relative position table must be 2-D, got shape {s}")
    if src_grid is None:
      infer_square_grid(s[0])  # raises for a row count of no square grid
    else:
      gh, gw = _grid_pair(src_grid)
      if s[0] != (2 * gh - 1) * (2 * gw - 1) + 3:
        raise ValueError(f"relative position table of shape {s} does not fit grid "
                         f"{(gh, gw)}: expected [{(2 * gh - 1) * (2 * gw - 1) + 3}, heads]")
    if dst_grid is None:
      dst_rows = int(target_shape[0])
      infer_square_grid(dst_rows)
    else:
      gh, gw = _grid_pair(dst_grid)
      dst_rows = (2 * gh - 1) * (2 * gw - 1) + 3
    return (dst_rows, s[1])
  if kind.startswith("in_proj_"):
    if not s or s[0] % 3:
      raise ValueError(f"packed in_proj tensor of shape {s} is not 3 x width")
    part = (s[0] // 3,) + s[1:]
    return part[::-1] if len(part) == 2 else part
  if kind in ("temporal_interpolate", "temporal_zero_pad"):
    if len(s) != 4 or s[0] != 1 or s[2] != 1 or s[1] < 1:
      raise ValueError(f"temporal embedding must be [1, T >= 1, 1, D], got {s}")
    return (1, int(target_shape[1]), 1, s[3])
  raise ValueError(f"unknown transform {kind!r}")


def apply_transform(kind: str, array, *, target_shape: Sequence[int] | None = None,
                    src_grid=None, dst_grid=None) -> np.ndarray:
  """Turn a PyTorch-layout source tensor into our layout.

  copy: as is. linear: `[out, in] -> [in, out]`. conv: `[O, I, kh, kw] -> [kh, kw, I, O]`.
  rel_pos_table: resized from `src_grid` (default: inferred, square) to `dst_grid`
  (default: inferred from `target_shape`). in_proj_{q,k,v}: the q/k/v third of a packed
  `nn.MultiheadAttention` `in_proj_weight [3D, D]` (then transposed) or `in_proj_bias [3D]`.
  temporal_interpolate / temporal_zero_pad: `resize_temporal_embedding` to `target_shape[1]`.
  """
  a = np.asarray(array)
  if kind == "copy":
    return a
  if kind == "linear":
    if a.ndim != 2:
      raise ValueError(f"linear weight must be 2-D, got shape {a.shape}")
    return a.T
  if kind == "conv":
    if a.ndim != 4:
      raise ValueError(f"conv weight must be [O, I, kh, kw], got shape {a.shape}")
    return a.transpose(2, 3, 1, 0)
  if kind == "rel_pos_table":
    src = src_grid if src_grid is not None else infer_square_grid(a.shape[0])
    if dst_grid is None:
      if target_shape is None:
        raise ValueError("rel_pos_table needs dst_grid or target_shape")
      dst_grid = infer_square_grid(target_shape[0])
    return resize_relative_position_table(a, src, dst_grid)
  if kind.startswith("in_proj_"):
    which = "qkv".index(kind[-1])
    if a.shape[0] % 3:
      raise ValueError(f"packed in_proj tensor of shape {a.shape} is not 3 x width")
    n = a.shape[0] // 3
    part = a[which * n:(which + 1) * n]
    return part.T if part.ndim == 2 else part
  if kind in ("temporal_interpolate", "temporal_zero_pad"):
    if target_shape is None:
      raise ValueError(f"{kind} needs target_shape")
    return resize_temporal_embedding(a, int(target_shape[1]), kind[len("temporal_"):])
  raise ValueError(f"unknown transform {kind!r}")


def inverse_transform(kind: str, value: np.ndarray) -> np.ndarray:
  """Our layout back to PyTorch's, for the transforms that have a one-to-one inverse
  (resizing keeps our size; packed q/k/v are joined by the exporter itself)."""
  if kind in ("copy", "rel_pos_table", "temporal_zero_pad", "temporal_interpolate"):
    return value
  if kind == "linear":
    return value.T
  if kind == "conv":
    return value.transpose(3, 2, 0, 1)
  raise ValueError(f"no inverse for transform {kind!r}")
