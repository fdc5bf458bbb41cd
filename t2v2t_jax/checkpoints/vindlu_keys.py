"""The VindLU key map: every key of a VindLU state dict and the parameter of ours it becomes.

Built from the tables of the Hugging Face importers (`key_mapping.KeyMapping` rows):
  vision_encoder.{embeddings, encoder.layer.{i}, pooler}.*   `hf_beit.beit_key_map` with
      the `vision_encoder.` prefix on both sides (Linear [out, in] -> [in, out], conv
      [O, I, kh, kw] -> [kh, kw, I, O], relative position tables resized bilinearly to the
      model's patch grid when the image size differs)
  vision_encoder.embeddings.temporal_position_embeddings -> embeddings.temporal_pos_embed
      [1, T, 1, D]; a checkpoint with fewer frames than the model is zero-padded (SPEC 1:
      a T=4 checkpoint into a T=12 model keeps rows 0..3, the rest 0), more frames: the
      first T rows.
  vision_encoder.encoder.layer.{i}.temp_model.temporal_attn.in_proj_{weight,bias}
      -> layers.{i}.temporal.attention.{query,key,value}.*  (packed in q, k, v order)
  ...temp_model.temporal_attn.out_proj.* -> temporal.out_proj.*, temp_model.norm.* ->
      temporal.norm.*, temp_model.scale -> temporal.scale
  vision_layernorm.* -> vision_layernorm.*
  text_encoder[.bert].{embeddings, encoder.layer.{i}}.* and text_encoder.cls.predictions.*
      `hf_bert.bert_rules`: layers < fusion_layer -> text_encoder.layers.{i}, the others ->
      fusion_encoder.layers.{i - fusion_layer} (with their cross-attention)
  vision_proj.*, text_proj.*, itm_head.* (Linear), temp (scalar)

Two namings exist (`detect_naming`):
  pretrain   `text_encoder.bert.*` + `text_encoder.cls.predictions.*` (BertForMaskedLM)
  finetune   `text_encoder.*` (BertModel, no MLM head)
Deliberately dropped source keys, with the reason, are `DROPPED_KEY_PATTERNS`; our
parameters without a VindLU key are the T2V blocks (`is_t2v`) and, for a checkpoint
without an MLM head, `text_encoder.mlm_head.*`. Import (`vindlu.py`) and export
(`vindlu_export.py`) both walk this map.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable

from t2v2t_jax.checkpoints import hf_beit, hf_bert, weight_rules
from t2v2t_jax.checkpoints.key_mapping import KeyMapping, layer_norm, linear
from t2v2t_jax.errors import Refusal, capped_list

NAMINGS = ("pretrain", "finetune")
BERT_PREFIX = {"pretrain": "text_encoder.bert.", "finetune": "text_encoder."}
MLM_PREFIX = "text_encoder."  # BertForMaskedLM keeps `cls.predictions` beside `bert`

VISION_LAYER = "vision_encoder.encoder.layer."
REL_TABLE = "attention.attention.relative_position_bias.relative_position_bias_table"
REL_INDEX = "attention.attention.relative_position_bias.relative_position_index"
TEMPORAL_EMBED = "vision_encoder.embeddings.temporal_position_embeddings"

DROPPED_KEY_PATTERNS = {
    r"^vision_encoder\.encoder\.layer\.\d+\.attention\.attention\.relative_position_bias"
    r"\.relative_position_index$":
        "int buffer: rebuilt from the patch grid (checked equal to the standard index)",
    r"^text_encoder\.(bert\.)?embeddings\.position_ids$":
        "int buffer: arange(max_position) (checked)",
    r"^vision_encoder\.encoder\.layer\.\d+\.temp_model\.linear\.(weight|bias)$":
        "VindLU's TemporalAttention creates this Linear but never uses it",
}

# Our parameters that VindLU does not have (see the module docstring).
T2V_PREFIXES = ("fusion_encoder.t2v.", "fusion_encoder.t2v_blocks.")
MLM_HEAD_PREFIX = "text_encoder.mlm_head."


class VindluCheckpointError(Refusal):
  """A VindLU checkpoint that does not fit the model: every problem is named."""


# ----------------------------------------------------------------------------------------
# Key map.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Layout:
  """What the key map depends on."""
  vision_depth: int
  num_text_layers: int      # = fusion_layer
  num_fusion_layers: int
  naming: str = "finetune"
  mlm: bool = False         # whether `cls.predictions.*` is part of the map

  def __post_init__(self):
    if self.naming not in NAMINGS:
      raise ValueError(f"naming={self.naming!r} is not one of {NAMINGS}")


def temporal_key_map(i: int) -> list[KeyMapping]:
  """Layer i's temporal block: packed `nn.MultiheadAttention` -> our q/k/v, out_proj, norm, scale."""
  src, dst = f"{VISION_LAYER}{i}.temp_model.", f"vision_encoder.layers.{i}.temporal."
  m = []
  for which, name in zip("qkv", ("query", "key", "value")):
    m.append(KeyMapping(f"{src}temporal_attn.in_proj_weight", f"{dst}attention.{name}.kernel",
                        f"in_proj_{which}"))
    m.append(KeyMapping(f"{src}temporal_attn.in_proj_bias", f"{dst}attention.{name}.bias",
                        f"in_proj_{which}"))
  m += [
      *linear(f"{src}temporal_attn.out_proj", f"{dst}out_proj"),
      *layer_norm(f"{src}norm", f"{dst}norm"),
      KeyMapping(f"{src}scale", f"{dst}scale"),
  ]
  return m


def vision_key_map(depth: int) -> list[KeyMapping]:
  m = hf_beit.beit_embedding_key_map("vision_encoder.embeddings.", "vision_encoder.embeddings.")
  m.append(KeyMapping(TEMPORAL_EMBED, "vision_encoder.embeddings.temporal_pos_embed",
                      "temporal_zero_pad"))
  for i in range(depth):
    m += hf_beit.beit_layer_key_map(f"{VISION_LAYER}{i}.", f"vision_encoder.layers.{i}.")
    m += temporal_key_map(i)
  m += hf_beit.beit_pooler_key_map("vision_encoder.pooler.layernorm", "vision_encoder.pooler_norm")
  m += layer_norm("vision_layernorm", "vision_layernorm")
  return m


def _text_source(source: str, naming: str) -> str:
  return (MLM_PREFIX if source.startswith("cls.") else BERT_PREFIX[naming]) + source


def text_key_map(layout: Layout) -> list[KeyMapping]:
  rules = hf_bert.bert_rules(layout.num_text_layers, layout.num_fusion_layers,
                             cross_attention=True, mlm=layout.mlm)
  return [dataclasses.replace(r, source=_text_source(r.source, layout.naming)) for r in rules]


def head_key_map() -> list[KeyMapping]:
  m = []
  for name in ("vision_proj", "text_proj", "itm_head"):
    m += linear(name, name)
  m.append(KeyMapping("temp", "temp"))
  return m


def vindlu_key_map(layout: Layout) -> list[KeyMapping]:
  """Every VindLU source key -> our parameter path, with the layout transform."""
  return vision_key_map(layout.vision_depth) + text_key_map(layout) + head_key_map()


def tied_keys(naming: str) -> dict[str, str]:
  """`{duplicate source key: the source key it must equal}` (hf_bert.TIED_KEYS, prefixed)."""
  return {_text_source(k, naming): _text_source(v, naming) for k, v in hf_bert.TIED_KEYS.items()}


_DROPPED = [(re.compile(pattern), reason) for pattern, reason in DROPPED_KEY_PATTERNS.items()]


def dropped_reason(key: str) -> str | None:
  for pattern, reason in _DROPPED:  # compiled once: a file may hold 200,000 keys
    if pattern.search(key):
      return reason
  return None


def layer_count(paths: Iterable[str], pattern: str, *, source: str = "") -> int:
  """n when the layer indices `pattern` captures are 0..n-1. Indices are bounded as they
  are read (`weight_rules.layer_indices`): a key naming layer 30,000,000 must not make a
  range that long."""
  idx = weight_rules.layer_indices(paths, pattern, source=source, error=VindluCheckpointError)
  n = weight_rules.contiguous_count(idx)
  if n is None:
    raise VindluCheckpointError(
        f"{source + ': ' if source else ''}layer indices "
        f"{capped_list(sorted(idx))} of {pattern!r} are not 0..n-1")
  return n


def layout_from_params(paths: Iterable[str], naming: str, mlm: bool) -> Layout:
  """The layout of one of our models, from its parameter paths."""
  paths = list(paths)
  return Layout(vision_depth=layer_count(paths, r"^vision_encoder\.layers\.(\d+)\."),
                num_text_layers=layer_count(paths, r"^text_encoder\.layers\.(\d+)\."),
                num_fusion_layers=layer_count(paths, r"^fusion_encoder\.layers\.(\d+)\."),
                naming=naming, mlm=mlm)


def detect_naming(keys: Iterable[str], source: str = "") -> str:
  """'pretrain' (`text_encoder.bert.*`) or 'finetune' (`text_encoder.*`); mixed is an error
  (naming `source`, the file, when given)."""
  where = f"{source}: " if source else ""
  keys = list(keys)
  pre = [k for k in keys if k.startswith("text_encoder.bert.")]
  fine = [k for k in keys if k.startswith("text_encoder.")
          and not k.startswith(("text_encoder.bert.", "text_encoder.cls."))]
  if pre and fine:
    raise VindluCheckpointError(
        f"{where}the checkpoint mixes the pretrain naming (e.g. "
        + ", ".join(k[:120] for k in pre[:2]) + ") and the fine-tune naming (e.g. "
        + ", ".join(k[:120] for k in fine[:2]) + ")")
  if pre:
    return "pretrain"
  if fine:
    return "finetune"
  raise VindluCheckpointError(f"{where}no text_encoder.* keys: this does not look like a "
                              "VindLU state dict")


def is_t2v(path: str) -> bool:
  """Our T2V bypass parameters, which VindLU has no counterpart for."""
  return path.startswith(T2V_PREFIXES)
