"""A recipe's synthetic dataset, created on first use (`config.synthetic.create_if_missing`).

The demo and every `:tiny` run train on the synthetic corpus (`synthetic.py`); the first
run writes it to `config.data_root` with the recipe's generation settings and leaves a
marker (`AUTO_CREATED`) beside it. Later runs reuse the folder, but refuse it when the
marker records other settings (frame size, counts, seed): training on stale data would
otherwise go unnoticed. A dataset made by hand has no marker and is used as it is.
"""

from __future__ import annotations

import json
import os

import jax

AUTO_CREATED = "created_by_recipe.json"  # written beside the dataset it describes


def _settings(syn) -> dict:
  return {"seed": syn.seed, "size": syn.size, "fps": syn.fps, "num_frames": syn.num_frames,
          "counts": {"train": syn.num_train, "val": syn.num_val, "test": syn.num_test}}


def _check_settings(root: str, syn) -> None:
  marker = os.path.join(root, AUTO_CREATED)
  if not os.path.isfile(marker):
    return
  with open(marker) as f:
    found = json.load(f)
  wanted = _settings(syn)
  if found != wanted:
    diff = ", ".join(f"{k}: {found.get(k)} (config: {wanted[k]})" for k in wanted
                     if found.get(k) != wanted[k])
    raise ValueError(
        f"The synthetic dataset in {root} was generated with other settings ({diff}). "
        f"Delete {root} to regenerate it, or set --config.data_root to another folder.")


def create_if_missing(config) -> None:
  """Writes the synthetic dataset to `config.data_root` if the config asks for it and the
  folder holds none; checks a recipe-made one against the config's settings."""
  syn = config.get("synthetic", None)
  if not syn or not syn.get("create_if_missing", False):
    return
  root = config.data_root
  if os.path.isfile(os.path.join(root, "train.json")):
    _check_settings(root, syn)
    return
  # Other hosts wait at the barrier below until process 0 has written the files.
  if jax.process_index() == 0:
    from input_pipeline import synthetic  # noqa: PLC0415
    print(f"Creating the synthetic dataset in {root} ...", flush=True)
    synthetic.generate_dataset(root, num_train=syn.num_train, num_val=syn.num_val,
                               num_test=syn.num_test, seed=syn.seed, size=syn.size, fps=syn.fps,
                               num_frames=syn.num_frames)
    with open(os.path.join(root, AUTO_CREATED), "w") as f:
      json.dump(_settings(syn), f)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices("synthetic dataset ready")
