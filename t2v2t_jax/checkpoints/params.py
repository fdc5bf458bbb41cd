"""Parameters by dotted path: read them, and write `{path: array}` into them.

Paths join the attribute names and list indices of a module with dots, e.g.
`layers.0.attention.query.kernel` (`t2v2t_jax.tree_paths`). Only `nnx.Param` variables
are addressed (no RNG state). Every source of parameters (a Hugging Face or VindLU
import, another run's checkpoint, a converted folder) ends in `{path: array}` and goes
through `assign`, which checks every path and shape before building anything, so a
failed assignment leaves the parameters as they were.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx

from t2v2t_jax import tree_paths
from t2v2t_jax.errors import Refusal, capped_list
from t2v2t_jax.models import vision_encoder

TEMPORAL_EMBEDDING_SUFFIX = "temporal_pos_embed"


class ParamAssignError(Refusal):
  """Paths that do not exist or are missing, or shapes that do not match, when assigning."""


def flatten_params(module: nnx.Module) -> dict[str, jax.Array]:
  """`{'a.b.0.c': array}` for every `nnx.Param` of `module` (arrays are the live values)."""
  return tree_paths.flatten(nnx.state(module, nnx.Param))


def param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """`{'a.b.0.c': shape}` for every `nnx.Param` of `module`."""
  return {path: tuple(value.shape) for path, value in flatten_params(module).items()}


def _listed(names: list[str]) -> str:
  return capped_list(names)


def resizable_temporal(path: str, shape: tuple, want: tuple) -> bool:
  """Whether SPEC 1's temporal resize applies: only the frame count differs. Checked
  before resizing, so a crafted `[1, 0, 1, 10**9]` is refused, not padded to T x 10**9."""
  return (path.endswith(TEMPORAL_EMBEDDING_SUFFIX) and len(shape) == 4 and len(want) == 4
          and shape[1] >= 1 and (shape[0], shape[2], shape[3]) == (want[0], want[2], want[3]))


def assign(params, values: Mapping[str, np.ndarray], *, source: str = "the given arrays",
           complete: bool = False,
           source_names: Mapping[str, str] | None = None):
  """`params` (any pytree of arrays: an `nnx.State`, a sharded train-state entry) with the
  arrays of `values` `{dotted path: array}` written in; returns the new tree.

  Every path must name an existing parameter and every array must have that parameter's
  shape, except the temporal position embedding, which is resized by SPEC 1's rule (zero
  rows added for more frames, the first T kept for fewer). With `complete`, every
  parameter must be given. Values are cast to the parameter's dtype and placed with its
  sharding. All problems are raised together in one `ParamAssignError` naming `source`
  (and, via `source_names` {path: source key}, the checkpoint key of each path).
  """
  ours = tree_paths.flatten(params)

  def named(path):
    return f"{path!r} (from source key {source_names[path]!r})" if source_names and \
        path in source_names else repr(path)

  problems = []
  for path, value in values.items():  # shapes first: nothing is converted or resized yet
    shape = tuple(np.shape(value))
    if path in ours and shape != tuple(ours[path].shape) and \
        not resizable_temporal(path, shape, tuple(ours[path].shape)):
      problems.append(f"shape mismatch for {named(path)}: the model expects "
                      f"{tuple(ours[path].shape)}, got {shape}")
  unknown = sorted(set(values) - set(ours))
  if unknown:
    problems.append("no such parameter in the model: " + _listed([named(p) for p in unknown]))
  if complete:
    missing = sorted(set(ours) - set(values))
    if missing:
      problems.append("missing: " + _listed(missing))
  if problems:
    raise ParamAssignError(f"cannot assign the parameters of {source}:\n  "
                           + capped_list(problems, sep="\n  "))
  new = {}
  for path, value in values.items():
    if path not in ours:
      continue
    target = ours[path]
    value = np.asarray(value)
    want = tuple(target.shape)
    if value.shape != want and resizable_temporal(path, value.shape, want):
      value = np.asarray(vision_encoder.resize_temporal_embedding(value, want[1], mode="zero_pad"))
    if value.shape != want:
      continue  # named above
    # Placed like the parameter it replaces (host numpy parameters have no sharding).
    new[path] = jax.device_put(value.astype(target.dtype), getattr(target, "sharding", None))
  return tree_paths.unflatten_like(params, new)


def assign_into(module: nnx.Module, values: Mapping[str, np.ndarray], *,
                source: str = "the given arrays",
                source_names: Mapping[str, str] | None = None) -> None:
  """`assign` into a module's parameters, in place (the importers' entry point)."""
  state = nnx.state(module, nnx.Param)
  nnx.update(module, assign(state, values, source=source, source_names=source_names))
