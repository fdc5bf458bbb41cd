"""Hugging Face `flax_model.msgpack` weights as the PyTorch-named state dict the importers map.

Why: some Hub repositories the recipes name serve no safetensors, only
`pytorch_model.bin` and `flax_model.msgpack` (`microsoft/beit-base-patch16-224-pt22k-ft22k`).
The msgpack file is Flax's own serialization (`flax.serialization.to_bytes` of the params
tree): plain msgpack with numpy arrays as an extension type, so reading it runs nothing
from the file and needs no torch. Its keys are the Flax modules' names, which Hugging Face
chose to mirror the PyTorch modules' names; only the parameter leaves and layouts differ:

```
Flax leaf                               PyTorch leaf
<dense>.kernel   [in, out]              <dense>.weight   [out, in]           (transposed)
<conv>.kernel    [kh, kw, in, out]      <conv>.weight    [out, in, kh, kw]
<embed>.embedding [vocab, width]        <embed>.weight   [vocab, width]
<LayerNorm>.scale                       <LayerNorm>.weight
anything else (bias, cls_token, lambda_1, relative_position_bias_table, an MLM bias)
                                        the same name and layout
```

so `encoder/layer/0/attention/attention/query/kernel` becomes
`encoder.layer.0.attention.attention.query.weight` (transposed) and the BEiT / BERT key
maps (`hf_beit.py`, `hf_bert.py`) apply unchanged. Task models keep their backbone under
`beit` / `bert` (`FlaxBeitForImageClassification`: `beit.*` and `classifier.*`), as the
PyTorch ones do. PyTorch's buffers (`relative_position_index`, `position_ids`) are not
parameters in Flax and are simply absent; tied MLM decoders are not stored.

A sharded checkpoint (`flax_model.msgpack.index.json`) stores each shard as a flat dict
whose keys join the path with '/'; both forms flatten to the same dotted names.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from t2v2t_jax.checkpoints import weight_rules

# A parameter tree nests a few levels (module paths); deeper is a crafted file, refused
# before Python's own recursion limit turns it into a RecursionError.
MAX_NESTING = 64


def _flatten(tree: Mapping, prefix: str, out: dict, depth: int = 1) -> None:
  if depth > MAX_NESTING:
    raise ValueError(f"parameters nest more than {MAX_NESTING} levels deep "
                     f"(at {prefix[:120]!r})")
  for key, value in tree.items():
    if not isinstance(key, str):
      raise ValueError(f"key {str(key)[:80]!r} under {prefix[:120] or 'the top'!r} is not a "
                       "string")
    name = prefix + key.replace("/", ".")
    if isinstance(value, Mapping):
      _flatten(value, name + ".", out, depth + 1)
    elif isinstance(value, np.ndarray) or np.isscalar(value):
      if name in out:
        raise ValueError(f"parameter {name[:200]!r} is stored twice")
      out[name] = np.asarray(value)
    else:
      raise ValueError(f"{name[:200]!r} is a {type(value).__name__}, not an array")


def read_flax_params(data: bytes, source: str = "<msgpack>") -> dict[str, np.ndarray]:
  """`{dotted Flax name: numpy array}` of a Flax msgpack file's bytes (half precision
  kept as stored)."""
  from flax import serialization  # noqa: PLC0415 (flax's reader: msgpack + its ndarray ext)
  try:
    tree = serialization.msgpack_restore(data)
  except Exception as e:  # noqa: BLE001 (a damaged file: one line naming it)
    raise ValueError(f"{source}: not a readable Flax msgpack file "
                     f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
  if not isinstance(tree, Mapping):
    raise ValueError(f"{source}: expected a tree of parameters, got {type(tree).__name__}")
  if set(tree) == {"params"} and isinstance(tree["params"], Mapping):
    tree = tree["params"]  # a variables dict rather than the params themselves
  out: dict[str, np.ndarray] = {}
  try:
    _flatten(tree, "", out)
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from None
  return out


def torch_name_and_layout(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
  """One Flax parameter as its PyTorch name and layout (table in the module docstring)."""
  head, _, leaf = name.rpartition(".")
  prefix = head + "." if head else ""
  if leaf == "kernel":
    if value.ndim == 2:       # nn.Dense
      return prefix + "weight", value.T
    if value.ndim == 4:       # nn.Conv over 2-D: HWIO -> OIHW
      return prefix + "weight", value.transpose(3, 2, 0, 1)
    if value.ndim == 3:       # nn.Conv over 1-D: WIO -> OIW
      return prefix + "weight", value.transpose(2, 1, 0)
    raise ValueError(f"{name!r}: a {value.ndim}-D kernel has no PyTorch layout here")
  if leaf in ("scale", "embedding"):
    return prefix + "weight", value
  return name, value


def flax_to_torch_state(params: Mapping[str, np.ndarray], source: str = "<msgpack>"
                        ) -> dict[str, np.ndarray]:
  """`read_flax_params` output -> `{PyTorch key: array}`, float16/bfloat16/float8 upcast
  to float32, every array contiguous (no views of the file's buffer)."""
  out: dict[str, np.ndarray] = {}
  for name, value in params.items():
    if weight_rules.needs_upcast(value.dtype):
      value = value.astype(np.float32)
    try:
      key, value = torch_name_and_layout(name, value)
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None
    if key in out:
      raise ValueError(f"{source}: {name!r} and another parameter both become {key!r}")
    out[key] = np.ascontiguousarray(value)
  return out


def read_flax_msgpack(data: bytes, source: str = "<msgpack>") -> dict[str, np.ndarray]:
  """The bytes of a `flax_model.msgpack` (or one shard) as a PyTorch-named state dict."""
  return flax_to_torch_state(read_flax_params(data, source), source)
