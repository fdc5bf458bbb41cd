"""A model config from a VindLU state dict's shapes, and a one-line description of one.

`python -m t2v2t_jax.convert vindlu IN.pth OUT_DIR` without `--config` builds the model
that `infer_model_config` reads off the checkpoint; the importer names both architectures
(`describe_config`) when a checkpoint does not fit the model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from t2v2t_jax.checkpoints.key_mapping import infer_square_grid
from t2v2t_jax.checkpoints.vindlu_keys import (BERT_PREFIX, REL_TABLE, TEMPORAL_EMBED,
                                               VISION_LAYER, VindluCheckpointError,
                                               detect_naming, layer_count)
from t2v2t_jax.models import config as config_lib


def describe_config(c) -> str:
  v, t = c.vision, c.text
  return (f"vision {v.width}w x {v.depth} layers, mlp {v.mlp_dim}, patch {v.patch_size}, image "
          f"{v.image_size}, {v.num_frames} frames; text {t.width}w x {t.num_layers} layers "
          f"(fusion from {t.fusion_layer}), mlp {t.mlp_dim}, vocab {t.vocab_size}; embed {c.embed_dim}")


def _variant(table: Mapping[str, tuple], values: tuple) -> str | None:
  return next((name for name, v in table.items() if tuple(v) == tuple(values)), None)


def infer_model_config(state: Mapping[str, np.ndarray], fusion_mode: str = "t2v2t"):
  """A `model` ConfigDict whose architecture fits a VindLU state dict.

  Widths, depths, MLP sizes, patch and image size, frames, vocabulary, positions,
  fusion_layer, embedding size and vision heads are read from tensor shapes. The number of
  text heads is not stored in any shape: it is taken from the known variant with that
  width (base: 12), else width // 64. Everything else keeps the SPEC defaults.
  """
  naming = detect_naming(state)
  bert = BERT_PREFIX[naming]

  def shape(key):
    if key not in state:
      raise VindluCheckpointError(f"cannot infer the architecture: {key!r} is missing")
    return tuple(np.shape(state[key]))

  keys = list(state)
  v_depth = layer_count(keys, r"^vision_encoder\.encoder\.layer\.(\d+)\.")
  t_layers = layer_count(keys, rf"^{re.escape(bert)}encoder\.layer\.(\d+)\.")
  cross = sorted({int(m.group(1)) for k in keys
                  if (m := re.match(rf"^{re.escape(bert)}encoder\.layer\.(\d+)\.crossattention\.", k))})
  if not v_depth or not t_layers or not cross:
    raise VindluCheckpointError("cannot infer the architecture: no vision layers, text layers or "
                                "cross-attention layers found")
  v_width = shape("vision_encoder.embeddings.cls_token")[-1]
  patch = shape("vision_encoder.embeddings.patch_embeddings.projection.weight")[-1]
  rows, v_heads = shape(f"{VISION_LAYER}0.{REL_TABLE}")
  grid = infer_square_grid(rows)
  v_mlp = shape(f"{VISION_LAYER}0.intermediate.dense.weight")[0]
  frames = shape(TEMPORAL_EMBED)[1]
  vocab, t_width = shape(f"{bert}embeddings.word_embeddings.weight")
  t_mlp = shape(f"{bert}encoder.layer.0.intermediate.dense.weight")[0]

  c = config_lib.model_config("B/16", "base", fusion_mode)
  c.vision.update(dict(width=v_width, depth=v_depth, num_heads=v_heads, mlp_dim=v_mlp,
                       patch_size=patch, image_size=grid * patch, num_frames=frames))
  name = _variant(config_lib.VISION_VARIANTS, (v_width, v_depth, v_heads, v_mlp))
  c.vision.variant = f"{name}/{patch}" if name else "custom"
  t_heads = next((v[2] for v in config_lib.TEXT_VARIANTS.values() if v[0] == t_width), None)
  t_heads = t_heads or max(1, t_width // 64)
  c.text.update(dict(width=t_width, num_layers=t_layers, num_heads=t_heads, mlp_dim=t_mlp,
                     fusion_layer=cross[0], vocab_size=vocab,
                     max_position=shape(f"{bert}embeddings.position_embeddings.weight")[0],
                     type_vocab_size=shape(f"{bert}embeddings.token_type_embeddings.weight")[0]))
  name = _variant(config_lib.TEXT_VARIANTS, (t_width, t_layers, t_heads, t_mlp, cross[0]))
  c.text.variant = name or "custom"
  c.embed_dim = shape("vision_proj.weight")[0]
  return c
