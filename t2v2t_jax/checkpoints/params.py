"""Generic helpers to read and write the parameters of a Flax NNX module by dotted path.

Paths join the attribute names and list indices of a module with dots, e.g.
`layers.0.attention.query.kernel`. Only `nnx.Param` variables are addressed (no RNG state,
no batch statistics). Importers build a `{path: numpy array}` dict and hand it to
`assign_params`, which checks every path and shape before touching the module, so a
failed import leaves the module unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx


def path_to_str(path: Iterable) -> str:
  return ".".join(str(p) for p in path)


def _flat_params(module: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
  state = nnx.state(module, nnx.Param)
  return {path_to_str(path): (tuple(path), var) for path, var in nnx.to_flat_state(state)}


def flatten_params(module: nnx.Module) -> dict[str, jnp.ndarray]:
  """`{'a.b.0.c': array}` for every `nnx.Param` of `module` (arrays are the live values)."""
  return {key: var.get_value() for key, (_, var) in _flat_params(module).items()}


def param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
  """`{'a.b.0.c': shape}` for every `nnx.Param` of `module`."""
  return {key: tuple(var.get_value().shape) for key, (_, var) in _flat_params(module).items()}


class ParamAssignError(ValueError):
  """A path that does not exist, or a shape that does not match, when assigning params."""


def assign_params(module: nnx.Module, updates: Mapping[str, np.ndarray | jnp.ndarray], *,
                  source_names: Mapping[str, str] | None = None) -> None:
  """Write arrays into `module`'s params by dotted path, in place.

  Every path must name an existing `nnx.Param` and every array must have exactly that
  param's shape; values are cast to the param's dtype. All checks run before the first
  write, and all problems are reported together in one `ParamAssignError`.

  Args:
    module: the NNX module to modify.
    updates: `{dotted path: array}`.
    source_names: optional `{dotted path: source key}` used to name the checkpoint key
      in error messages.
  """
  flat = _flat_params(module)
  problems = []
  for key, value in updates.items():
    src = f" (from source key {source_names[key]!r})" if source_names and key in source_names else ""
    if key not in flat:
      problems.append(f"no parameter {key!r} in {type(module).__name__}{src}")
      continue
    want = tuple(flat[key][1].get_value().shape)
    got = tuple(np.shape(value))
    if want != got:
      problems.append(f"shape mismatch for {key!r}{src}: expected {want}, got {got}")
  if problems:
    raise ParamAssignError("cannot assign parameters:\n  " + "\n  ".join(problems))

  new_flat = {}
  for key, (path, var) in flat.items():
    if key in updates:
      old = var.get_value()
      var = var.replace(value=jnp.asarray(np.asarray(updates[key]), dtype=old.dtype))
    new_flat[path] = var
  nnx.update(module, nnx.from_flat_state(new_flat))
