"""Reading a Hugging Face checkpoint: a folder, a single weights file, or a hub name.

Both Hugging Face importers (`hf_beit.py`, `hf_bert.py`) read through `read_hf_checkpoint`:
`config.json` beside the weights, and the weights in the first form the folder (or the Hub
repository) has, in this order:

1. `model.safetensors` (or its sharded index),
2. `flax_model.msgpack` (or its sharded index): Flax's serialization, renamed to the
   PyTorch keys and layouts (`hf_flax_msgpack.py`); some repositories the recipes name
   serve no safetensors (`microsoft/beit-base-patch16-224-pt22k-ft22k`),
3. `pytorch_model.bin` (or its sharded index), read by the project's restricted unpickler
   (`safe_torch_load`) straight into numpy.

torch is never imported: no reader needs it. Half-precision tensors are upcast to
float32. Folders and files may be `gs://...` URLs: everything is read through
`etils.epath` (bytes where a library wants a local file); a local safetensors file is
still memory-mapped.
"""

from __future__ import annotations

import json
import os
import re

import ml_dtypes
import numpy as np
from etils import epath

from t2v2t_jax.checkpoints import hf_flax_msgpack

# The weights a folder may hold, in the order they are preferred; each single file is
# followed by its sharded index.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "flax_model.msgpack", "flax_model.msgpack.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# What a Hub download fetches for each choice (shards by their Hub names).
_SHARDS = {"model.safetensors.index.json": "model-*.safetensors",
           "flax_model.msgpack.index.json": "flax_model-*.msgpack",
           "pytorch_model.bin.index.json": "pytorch_model-*.bin"}
_HALF = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def _is_url(path: str) -> bool:
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _upcast(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: v.astype(np.float32) if v.dtype in _HALF else v for k, v in tensors.items()}


def _load_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
  if not _is_url(os.fspath(path)):  # local: memory-mapped, as safetensors reads it
    from safetensors import safe_open  # noqa: PLC0415
    out = {}
    try:
      with safe_open(os.fspath(path), framework="numpy") as f:
        for k in f.keys():
          out[k] = f.get_tensor(k)
    except (TypeError, ValueError):  # e.g. bfloat16 without numpy support: read through JAX
      from safetensors.flax import load_file  # noqa: PLC0415
      out = {k: np.asarray(v.astype("float32") if str(v.dtype) == "bfloat16" else v)
             for k, v in load_file(os.fspath(path)).items()}
    return _upcast(out)
  data = path.read_bytes()
  try:
    from safetensors.numpy import load  # noqa: PLC0415
    out = load(data)
  except (TypeError, ValueError):
    from safetensors.flax import load  # noqa: PLC0415
    out = {k: np.asarray(v.astype("float32") if str(v.dtype) == "bfloat16" else v)
           for k, v in load(data).items()}
  return _upcast(out)


def _load_torch_bin(path: epath.Path) -> dict[str, np.ndarray]:
  from t2v2t_jax.checkpoints.safe_torch_load import safe_torch_load  # noqa: PLC0415
  sd = safe_torch_load(os.fspath(path), tensors="numpy")
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
  bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{path}: entry {bad[0]!r} is a {type(sd[bad[0]]).__name__}, not a "
                     "tensor")
  return _upcast(sd)


def _load_weights_file(path: epath.Path) -> dict[str, np.ndarray]:
  name = path.name
  if name.endswith(".index.json"):
    shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    out = {}
    for shard in shards:
      part = _load_weights_file(path.parent / shard)
      clash = sorted(set(part) & set(out))
      if clash:
        raise ValueError(f"{path}: key {clash[0]!r} is in more than one shard")
      out.update(part)
    return out
  if name.endswith(".safetensors"):
    return _load_safetensors(path)
  if name.endswith(".msgpack"):
    return hf_flax_msgpack.read_flax_msgpack(path.read_bytes(), source=os.fspath(path))
  return _load_torch_bin(path)


def choose_weight_files(names) -> list[str] | None:
  """Which files of a repository listing (or folder listing) to read: `config.json` and
  the preferred weights of `WEIGHT_FILES` (an index with its shard pattern), as
  `snapshot_download` allow-patterns; None when it has no usable weights."""
  names = set(names)
  for weights in WEIGHT_FILES:
    if weights in names:
      return ["config.json", weights] + ([_SHARDS[weights]] if weights in _SHARDS else [])
  return None


def _download(name: str) -> str:
  """A local folder with `config.json` and the preferred weights of hub repository `name`
  (only those are downloaded)."""
  from huggingface_hub import list_repo_files, snapshot_download  # noqa: PLC0415
  try:
    files = list_repo_files(name)
  except Exception as e:  # noqa: BLE001 (no such repo, no network, gated: one line)
    reason = " ".join(str(e).split())[:300]
    raise FileNotFoundError(f"{name!r} is no local folder or file, and the Hugging Face Hub "
                            f"did not list it ({type(e).__name__}: {reason})") from e
  patterns = choose_weight_files(f for f in files if "/" not in f)
  if patterns is None:
    raise FileNotFoundError(f"Hugging Face repository {name!r} serves none of {WEIGHT_FILES} "
                            f"(it has {sorted(files)[:12]})")
  return snapshot_download(name, allow_patterns=patterns)


def read_hf_checkpoint(folder_or_name) -> tuple[dict | None, dict[str, np.ndarray], str]:
  """`(config dict or None, {key: numpy array}, description)` of a HF-format checkpoint.

  Accepts a folder (config.json + weights, preferred as `WEIGHT_FILES` orders them), a
  single weights file (config.json beside it is read if present), a `gs://...` URL of
  either, or a hub repository name. Raises FileNotFoundError naming the path or
  repository when there are no usable weights.
  """
  if isinstance(folder_or_name, tuple) and len(folder_or_name) == 3:
    return folder_or_name  # already read (`training/initialization.fetch_weights`)
  text = os.fspath(folder_or_name)
  path = epath.Path(text)
  if not path.exists():
    if _is_url(text) or text.startswith((".", "/", "~")) or text.count("/") > 1:
      raise FileNotFoundError(f"no checkpoint at {text!r}")
    path = epath.Path(_download(text))
  if path.is_dir():
    folder = path
    chosen = choose_weight_files(p.name for p in path.iterdir())
    if chosen is None:
      raise FileNotFoundError(f"{os.fspath(path)!r} holds none of {WEIGHT_FILES}")
    weights = path / chosen[1]
  else:
    folder, weights = path.parent, path
  config = None
  config_path = folder / "config.json"
  if config_path.exists():
    config = json.loads(config_path.read_text())
  return config, _load_weights_file(weights), os.fspath(weights)
