"""Import Hugging Face BEiT weights into `t2v2t_jax.models.vision_encoder.VideoEncoder`.

Source: a folder with `config.json` and `model.safetensors` (or sharded safetensors with
an index, or `flax_model.msgpack`, or `pytorch_model.bin`), a single weights file, a
`gs://...` URL of either, or a hub name such as
`microsoft/beit-base-patch16-224-pt22k-ft22k` (downloaded with `huggingface_hub`; that
one serves no safetensors, so its `flax_model.msgpack` is read), all without torch
(`hf_files.py`). `beit_values` checks everything and returns the values without writing
(what a training run does before it builds its model); `load_beit_into` writes them.

Every source key must be either mapped to one of our parameters or listed as dropped
(`DROPPED_KEY_PATTERNS`); anything else is an error that names the key. Every parameter
of ours that an image BEiT provides must be present in the source; the temporal blocks
and the temporal position embedding have no image source and keep their initial values
(`scale == 0`, zero embedding), listed in the report as newly initialised.

Key layout (Hugging Face "legacy" names, which `save_pretrained` writes; a `beit.` prefix
for `BeitForImageClassification` and friends; the transformers >= 5 in-memory names
`layers.{i}.attention.q_proj...` are accepted too):

```
embeddings.cls_token                                     -> embeddings.cls_token
embeddings.patch_embeddings.projection.{weight,bias}     -> embeddings.patch_embed.{kernel,bias}   (conv transpose)
encoder.layer.{i}.attention.attention.{query,key,value}.{weight,bias}
                                                         -> layers.{i}.attention.{query,key,value}.{kernel,bias}
encoder.layer.{i}.attention.attention.relative_position_bias.relative_position_bias_table
                                                         -> layers.{i}.relative_position_bias.table (resized if grids differ)
encoder.relative_position_bias.relative_position_bias_table (shared variant)
                                                         -> every layers.{i}.relative_position_bias.table
encoder.layer.{i}.attention.output.dense.*               -> layers.{i}.attention_output.*
encoder.layer.{i}.layernorm_{before,after}.{weight,bias} -> layers.{i}.layernorm_{before,after}.{scale,bias}
encoder.layer.{i}.intermediate.dense.*                   -> layers.{i}.ffn.intermediate.*
encoder.layer.{i}.output.dense.*                         -> layers.{i}.ffn.output.*
encoder.layer.{i}.lambda_{1,2}                           -> layers.{i}.lambda_{1,2}
pooler.layernorm.{weight,bias}                           -> pooler_norm.{scale,bias}
```

The key map is a list of `KeyMapping(source, target, transform)` rows (`key_mapping.py`)
built per part (`beit_embedding_key_map`, `beit_layer_key_map`, `beit_pooler_key_map`)
with prefixes as arguments, so the VindLU importer reuses it with `vision_encoder.`
prefixes and adds its temporal keys.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence

from t2v2t_jax.checkpoints import weight_rules
from t2v2t_jax.checkpoints.hf_files import read_hf_checkpoint
from t2v2t_jax.checkpoints.import_report import ImportReport
from t2v2t_jax.checkpoints.key_mapping import (KeyMapping, apply_transform, infer_square_grid,
                                               layer_norm, linear, transformed_shape)
from t2v2t_jax.checkpoints.params import ParamAssignError, assign_into, param_shapes
from t2v2t_jax.errors import Refusal, capped_list

# ----------------------------------------------------------------------------------------
# Key map (the VindLU importer reuses it with prefixes).
# ----------------------------------------------------------------------------------------

def beit_embedding_key_map(src: str = "embeddings.", dst: str = "embeddings.") -> list[KeyMapping]:
  """CLS token and patch embedding (no absolute position embedding in our model)."""
  return [
      KeyMapping(f"{src}cls_token", f"{dst}cls_token"),
      KeyMapping(f"{src}patch_embeddings.projection.weight", f"{dst}patch_embed.kernel", "conv"),
      KeyMapping(f"{src}patch_embeddings.projection.bias", f"{dst}patch_embed.bias"),
  ]


def beit_layer_key_map(src: str, dst: str, *, relative_position_table: bool = True
                       ) -> list[KeyMapping]:
  """One BEiT layer, e.g. `src='encoder.layer.3.'`, `dst='layers.3.'` (temporal block excluded).

  `relative_position_table=False` leaves the per-layer table out (shared-table checkpoints
  map `encoder.relative_position_bias...` to every layer instead).
  """
  m = []
  m += linear(f"{src}attention.attention.query", f"{dst}attention.query")
  m += linear(f"{src}attention.attention.key", f"{dst}attention.key", bias=False)
  m += linear(f"{src}attention.attention.value", f"{dst}attention.value")
  if relative_position_table:
    m.append(KeyMapping(
        f"{src}attention.attention.relative_position_bias.relative_position_bias_table",
        f"{dst}relative_position_bias.table", "rel_pos_table"))
  m += linear(f"{src}attention.output.dense", f"{dst}attention_output")
  m += layer_norm(f"{src}layernorm_before", f"{dst}layernorm_before")
  m += layer_norm(f"{src}layernorm_after", f"{dst}layernorm_after")
  m += linear(f"{src}intermediate.dense", f"{dst}ffn.intermediate")
  m += linear(f"{src}output.dense", f"{dst}ffn.output")
  m += [KeyMapping(f"{src}lambda_1", f"{dst}lambda_1"), KeyMapping(f"{src}lambda_2", f"{dst}lambda_2")]
  return m


def beit_pooler_key_map(src: str = "pooler.layernorm", dst: str = "pooler_norm") -> list[KeyMapping]:
  return layer_norm(src, dst)


SHARED_TABLE_KEY = "encoder.relative_position_bias.relative_position_bias_table"


def beit_key_map(depth: int, *, src_prefix: str = "", dst_prefix: str = "",
                 shared_relative_position_bias: bool = False) -> list[KeyMapping]:
  """The whole image BEiT (embeddings, `depth` layers, pooler) -> our `VideoEncoder`."""
  m = beit_embedding_key_map(f"{src_prefix}embeddings.", f"{dst_prefix}embeddings.")
  for i in range(depth):
    m += beit_layer_key_map(f"{src_prefix}encoder.layer.{i}.", f"{dst_prefix}layers.{i}.",
                            relative_position_table=not shared_relative_position_bias)
    if shared_relative_position_bias:
      m.append(KeyMapping(f"{src_prefix}{SHARED_TABLE_KEY}",
                          f"{dst_prefix}layers.{i}.relative_position_bias.table", "rel_pos_table"))
  m += beit_pooler_key_map(f"{src_prefix}pooler.layernorm", f"{dst_prefix}pooler_norm")
  return m


def is_temporal_param(path: str) -> bool:
  """Our VideoEncoder params that an image checkpoint cannot provide."""
  return ".temporal." in f".{path}" or path.endswith("temporal_pos_embed")


# Keys deliberately not imported, with the reason. Matched against the key after the
# `beit.` prefix is removed (`within`) or against the full key (`top`: heads outside the
# BEiT backbone).
DROPPED_KEY_PATTERNS_WITHIN = {
    r"(^|\.)relative_position_index$": "int buffer, rebuilt from the input grid",
    r"^embeddings\.mask_token$": "masked image modelling only",
}
DROPPED_KEY_PATTERNS_TOP = {
    r"^classifier\.": "BeitForImageClassification head",
    r"^lm_head\.": "BeitForMaskedImageModeling head",
    r"^(fpn[1-4]|decode_head|auxiliary_head)\.": "BeitForSemanticSegmentation heads",
}


# ----------------------------------------------------------------------------------------
# Key names of transformers >= 5.
# ----------------------------------------------------------------------------------------

_V5_RENAMES = (  # transformers >= 5 in-memory names -> legacy (on-disk) names
    (r"^layers\.(\d+)\.relative_position_bias\.",
     r"encoder.layer.\1.attention.attention.relative_position_bias."),
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.", r"encoder.layer.\1."),
    (r"^shared_position_bias\.", "encoder.relative_position_bias."),
)


def legacy_key(key: str, prefix: str = "") -> str:
  """Map a transformers >= 5 in-memory BEiT key (below `prefix`) to the on-disk name."""
  if not key.startswith(prefix):
    return key
  rest = key[len(prefix):]
  for pattern, repl in _V5_RENAMES:
    new, n = re.subn(pattern, repl, rest)
    if n:
      return prefix + new
  return key


# ----------------------------------------------------------------------------------------
# Config and import.
# ----------------------------------------------------------------------------------------

class CheckpointMismatchError(Refusal):
  """Unexpected source keys, missing source keys, bad weights, a malformed config.json, or
  an incompatible architecture; the message names the file."""


# Bounds on config.json sizes: far above any published BEiT, far below what would make
# an abstract model or a relative position table expensive.
_MAX_SIZE = 1 << 16


def _square(c: Mapping, name: str, file: str) -> int:
  value = c.get(name)
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise CheckpointMismatchError(f"{file}: field {name!r} is {str(value)[:80]}: only "
                                    "square sizes are supported")
    c = {name: value[0]}
  return weight_rules.field(c, name, file, int, minimum=1, maximum=_MAX_SIZE,
                            error=CheckpointMismatchError)


def vision_config_from_hf(hf_config: Mapping, file: str = "config.json") -> dict:
  """Our `model.vision` architecture fields from a HF BEiT `config.json` dict.

  Returns width, depth, num_heads, mlp_dim, patch_size, image_size (the checkpoint's
  training resolution), layer_norm_eps, layer_scale_init. Training choices
  (drop_path_rate, dropout_rate, num_frames) are left to the recipe. Raises
  CheckpointMismatchError (a ValueError) naming `file` and the field for BEiT variants
  this encoder cannot represent and for values of the wrong type or range.
  """
  c = hf_config
  if not isinstance(c, Mapping):
    raise CheckpointMismatchError(f"{file}: expected a JSON object, got {type(c).__name__}")
  problems = []
  if c.get("model_type", "beit") not in ("beit", "data2vec-vision"):
    problems.append(f"model_type={str(c.get('model_type'))[:80]!r} is not a BEiT")
  if c.get("hidden_act", "gelu") != "gelu":
    problems.append(f"hidden_act={str(c.get('hidden_act'))[:80]!r} (our FFN uses exact GELU)")
  if c.get("use_absolute_position_embeddings", False):
    problems.append("use_absolute_position_embeddings=True (our encoder has none)")
  if not (c.get("use_relative_position_bias", False)
          or c.get("use_shared_relative_position_bias", False)):
    problems.append("no relative position bias (use_relative_position_bias and "
                    "use_shared_relative_position_bias are both false)")
  if not c.get("use_mean_pooling", True):
    problems.append("use_mean_pooling=False (our pooler is LayerNorm of the patch-token mean)")
  scale = weight_rules.field(c, "layer_scale_init_value", file, float, default=0.1,
                             error=CheckpointMismatchError)
  if scale <= 0:
    problems.append("layer_scale_init_value <= 0 (no layer scale; ours always has lambdas)")
  if c.get("num_channels", 3) != 3:
    problems.append(f"num_channels={str(c.get('num_channels'))[:40]} (RGB expected)")
  if problems:
    raise CheckpointMismatchError(f"{file}: unsupported BEiT config: " + "; ".join(problems))

  def whole(name):
    return weight_rules.field(c, name, file, int, minimum=1, maximum=_MAX_SIZE,
                              error=CheckpointMismatchError)

  return dict(
      width=whole("hidden_size"),
      depth=whole("num_hidden_layers"),
      num_heads=whole("num_attention_heads"),
      mlp_dim=whole("intermediate_size"),
      patch_size=_square(c, "patch_size", file),
      image_size=_square(c, "image_size", file),
      layer_norm_eps=weight_rules.field(c, "layer_norm_eps", file, float, default=1e-12,
                                        minimum=0, error=CheckpointMismatchError),
      layer_scale_init=scale,
  )


def _dropped_reason(key: str, prefix: str) -> str | None:
  for pattern, reason in DROPPED_KEY_PATTERNS_TOP.items():
    if re.search(pattern, key):
      return reason
  if key.startswith(prefix):
    for pattern, reason in DROPPED_KEY_PATTERNS_WITHIN.items():
      if re.search(pattern, key[len(prefix):]):
        return reason
  return None


def load_beit_into(encoder, folder_or_name, *, prefix: str | None = None,
                   src_grid: int | Sequence[int] | None = None) -> ImportReport:
  """Load a Hugging Face BEiT checkpoint into `encoder` (a `VideoEncoder`), in place.

  Args:
    encoder: the VideoEncoder to fill.
    folder_or_name: folder, weights file or hub name (see `read_hf_checkpoint`), or what
      `read_hf_checkpoint` returned for one.
    prefix: the source keys' backbone prefix; None detects `'beit.'` (task models) or `''`
      (`BeitModel`).
    src_grid: patch grid the relative position tables were trained at; default from
      config.json (image_size / patch_size), else inferred from the table size.

  Returns:
    An `ImportReport`. Raises `CheckpointMismatchError` naming every unexpected source
    key, every missing source key, or an architecture mismatch; parameter shape problems
    raise `params.ParamAssignError`. Nothing is written unless all checks pass.
  """
  updates, names, report = beit_values(encoder, folder_or_name, prefix=prefix,
                                       src_grid=src_grid)
  assign_into(encoder, updates, source=report.source, source_names=names)
  return report


def beit_values(encoder, folder_or_name, *, prefix: str | None = None,
                src_grid: int | Sequence[int] | None = None
                ) -> tuple[dict, dict[str, str], ImportReport]:
  """Everything `load_beit_into` checks, without writing: `({our path below the encoder:
  array}, {our path: source key}, report)`. `encoder` may be abstract (`nnx.eval_shape`:
  only its attributes and parameter shapes are read). Raises as `load_beit_into` does."""
  config, tensors, source = read_hf_checkpoint(folder_or_name)
  files = dict(getattr(tensors, "files", {}))  # key -> the file (shard) it came from
  tensors = dict(tensors)  # renamed below; the caller's dict stays as it was
  report = ImportReport(kind="BEiT", source=source)

  if prefix is None:
    prefix = "beit." if any(k.startswith("beit.") for k in tensors) else ""
  report.prefix = prefix
  # Normalise transformers>=5 in-memory names; remember the original names for messages.
  original = {}
  for k in list(tensors):
    new = legacy_key(k, prefix)
    if new != k:
      if new in tensors:
        raise CheckpointMismatchError(f"source has both {k!r} and {new!r}")
      tensors[new] = tensors.pop(k)
      original[new] = k
      if k in files:
        files[new] = files[k]

  shared = any(k == prefix + SHARED_TABLE_KEY for k in tensors)
  if config is not None:
    config_file = os.path.join(os.path.dirname(source), "config.json")
    src_cfg = vision_config_from_hf(config, config_file)
    ours = dict(width=encoder.width, depth=encoder.depth, num_heads=encoder.num_heads,
                mlp_dim=encoder.mlp_dim, patch_size=encoder.patch_size)
    bad = [f"{k}: checkpoint {src_cfg[k]} vs model {v}" for k, v in ours.items() if src_cfg[k] != v]
    if bad:
      raise CheckpointMismatchError(f"{source}: architecture differs: " + "; ".join(bad))
    if not math.isclose(src_cfg["layer_norm_eps"], encoder.layer_norm_eps, rel_tol=1e-6):
      report.warnings.append(f"layer_norm_eps: checkpoint {src_cfg['layer_norm_eps']} vs model "
                             f"{encoder.layer_norm_eps} (model value kept)")
    shared = shared or bool(config.get("use_shared_relative_position_bias", False))
    if src_grid is None:
      src_grid = src_cfg["image_size"] // src_cfg["patch_size"]
  if src_grid is not None and not isinstance(src_grid, int):
    src_grid = tuple(int(g) for g in src_grid)

  mapping = beit_key_map(encoder.depth, src_prefix=prefix, shared_relative_position_bias=shared)
  mapped_sources = {m.source for m in mapping}
  name = lambda k: original.get(k, k)  # noqa: E731
  where = lambda k: weight_rules.named(files.get(k, source), name(k))  # noqa: E731

  unexpected, dropped = [], {}
  for k in sorted(tensors):
    if k in mapped_sources:
      continue
    reason = _dropped_reason(k, prefix)
    if reason is not None:
      dropped[name(k)] = reason
    else:
      unexpected.append(name(k)[:200])
  missing = [f"{m.source} (for {m.target})" for m in mapping if m.source not in tensors]
  problems = []
  if unexpected:
    problems.append(f"{len(unexpected):,} unexpected source keys (neither mapped nor "
                    f"dropped): " + capped_list(unexpected))
  if missing:
    problems.append(f"{len(missing):,} source keys missing: " + capped_list(missing))
  if problems:
    raise CheckpointMismatchError(f"{source} (prefix {prefix!r}): " + "; ".join(problems))

  shapes = param_shapes(encoder)
  unmapped = [p for p in shapes if not is_temporal_param(p)
              and p not in {m.target for m in mapping}]
  if unmapped:  # a gap in the key map itself
    raise CheckpointMismatchError("parameters with no BEiT source: " + capped_list(unmapped))

  # Weights and shapes, all checked before anything is transformed (a crafted table must
  # not be resized before its size is compared).
  checks = weight_rules.WeightChecks()
  bad_weights, wrong = [], []
  for m in mapping:
    src = tensors[m.source]
    problem = checks.problem(src)
    if problem:
      bad_weights.append(f"{where(m.source)} {problem}")
      continue
    if m.target not in shapes:
      raise CheckpointMismatchError(f"{name(m.source)!r} maps to {m.target!r}, which the model lacks")
    want = tuple(shapes[m.target])
    try:
      got = transformed_shape(m.transform, src.shape, target_shape=want, src_grid=src_grid,
                              dst_grid=encoder.grid)
    except ValueError as e:
      got = f"none ({e})"
    if got != want:  # as `params.assign` words it, but before anything is written
      wrong.append(f"shape mismatch for {m.target!r} (from source key {where(m.source)}): the "
                   f"model expects {want}, got {got}")
  if bad_weights:
    raise CheckpointMismatchError(f"{source}: {len(dict.fromkeys(bad_weights)):,} source "
                                  "weight(s) are not finite floating point: "
                                  + capped_list(dict.fromkeys(bad_weights)))
  if wrong:
    raise ParamAssignError(f"cannot assign the parameters of {source}:\n  "
                           + capped_list(wrong, sep="\n  "))

  updates, names = {}, {}
  for m in mapping:
    src = checks.as_float32(tensors[m.source])
    value = apply_transform(m.transform, src, target_shape=shapes[m.target], src_grid=src_grid,
                            dst_grid=encoder.grid)
    if m.transform == "rel_pos_table" and value.shape != src.shape:
      grid_from = src_grid if src_grid is not None else infer_square_grid(src.shape[0])
      report.resized.append(f"{name(m.source)}: {tuple(src.shape)} -> {tuple(value.shape)} "
                            f"(patch grid {grid_from} -> {encoder.grid[0]}, bilinear)")
    updates[m.target] = value
    names[m.target] = name(m.source)
    report.loaded.append((name(m.source), m.target))
  report.dropped = dropped
  report.new = sorted(p for p in shapes if p not in updates)
  return updates, names, report
