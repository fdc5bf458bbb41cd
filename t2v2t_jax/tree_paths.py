"""Dotted paths of nested structures: the one way this project names a leaf.

A parameter is named by the attribute names and list indices that lead to it, joined by
dots (`vision_encoder.layers.0.attention.query.kernel`); a config field the same way
(`model.vision.width`). The optimizer's decay rule, the checkpoint importers, the
initialisation from another run, the config reference and the resume check all name
leaves with `flatten`, so a path means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

# Trailing entries that name a Variable's storage rather than the parameter itself: an
# `nnx.State` leaf sits under `.value`, and a checkpoint restored without a target keeps
# that key.
STORAGE_KEYS = ("value", "raw_value")


def _entry_name(entry) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(entry, attribute):
      return str(getattr(entry, attribute))
  return str(entry)


def parameter_path(path) -> tuple[str, ...]:
  """A pytree key path as a tuple of names, storage keys (`.value`) dropped.

  Dotted or slashed string keys (flat dicts such as {'a.b.bias': x}) are split, so a
  nested tree and its flattened form give the same names.
  """
  names = []
  for entry in path:
    names.extend(part for part in _entry_name(entry).replace("/", ".").split(".") if part)
  while len(names) > 1 and names[-1] in STORAGE_KEYS:
    names.pop()
  return tuple(names)


def flatten(tree, *, is_leaf: Callable[[Any], bool] | None = None) -> dict[str, Any]:
  """`{dotted path: leaf}` of any pytree (an `nnx.State`, restored nested dicts, ...),
  in the pytree's order (dict keys sorted)."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  return {".".join(parameter_path(path)): leaf for path, leaf in leaves}


def unflatten_like(tree, flat: Mapping[str, Any]):
  """`tree` with each leaf whose dotted path is in `flat` replaced by that value."""
  def replace(path, leaf):
    return flat.get(".".join(parameter_path(path)), leaf)
  return jax.tree_util.tree_map_with_path(replace, tree)


def flatten_config(config) -> dict[str, Any]:
  """`{dotted field: value}` of a ConfigDict or of a parsed `config.json` (a plain dict).

  Only dicts are descended into: lists (the corpora), tuples and None stay whole values.
  """
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  return flatten(config, is_leaf=lambda x: not isinstance(x, dict))
