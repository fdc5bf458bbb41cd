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

torch is never imported: no reader needs it. Half-precision and float8 tensors are upcast
to float32, each storage once however many keys share it (issue 25: one fp16 tensor
saved under 2,000 names made 2,000 float32 copies). Folders and files may be `gs://...`
URLs: everything is read through `etils.epath` (bytes where a library wants a local
file); a local safetensors file is still memory-mapped.

Every file a folder names is checked as `weight_rules` says (issue 25): `config.json` and
index files are JSON objects of bounded size, else one `HfCheckpointError` naming the
file and field; an index's shards are plain weight files (never another index: no
recursion) inside the folder (no absolute path, no `..`, no symlink out). Which file each
key came from is kept (`file_of`), so the importers name it in their errors.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
from etils import epath

from t2v2t_jax.checkpoints import hf_flax_msgpack, weight_rules
from t2v2t_jax.errors import Refusal, capped_list, one_line

# The weights a folder may hold, in the order they are preferred; each single file is
# followed by its sharded index.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "flax_model.msgpack", "flax_model.msgpack.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# What a Hub download fetches for each choice (shards by their Hub names).
_SHARDS = {"model.safetensors.index.json": "model-*.safetensors",
           "flax_model.msgpack.index.json": "flax_model-*.msgpack",
           "pytorch_model.bin.index.json": "pytorch_model-*.bin"}


class HfCheckpointError(Refusal):
  """A Hugging Face folder or file this reader refuses; the message names the file."""


class WeightDict(dict):
  """`{key: array}` that also remembers which file each key was read from (`files`)."""

  def __init__(self, *args, files: dict[str, str] | None = None, **kw):
    super().__init__(*args, **kw)
    self.files: dict[str, str] = dict(files or {})


def file_of(tensors, key: str, default: str = "") -> str:
  """The file `key` was read from (a shard of a sharded checkpoint), else `default`."""
  return getattr(tensors, "files", {}).get(key, default)


def _is_url(path: str) -> bool:
  return re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", path) is not None


def _upcast(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return weight_rules.upcast_all(tensors)


def _load_safetensors(path: epath.Path) -> dict[str, np.ndarray]:
  if not _is_url(os.fspath(path)):  # local: memory-mapped, as safetensors reads it
    from safetensors import safe_open  # noqa: PLC0415
    out = {}
    try:
      with safe_open(os.fspath(path), framework="numpy") as f:
        for k in f.keys():
          out[k] = f.get_tensor(k)
    except (TypeError, ValueError, AttributeError):
      # bfloat16 / float8, which safetensors' numpy reader does not know: read through JAX
      # (ml_dtypes arrays, upcast below).
      from safetensors.flax import load_file  # noqa: PLC0415
      out = {k: np.asarray(v) for k, v in load_file(os.fspath(path)).items()}
    return _upcast(out)
  data = path.read_bytes()
  try:
    from safetensors.numpy import load  # noqa: PLC0415
    out = load(data)
  except (TypeError, ValueError, AttributeError):
    from safetensors.flax import load  # noqa: PLC0415
    out = {k: np.asarray(v) for k, v in load(data).items()}
  return _upcast(out)


def _load_torch_bin(path: epath.Path) -> dict[str, np.ndarray]:
  from t2v2t_jax.checkpoints.safe_torch_load import safe_torch_load  # noqa: PLC0415
  sd = safe_torch_load(os.fspath(path), tensors="numpy")
  if not isinstance(sd, dict):
    raise HfCheckpointError(f"{path}: expected a state dict, got {type(sd).__name__}")
  bad = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise HfCheckpointError(f"{path}: entry {str(bad[0])[:120]!r} is a "
                            f"{type(sd[bad[0]]).__name__}, not a tensor")
  return _upcast(sd)


# The shard file names an index of each kind may list (never another index).
_SHARD_SUFFIX = {"model.safetensors.index.json": ".safetensors",
                 "flax_model.msgpack.index.json": ".msgpack",
                 "pytorch_model.bin.index.json": ".bin"}


def index_shards(path: epath.Path) -> list[str]:
  """The shard names of a `*.index.json`, checked: a JSON object whose `weight_map` maps
  string keys to file names of the index's own kind (a shard that is another index would
  recurse; `../x` or an absolute path would read another folder's weights)."""
  name = os.fspath(path)
  index = weight_rules.json_object(weight_rules.read_json(path, HfCheckpointError), name,
                                   error=HfCheckpointError)
  weight_map = index.get("weight_map")
  if not isinstance(weight_map, dict) or not weight_map:
    raise HfCheckpointError(f"{name}: field 'weight_map' is "
                            f"{'missing' if weight_map is None else type(weight_map).__name__}"
                            ", expected an object of key -> shard file name")
  suffix = _SHARD_SUFFIX.get(path.name, (".safetensors", ".msgpack", ".bin"))
  bad = [f"{k!r} -> {v!r}"[:160] for k, v in weight_map.items()
         if not isinstance(v, str) or not v.endswith(suffix) or v.endswith(".index.json")]
  if bad:
    raise HfCheckpointError(f"{name}: field 'weight_map' names files that are not "
                            f"{suffix} shards: {capped_list(bad, limit=5)}")
  shards = sorted(set(weight_map.values()))
  for shard in shards:
    weight_rules.inside_folder(path.parent, shard, file=name, error=HfCheckpointError)
  return shards


_READABLE_SAFETENSORS = {"F16", "BF16", "F32", "F64", "I8", "I16", "I32", "I64", "U8", "U16",
                         "U32", "U64", "BOOL"}


def _safetensors_dtypes(path: epath.Path) -> set[str]:
  """The dtype names a safetensors header declares (empty if the header is unreadable):
  for naming what could not be read."""
  try:
    with path.open("rb") as f:
      size = int.from_bytes(f.read(8), "little")
      if size > weight_rules.MAX_JSON_BYTES:
        return set()
      header = json.loads(f.read(size))
    return {str(v.get("dtype"))[:20] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)}
  except (OSError, ValueError, AttributeError, RecursionError):
    return set()


def _load_one_file(path: epath.Path) -> dict[str, np.ndarray]:
  name = path.name
  if name.endswith(".safetensors"):
    try:
      return _load_safetensors(path)
    except FileNotFoundError:
      raise
    except Exception as e:  # noqa: BLE001 (safetensors' own error type: one line naming the file)
      odd = sorted(_safetensors_dtypes(path) - _READABLE_SAFETENSORS)
      if odd:  # e.g. float8, which safetensors reads into no numpy or JAX array here
        raise HfCheckpointError(f"{path}: holds tensors of dtype {', '.join(odd)}, which "
                                "cannot be read without torch; save them as float16, "
                                "bfloat16 or float32") from None
      raise HfCheckpointError(f"{path}: not a readable safetensors file "
                              f"({type(e).__name__}: {one_line(e)[:200]})") from None
  if name.endswith(".msgpack"):
    try:
      return hf_flax_msgpack.read_flax_msgpack(path.read_bytes(), source=os.fspath(path))
    except ValueError as e:
      raise HfCheckpointError(one_line(e)[:500]) from None
  return _load_torch_bin(path)


def _load_weights_file(path: epath.Path) -> WeightDict:
  """One weights file, or the shards of an index (each a plain file: no recursion)."""
  if not path.name.endswith(".index.json"):
    part = _load_one_file(path)
    return WeightDict(part, files=dict.fromkeys(part, os.fspath(path)))
  out = WeightDict()
  for shard in index_shards(path):
    shard_path = path.parent / shard
    if not shard_path.exists():
      raise FileNotFoundError(f"{path}: shard {shard!r} is missing")
    part = _load_one_file(shard_path)
    clash = sorted(set(part) & set(out))
    if clash:
      raise HfCheckpointError(f"{path}: key {clash[0][:120]!r} is in more than one shard")
    out.update(part)
    out.files.update(dict.fromkeys(part, os.fspath(shard_path)))
  return out


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
    config = weight_rules.json_object(weight_rules.read_json(config_path, HfCheckpointError),
                                      os.fspath(config_path), error=HfCheckpointError)
  return config, _load_weights_file(weights), os.fspath(weights)
