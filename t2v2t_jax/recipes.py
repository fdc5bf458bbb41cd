"""Recipe files by path: `configs/x.py[:arg]` -> the ConfigDict its `get_config(arg)` builds.

`main.py` reads `--config` with ml_collections' own flag; everything else that takes a
recipe by path (the converter, the ablation script, the config reference, `main.py`'s
message for a misspelt override) loads it here, so every tool reads a recipe, and its
`:arg`, the same way.
"""

from __future__ import annotations

import importlib.util
import os
import types


def recipe_module(path: str | os.PathLike) -> types.ModuleType:
  """The recipe file at `path`, imported as a module (its docstring is its command)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no recipe file {path!r}")
  spec = importlib.util.spec_from_file_location(
      "_recipe_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def load_recipe(spec: str):
  """`configs/x.py[:arg]` -> `get_config(arg)` of that file (arg None when absent)."""
  path, _, arg = os.fspath(spec).partition(":")
  return recipe_module(path).get_config(arg or None)
