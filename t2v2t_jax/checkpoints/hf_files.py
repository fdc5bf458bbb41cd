"""Reading a Hugging Face checkpoint: a folder, a single weights file, or a hub name.

Both Hugging Face importers (`hf_beit.py`, `hf_bert.py`) read through `read_hf_checkpoint`:
`config.json` beside the weights, `model.safetensors` (or its sharded index) preferred
over `pytorch_model.bin` (read with `torch.load(weights_only=True)`), half-precision
tensors upcast to float32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import numpy as np

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  try:
    with safe_open(path, framework="numpy") as f:
      for k in f.keys():
        v = f.get_tensor(k)
        out[k] = v.astype(np.float32) if v.dtype.name in ("bfloat16", "float16") else v
  except (TypeError, ValueError):  # e.g. bfloat16 without numpy support: read through JAX
    from safetensors.flax import load_file
    out = {k: np.asarray(v.astype("float32") if str(v.dtype) == "bfloat16" else v)
           for k, v in load_file(path).items()}
  return out


def _load_torch_bin(path: str) -> dict[str, np.ndarray]:
  import torch  # lazily: only for .bin/.pth checkpoints
  sd = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(sd, Mapping):
    raise ValueError(f"{path}: expected a state dict, got {type(sd).__name__}")
  out = {}
  for k, v in sd.items():
    if not isinstance(v, torch.Tensor):
      raise ValueError(f"{path}: entry {k!r} is a {type(v).__name__}, not a tensor")
    v = v.detach().cpu()
    if v.dtype in (torch.bfloat16, torch.float16):
      v = v.to(torch.float32)
    out[k] = v.numpy()
  return out


def _load_weights_file(path: str) -> dict[str, np.ndarray]:
  if path.endswith(".index.json"):
    with open(path) as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    folder = os.path.dirname(path)
    out = {}
    for shard in shards:
      out.update(_load_weights_file(os.path.join(folder, shard)))
    return out
  if path.endswith(".safetensors"):
    return _load_safetensors(path)
  return _load_torch_bin(path)


def _download(name: str) -> str:
  from huggingface_hub import snapshot_download  # lazily: only for hub names
  folder = snapshot_download(name, allow_patterns=["config.json", "model.safetensors",
                                                   "model.safetensors.index.json",
                                                   "model-*.safetensors"])
  if not any(os.path.exists(os.path.join(folder, f)) for f in WEIGHT_FILES[:2]):
    folder = snapshot_download(name, allow_patterns=["config.json", "pytorch_model.bin",
                                                     "pytorch_model.bin.index.json",
                                                     "pytorch_model-*.bin"])
  return folder


def read_hf_checkpoint(folder_or_name: str) -> tuple[dict | None, dict[str, np.ndarray], str]:
  """`(config dict or None, {key: numpy array}, description)` of a HF-format checkpoint.

  Accepts a folder (config.json + weights, safetensors preferred), a single weights file
  (config.json beside it is read if present), or a hub repository name.
  """
  path = os.fspath(folder_or_name)
  if not os.path.exists(path):
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
      raise FileNotFoundError(f"no checkpoint at {path!r}")
    path = _download(path)
  if os.path.isdir(path):
    folder = path
    weights = next((os.path.join(path, f) for f in WEIGHT_FILES
                    if os.path.exists(os.path.join(path, f))), None)
    if weights is None:
      raise FileNotFoundError(f"{path!r} holds none of {WEIGHT_FILES}")
  else:
    folder, weights = os.path.dirname(path), path
  config = None
  config_path = os.path.join(folder, "config.json")
  if os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)
  return config, _load_weights_file(weights), weights
