"""A model config from a VindLU state dict's shapes, and a one-line description of one.

`python -m t2v2t_jax.convert vindlu IN.pth OUT_DIR` without `--config` builds the model
that `infer_model_config` reads off the checkpoint; the importer names both architectures
(`describe_config`) when a checkpoint does not fit the model.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping

import numpy as np

from t2v2t_jax.checkpoints import weight_rules
from t2v2t_jax.checkpoints.key_mapping import infer_square_grid
from t2v2t_jax.checkpoints.vindlu_keys import (BERT_PREFIX, REL_TABLE, TEMPORAL_EMBED,
                                               VISION_LAYER, VindluCheckpointError,
                                               detect_naming, layer_count)
from t2v2t_jax.errors import capped_list
from t2v2t_jax.models import config as config_lib


def describe_config(c) -> str:
  v, t = c.vision, c.text
  return (f"vision {v.width}w x {v.depth} layers, mlp {v.mlp_dim}, patch {v.patch_size}, image "
          f"{v.image_size}, {v.num_frames} frames; text {t.width}w x {t.num_layers} layers "
          f"(fusion from {t.fusion_layer}), mlp {t.mlp_dim}, vocab {t.vocab_size}; embed {c.embed_dim}")


def _variant(table: Mapping[str, tuple], values: tuple) -> str | None:
  return next((name for name, v in table.items() if tuple(v) == tuple(values)), None)


_VISION_LAYER_RE = r"^vision_encoder\.encoder\.layer\.(\d+)\."


def infer_model_config(state: Mapping[str, np.ndarray], fusion_mode: str = "t2v2t", *,
                       check: bool = True, source: str | None = None):
  """A `model` ConfigDict whose architecture fits a VindLU state dict.

  Widths, depths, MLP sizes, patch and image size, frames, vocabulary, positions,
  fusion_layer, embedding size and vision heads are read from tensor shapes. The number of
  text heads is not stored in any shape: it is taken from the known variant with that
  width (base: 12), else width // 64. Everything else keeps the SPEC defaults.

  Why `check` (issue 25): `convert` builds the model this returns, so sizes that only the
  file's shapes state must be backed by the file's own tensors first. Empty tensors are
  refused before anything is read off them (4.4 KB of zero-element tensors stated a
  model that took 45 s and 3.2 GB to build), and with `check` every layer must have the
  key set and shapes of the first layer of its kind, and that first layer (with
  everything outside the layers) must pass `vindlu.check_vindlu_state` against a
  one-layer model of the same widths. A checkpoint that passes holds every weight of the
  model it describes, so building that model costs about what the file holds. Raises
  VindluCheckpointError naming `source` and the key.
  """
  source = source or getattr(state, "source", "<state dict>")  # vindlu.NamedState
  naming = detect_naming(state, source)
  bert = BERT_PREFIX[naming]
  empty = [k for k, v in state.items()
           if np.size(v) == 0 and weight_rules.is_floating(np.asarray(v).dtype)]
  if empty:
    raise VindluCheckpointError(
        f"{source}: {len(empty):,} tensor(s) hold no elements, so their shapes state nothing "
        f"(no weight of a model is empty): {capped_list(repr(k[:120]) for k in empty)}")

  def shape(key):
    if key not in state:
      raise VindluCheckpointError(f"{source}: cannot infer the architecture: {key!r} is missing")
    return tuple(np.shape(state[key]))

  keys = list(state)
  v_depth = layer_count(keys, _VISION_LAYER_RE, source=source)
  t_layers = layer_count(keys, rf"^{re.escape(bert)}encoder\.layer\.(\d+)\.", source=source)
  cross = sorted(weight_rules.layer_indices(
      keys, rf"^{re.escape(bert)}encoder\.layer\.(\d+)\.crossattention\.", source=source,
      error=VindluCheckpointError))
  if not v_depth or not t_layers or not cross:
    raise VindluCheckpointError(f"{source}: cannot infer the architecture: no vision layers, "
                                "text layers or cross-attention layers found")
  v_width = shape("vision_encoder.embeddings.cls_token")[-1]
  patch = shape("vision_encoder.embeddings.patch_embeddings.projection.weight")[-1]
  table = shape(f"{VISION_LAYER}0.{REL_TABLE}")
  if len(table) != 2:
    raise VindluCheckpointError(f"{source}: {VISION_LAYER}0.{REL_TABLE} has shape {table}, "
                                "expected [rows, heads]")
  rows, v_heads = table
  try:
    grid = infer_square_grid(rows)
  except ValueError as e:
    raise VindluCheckpointError(f"{source}: {VISION_LAYER}0.{REL_TABLE}: {e}") from None
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
  if check:
    _check_layers_alike(state, naming, cross[0], source)
    _check_first_layers(state, naming, c, cross[0], source)
  return c


def _layer_groups(state, naming: str, fusion_layer: int) -> dict[tuple[str, int], dict]:
  """`{(kind, index): {key suffix: shape}}` for the vision, text and fusion layers."""
  bert = re.escape(BERT_PREFIX[naming])
  patterns = (("vision", re.compile(_VISION_LAYER_RE + r"(.*)$")),
              ("text", re.compile(rf"^{bert}encoder\.layer\.(\d+)\.(.*)$")))
  groups: dict[tuple[str, int], dict] = {}
  for key, value in state.items():
    for kind, pattern in patterns:
      m = pattern.match(key)
      if m:
        i = int(m.group(1))  # bounded by layer_count already
        if kind == "text" and i >= fusion_layer:
          kind = "fusion"
        groups.setdefault((kind, i), {})[m.group(2)] = tuple(np.shape(value))
        break
  return groups


def _check_layers_alike(state, naming: str, fusion_layer: int, source: str) -> None:
  """Every layer has the keys and shapes of the first layer of its kind (our layers are
  alike), so the first layers stand for all: no layer can be stated by a stray key."""
  groups = _layer_groups(state, naming, fusion_layer)
  first = {"vision": ("vision", 0), "text": ("text", 0), "fusion": ("fusion", fusion_layer)}
  problems = []
  for (kind, i), suffixes in sorted(groups.items()):
    ref = groups.get(first[kind], {})
    if suffixes != ref:
      differ = sorted(set(suffixes) ^ set(ref)) + sorted(
          k for k in set(suffixes) & set(ref) if suffixes[k] != ref[k])
      problems.append(f"{kind} layer {i} differs from {kind} layer {first[kind][1]} in "
                      f"{capped_list(differ, limit=5)}")
  if problems:
    raise VindluCheckpointError(
        f"{source}: the layers are not alike, as this model's are: "
        f"{weight_rules.headline(problems)}" + weight_rules.problems_text(problems))


def _check_first_layers(state, naming: str, c, fusion_layer: int, source: str) -> None:
  """`check_vindlu_state` of everything but the repeated layers (the first of each kind,
  renumbered), against the same widths with one layer of each kind: abstract, and cheap
  however deep the checkpoint claims to be."""
  from t2v2t_jax.checkpoints import vindlu  # noqa: PLC0415 (vindlu imports this module)
  bert = BERT_PREFIX[naming]
  keep = {}
  for key, value in state.items():
    m = re.match(_VISION_LAYER_RE, key)
    if m:
      if int(m.group(1)) == 0:
        keep[key] = value
      continue
    m = re.match(rf"^{re.escape(bert)}encoder\.layer\.(\d+)\.", key)
    if m:
      i = int(m.group(1))
      if i == 0:
        keep[key] = value
      elif i == fusion_layer:
        keep[f"{bert}encoder.layer.1." + key[m.end():]] = value
      continue
    keep[key] = value
  shallow = copy.deepcopy(c)
  shallow.vision.depth = 1
  shallow.text.num_layers, shallow.text.fusion_layer = 2, 1
  try:
    vindlu.check_vindlu_state(keep, shallow, source=source)
  except VindluCheckpointError as e:
    raise VindluCheckpointError(f"{source}: does not hold the model its shapes describe "
                                f"(checked on its first layers): {e}") from None
