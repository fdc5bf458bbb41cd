"""Import VindLU PyTorch checkpoints into T2V2T, and export T2V2T parameters back.

Source: a VindLU `.pth` (`torch.save` of `{"model": state_dict, "config": EasyDict, ...}`,
SPEC 8), read with `safe_torch_load` (a restricted unpickler: nothing from the file is
executed). Both namings are accepted:
  pretrain   `text_encoder.bert.*` + `text_encoder.cls.predictions.*` (BertForMaskedLM)
  finetune   `text_encoder.*` (BertModel, no MLM head)

Key map (`vindlu_key_map`), built from the tables of the Hugging Face importers:
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

Deliberately dropped source keys (`DROPPED_KEY_PATTERNS`), listed in the report:
  *.relative_position_index   int buffer, rebuilt from the patch grid; checked to be the
                              standard BEiT index (anything else would compute differently)
  *.embeddings.position_ids   int buffer, `arange`; checked
  *.temp_model.linear.*       created by VindLU's TemporalAttention but never used in forward
Tied keys: `cls.predictions.decoder.weight` must equal the word embeddings and
`cls.predictions.decoder.bias` must equal `cls.predictions.bias` (our decoder is tied);
they are checked and not imported twice.

Any other source key that nothing maps, any key of a layer the model does not have (a
dropped buffer included), any mapped key that is missing, any weight that is not floating
point or holds NaN / inf, any shape that does not fit, and any parameter of ours that
should come from the checkpoint but does not, is an error naming it (SPEC 9: VindLU's silently dropped `bert.` keys evaluate a
random text encoder). All problems are collected and raised together.

Our parameters without a VindLU source are newly initialised (the model's own initial
values, seed `seed`) and listed:
  fusion_encoder.t2v.* / t2v_blocks.*  the T2V bypass blocks of 't2v2t'/'t2v2t_naive'
                                       (gates 0: the model then scores exactly like v2t)
  text_encoder.mlm_head.*              DECISION: when the checkpoint has no MLM head (a
                                       fine-tune checkpoint), our head's transform and bias
                                       start fresh; the decoder is the word embeddings.

Export (`export_vindlu`) inverts the map: our params -> a VindLU-named state dict in
either naming. Buffers are rebuilt (int64), `temp_model.linear.*` is written as zeros
(unused by VindLU), and the tied decoder tensors are copies of the word embeddings and the
MLM bias. The T2V blocks have no VindLU counterpart: they are left out when they are the
identity (every gate exactly 0), otherwise export refuses unless `drop_t2v=True`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
from collections.abc import Iterable, Mapping

import jax
import numpy as np

from t2v2t_jax.checkpoints import hf_beit, hf_bert
from t2v2t_jax.checkpoints.hf_beit import KeyMapping, apply_transform, infer_square_grid
from t2v2t_jax.models import vision_encoder as ve

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


class VindluCheckpointError(ValueError):
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
      KeyMapping(f"{src}temporal_attn.out_proj.weight", f"{dst}out_proj.kernel", "linear"),
      KeyMapping(f"{src}temporal_attn.out_proj.bias", f"{dst}out_proj.bias"),
      KeyMapping(f"{src}norm.weight", f"{dst}norm.scale"),
      KeyMapping(f"{src}norm.bias", f"{dst}norm.bias"),
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
  m += [KeyMapping("vision_layernorm.weight", "vision_layernorm.scale"),
        KeyMapping("vision_layernorm.bias", "vision_layernorm.bias")]
  return m


def _transform_name(fn) -> str:
  if fn is hf_bert.linear_kernel:
    return "linear"
  if fn is hf_bert.identity:
    return "copy"
  raise ValueError(f"hf_bert rule transform {fn!r} has no VindLU equivalent")


def _text_source(source: str, naming: str) -> str:
  return (MLM_PREFIX if source.startswith("cls.") else BERT_PREFIX[naming]) + source


def text_key_map(layout: Layout) -> list[KeyMapping]:
  rules = hf_bert.bert_rules(layout.num_text_layers, layout.num_fusion_layers,
                             cross_attention=True, mlm=layout.mlm)
  return [KeyMapping(_text_source(r.source, layout.naming), r.target, _transform_name(r.transform))
          for r in rules]


def head_key_map() -> list[KeyMapping]:
  m = []
  for name in ("vision_proj", "text_proj", "itm_head"):
    m += [KeyMapping(f"{name}.weight", f"{name}.kernel", "linear"),
          KeyMapping(f"{name}.bias", f"{name}.bias")]
  m.append(KeyMapping("temp", "temp"))
  return m


def vindlu_key_map(layout: Layout) -> list[KeyMapping]:
  """Every VindLU source key -> our parameter path, with the layout transform."""
  return vision_key_map(layout.vision_depth) + text_key_map(layout) + head_key_map()


def tied_keys(naming: str) -> dict[str, str]:
  """`{duplicate source key: the source key it must equal}` (hf_bert.TIED_KEYS, prefixed)."""
  return {_text_source(k, naming): _text_source(v, naming) for k, v in hf_bert.TIED_KEYS.items()}


def dropped_reason(key: str) -> str | None:
  for pattern, reason in DROPPED_KEY_PATTERNS.items():
    if re.search(pattern, key):
      return reason
  return None


def _layer_count(paths: Iterable[str], pattern: str) -> int:
  idx = {int(m.group(1)) for p in paths if (m := re.match(pattern, p))}
  if idx and idx != set(range(max(idx) + 1)):
    raise VindluCheckpointError(f"layer indices {sorted(idx)} of {pattern!r} are not 0..n-1")
  return len(idx)


def layout_from_params(paths: Iterable[str], naming: str, mlm: bool) -> Layout:
  """The layout of one of our models, from its parameter paths."""
  paths = list(paths)
  return Layout(vision_depth=_layer_count(paths, r"^vision_encoder\.layers\.(\d+)\."),
                num_text_layers=_layer_count(paths, r"^text_encoder\.layers\.(\d+)\."),
                num_fusion_layers=_layer_count(paths, r"^fusion_encoder\.layers\.(\d+)\."),
                naming=naming, mlm=mlm)


def detect_naming(keys: Iterable[str]) -> str:
  """'pretrain' (`text_encoder.bert.*`) or 'finetune' (`text_encoder.*`); mixed is an error."""
  keys = list(keys)
  pre = [k for k in keys if k.startswith("text_encoder.bert.")]
  fine = [k for k in keys if k.startswith("text_encoder.")
          and not k.startswith(("text_encoder.bert.", "text_encoder.cls."))]
  if pre and fine:
    raise VindluCheckpointError(
        "the checkpoint mixes the pretrain naming (e.g. " + ", ".join(pre[:2]) + ") and the "
        "fine-tune naming (e.g. " + ", ".join(fine[:2]) + ")")
  if pre:
    return "pretrain"
  if fine:
    return "finetune"
  raise VindluCheckpointError("no text_encoder.* keys: this does not look like a VindLU state dict")


# ----------------------------------------------------------------------------------------
# Reading a .pth.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class VindluCheckpoint:
  state: dict[str, np.ndarray]
  config: dict | None          # the pickled EasyDict, as plain dicts
  source: str
  upcast: list[str] = dataclasses.field(default_factory=list)  # fp16/bf16 keys read as fp32


def state_dict_to_numpy(state_dict: Mapping, source: str = "<state dict>"
                        ) -> tuple[dict[str, np.ndarray], list[str]]:
  """Torch tensors -> numpy (float16/bfloat16 upcast to float32); non-tensors are an error."""
  import torch

  out, upcast, bad = {}, [], []
  for key, value in state_dict.items():
    if not isinstance(key, str):
      bad.append(f"key {key!r} ({type(key).__name__}, not a string)")
      continue
    if not isinstance(value, torch.Tensor):
      bad.append(f"{key!r} ({type(value).__name__})")
      continue
    value = value.detach().cpu()
    if value.dtype in (torch.float16, torch.bfloat16):
      value = value.to(torch.float32)
      upcast.append(key)
    out[key] = value.numpy()
  if bad:
    raise VindluCheckpointError(f"{source}: state-dict entries that are not string-keyed "
                                "tensors: " + ", ".join(bad[:20])
                                + (f", and {len(bad) - 20} more" if len(bad) > 20 else ""))
  return out, upcast


def read_vindlu_checkpoint(path: str | os.PathLike) -> VindluCheckpoint:
  """Safely read a VindLU `.pth` (`{"model": state_dict, ...}` or a bare state dict)."""
  import torch

  from t2v2t_jax.checkpoints.safe_torch_load import safe_torch_load

  path = os.fspath(path)
  obj = safe_torch_load(path)
  config = None
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    state_dict = obj["model"]
    config = obj.get("config")
    if config is not None and not isinstance(config, dict):
      config = None
  elif isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
    state_dict = obj
  else:
    keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise VindluCheckpointError(f"{path}: expected {{'model': state_dict, ...}} or a state dict, "
                                f"got {keys}")
  state, upcast = state_dict_to_numpy(state_dict, path)
  return VindluCheckpoint(state=state, config=config, source=path, upcast=upcast)


# ----------------------------------------------------------------------------------------
# Reports.
# ----------------------------------------------------------------------------------------

def compact_names(names: Iterable[str]) -> list[str]:
  """Group names that differ only in layer indices: `a.{0-11}.b` (order of first appearance)."""
  groups: dict[str, list] = collections.OrderedDict()
  for name in names:
    nums = re.findall(r"(?<=\.)\d+(?=\.|$)", name)
    if not nums or "{" in name or "}" in name:
      groups.setdefault(name, [])
      continue
    pattern = re.sub(r"(?<=\.)\d+(?=\.|$)", "{}", name)
    groups.setdefault(pattern, []).append(tuple(int(n) for n in nums))

  def span(values):
    values = sorted(set(values))
    if len(values) == 1:
      return str(values[0])
    if values == list(range(values[0], values[-1] + 1)):
      return f"{{{values[0]}-{values[-1]}}}"
    return "{" + ",".join(map(str, values)) + "}"

  out = []
  for pattern, idx in groups.items():
    if not idx:
      out.append(pattern)
      continue
    slots = list(zip(*idx))
    if len(set(idx)) == int(np.prod([len(set(s)) for s in slots])):  # a full product: compact
      out.append(pattern.format(*(span(s) for s in slots)))
    else:
      out += [pattern.format(*i) for i in idx]
  return out


def format_table(title: str, rows: list[tuple[str, list[str] | int]]) -> str:
  """One row per category: label, count, names (layer indices compacted); an int is a bare count."""
  lines = [title, f"  {'':<20} {'count':>6}  names"]
  for label, names in rows:
    if isinstance(names, int):
      lines.append(f"  {label:<20} {names:>6}")
      continue
    shown = compact_names(names)
    lines.append(f"  {label:<20} {len(names):>6}  " + (shown[0] if shown else "-"))
    lines += [f"  {'':<20} {'':>6}  {n}" for n in shown[1:]]
  return "\n".join(lines)


@dataclasses.dataclass
class VindluImportReport:
  source: str
  naming: str
  loaded: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (source key, ours)
  resized: list[str] = dataclasses.field(default_factory=list)             # descriptions
  new: list[str] = dataclasses.field(default_factory=list)                 # our paths
  dropped: dict[str, str] = dataclasses.field(default_factory=dict)        # source key -> reason
  tied: dict[str, str] = dataclasses.field(default_factory=dict)           # source key -> equal key
  upcast: list[str] = dataclasses.field(default_factory=list)

  @property
  def loaded_sources(self) -> list[str]:
    return list(dict.fromkeys(s for s, _ in self.loaded))

  def table(self) -> str:
    reasons = sorted(set(self.dropped.values()))
    rows = [("loaded (source keys)", self.loaded_sources),
            ("  -> our params", len(self.loaded)),
            ("resized", self.resized),
            ("newly initialised", self.new),
            ("dropped", list(self.dropped)),
            ("tied (checked)", [f"{k} == {v}" for k, v in self.tied.items()])]
    if self.upcast:
      rows.append(("upcast to float32", self.upcast))
    text = format_table(f"VindLU import from {self.source} ({self.naming} naming)", rows)
    return text + "".join(f"\n  dropped because: {r}" for r in reasons)

  __str__ = table


@dataclasses.dataclass
class VindluExportReport:
  naming: str
  exported: list[str] = dataclasses.field(default_factory=list)   # VindLU keys from our params
  rebuilt: list[str] = dataclasses.field(default_factory=list)    # buffers, zero-filled unused keys
  tied: list[str] = dataclasses.field(default_factory=list)       # decoder copies
  not_exported: dict[str, str] = dataclasses.field(default_factory=dict)  # our path -> reason

  def table(self) -> str:
    rows = [("exported", self.exported), ("rebuilt / filled", self.rebuilt),
            ("tied copies", self.tied), ("not exported", list(self.not_exported))]
    reasons = sorted(set(self.not_exported.values()))
    return (format_table(f"VindLU export ({self.naming} naming)", rows)
            + "".join(f"\n  not exported because: {r}" for r in reasons))

  __str__ = table


# ----------------------------------------------------------------------------------------
# Import.
# ----------------------------------------------------------------------------------------

def _is_t2v(path: str) -> bool:
  return path.startswith(T2V_PREFIXES)


def _check_buffers(state: Mapping[str, np.ndarray]) -> list[str]:
  """The dropped int buffers must hold what our model rebuilds."""
  problems = []
  for key, value in state.items():
    if key.startswith(VISION_LAYER) and key.endswith(REL_INDEX):
      table_key = key[:-len(REL_INDEX)] + REL_TABLE
      if table_key not in state:
        continue  # reported as a missing table
      try:
        grid = infer_square_grid(np.shape(state[table_key])[0])
      except (ValueError, IndexError):
        continue  # reported with the table
      want = ve.relative_position_index(grid)
      if value.dtype.kind not in "iu" or value.shape != want.shape or \
          not np.array_equal(value, want):
        problems.append(f"buffer {key!r} (shape {tuple(value.shape)}) is not the standard BEiT "
                        f"relative position index of a {grid}x{grid} patch grid, which this model "
                        "uses")
    elif re.search(r"^text_encoder\.(bert\.)?embeddings\.position_ids$", key):
      # Compared without reshaping first: a broadcast view would be copied out in full.
      table = key[:-len("position_ids")] + "position_embeddings.weight"
      rows = np.shape(state[table])[0] if table in state and np.ndim(state[table]) else None
      if value.dtype.kind not in "iu" or value.ndim > 2 or value.size != rows or \
          not np.array_equal(value.reshape(-1), np.arange(value.size)):
        problems.append(f"buffer {key!r} (shape {tuple(value.shape)}, {value.dtype}) is not "
                        f"arange({rows}) (this model uses positions 0..L-1)")
  return problems


def _absent_layer(key: str, layout: Layout) -> str | None:
  """For a key of a layer beyond the model's depth: which layer and what the model has.
  (Without this, such a layer's buffers and unused Linear would match a dropped pattern and
  vanish without a word.)"""
  m = re.match(re.escape(VISION_LAYER) + r"(\d+)\.", key)
  if m and int(m.group(1)) >= layout.vision_depth:
    return f"vision layer {m.group(1)}, which this model lacks (it has {layout.vision_depth})"
  m = re.match(r"text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.", key)
  depth = layout.num_text_layers + layout.num_fusion_layers
  if m and int(m.group(1)) >= depth:
    return f"text layer {m.group(1)}, which this model lacks (it has {depth})"
  return None


def _not_a_weight(value: np.ndarray) -> str | None:
  """Why `value` cannot be a weight (not floating point, or not finite), else None."""
  if value.dtype.kind != "f":
    return f"has dtype {value.dtype} (weights must be floating point)"
  bad = int(value.size - np.count_nonzero(np.isfinite(value)))
  if bad:
    return f"holds {bad} non-finite value(s) (NaN or inf) of {value.size}"
  return None


def _describe_source(state: Mapping[str, np.ndarray]) -> str:
  try:
    c = infer_model_config(state, "v2t")
  except Exception as e:  # noqa: BLE001 (a description must never hide the real error)
    return f"architecture not inferable ({e})"
  return describe_config(c)


def describe_config(c) -> str:
  v, t = c.vision, c.text
  return (f"vision {v.width}w x {v.depth} layers, mlp {v.mlp_dim}, patch {v.patch_size}, image "
          f"{v.image_size}, {v.num_frames} frames; text {t.width}w x {t.num_layers} layers "
          f"(fusion from {t.fusion_layer}), mlp {t.mlp_dim}, vocab {t.vocab_size}; embed {c.embed_dim}")


def import_vindlu(state: Mapping[str, np.ndarray], model_config, *, model=None, seed: int = 0,
                  source: str = "<state dict>", initial: Mapping | None = None
                  ) -> tuple[dict[str, np.ndarray], VindluImportReport]:
  """Map a VindLU state dict (numpy arrays) onto a T2V2T model described by `model_config`.

  Args:
    state: `{VindLU key: numpy array}` (see `read_vindlu_checkpoint`).
    model_config: the `model` ConfigDict of the target.
    model: optional already built `T2V2T` of that config; its initial values are used for
      the newly initialised parameters (otherwise a model is built with `seed`, only if
      some parameter is new).
    source: a name for messages.
    initial: optional `{our dotted param path: array}` of initial values (a training run
      passes its freshly initialised parameters); takes precedence over `model`, and no
      model is built.

  Returns:
    (`{our dotted param path: numpy array}` for EVERY parameter of the model, report).
  Raises:
    VindluCheckpointError naming every unexpected, missing or misshapen key and every
    parameter of ours that gets no value. Nothing is returned partially.
  """
  from t2v2t_jax.checkpoints.params import flatten_params, param_shapes
  from t2v2t_jax.models.t2v2t import abstract_model, create_model

  naming = detect_naming(state)
  has_mlm = any(k.startswith(MLM_PREFIX + "cls.predictions.") for k in state)
  shapes = param_shapes(model if model is not None else abstract_model(model_config))
  layout = layout_from_params(shapes, naming, has_mlm)
  mapping = vindlu_key_map(layout)
  grid = (model_config.vision.image_size // model_config.vision.patch_size,) * 2
  report = VindluImportReport(source=source, naming=naming)

  problems: list[str] = []
  mapped_sources = {m.source for m in mapping}
  ties = tied_keys(naming)
  unexpected = []
  for key in state:
    if key in mapped_sources or key in ties:
      continue
    absent = _absent_layer(key, layout)
    if absent:
      problems.append(f"source key {key!r} belongs to {absent}")
      continue
    reason = dropped_reason(key)
    if reason is not None:
      report.dropped[key] = reason
    else:
      unexpected.append(key)
  for key in unexpected:
    problems.append(f"unexpected source key {key!r} (shape {tuple(np.shape(state[key]))}): "
                    "neither mapped nor a known dropped key")
  for key in dict.fromkeys(m.source for m in mapping if m.source not in state):
    targets = [m.target for m in mapping if m.source == key]
    problems.append(f"missing source key {key!r} (for {', '.join(targets)})")
  problems += _check_buffers(state)
  for key, other in ties.items():
    if key not in state:
      continue
    if other in state and np.shape(state[key]) == np.shape(state[other]) and \
        np.array_equal(state[key], state[other]):
      report.tied[key] = other
    else:
      problems.append(f"source key {key!r} differs from {other!r}, but our MLM decoder is tied to it")

  values: dict[str, np.ndarray] = {}
  checked: set[str] = set()
  for m in mapping:
    if m.source not in state:
      continue
    src = np.asarray(state[m.source])
    if m.source not in checked:
      checked.add(m.source)
      bad = _not_a_weight(src)
      if bad:
        problems.append(f"source key {m.source!r} {bad}")
    if m.target not in shapes:
      hint = (" (fusion mode 'joint' has no cross-attention)"
              if ".crossattention" in m.target and model_config.fusion.mode == "joint" else "")
      problems.append(f"source key {m.source!r} maps to {m.target!r}, which this model lacks{hint}")
      continue
    want = tuple(shapes[m.target])
    try:
      value = apply_transform(m.transform, src, target_shape=want, dst_grid=grid)
    except ValueError as e:
      problems.append(f"source key {m.source!r} of shape {tuple(src.shape)} cannot become "
                      f"{m.target!r} {want}: {e}")
      continue
    if tuple(value.shape) != want:
      problems.append(f"shape mismatch: source key {m.source!r} {tuple(src.shape)} -> {m.target!r} "
                      f"expects {want}, got {tuple(value.shape)} after the {m.transform!r} transform")
      continue
    if m.transform == "rel_pos_table" and value.shape != src.shape:
      g0 = infer_square_grid(src.shape[0])
      report.resized.append(f"{m.source}: {tuple(src.shape)} -> {want} (patch grid {g0}x{g0} -> "
                            f"{grid[0]}x{grid[1]}, bilinear)")
    elif m.transform.startswith("temporal_") and value.shape != src.shape:
      how = "zero-padded" if want[1] > src.shape[1] else f"first {want[1]} kept"
      report.resized.append(f"{m.source}: {src.shape[1]} -> {want[1]} frames ({how})")
    values[m.target] = np.asarray(value, order="C")
    report.loaded.append((m.source, m.target))

  mapped_targets = {m.target for m in mapping}
  for path in shapes:
    if path in mapped_targets:
      continue
    if _is_t2v(path) or (path.startswith(MLM_HEAD_PREFIX) and not has_mlm):
      report.new.append(path)
    else:
      problems.append(f"our parameter {path!r} gets no value from a VindLU checkpoint")

  if problems:
    # The first line says it all for a log; the lines below list every problem.
    more = f" (and {len(problems) - 1} more, below)" if len(problems) > 1 else ""
    raise VindluCheckpointError(
        f"cannot import {source} ({naming} naming) into the model: {problems[0]}{more}\n"
        f"  checkpoint: {_describe_source(state)}\n  model:      {describe_config(model_config)}\n"
        f"  {len(problems)} problem(s):\n    " + "\n    ".join(problems))

  if report.new:
    if initial is None:
      if model is None:  # a throw-away model for the initial values, kept in host memory
        with jax.default_device(jax.devices("cpu")[0]):
          model = create_model(model_config, seed=seed)
      initial = flatten_params(model)
    for path in report.new:
      values[path] = np.asarray(initial[path])
  ordered = {path: values[path] for path in shapes}
  return ordered, report


def load_vindlu_params(path: str | os.PathLike, model_config, *, seed: int = 0,
                       verbose: bool = True, initial: Mapping | None = None
                       ) -> dict[str, np.ndarray]:
  """`{our dotted param path: np.ndarray}` for every parameter of the model described by
  `model_config`, from a VindLU `.pth` (used by `--config.init_from=X.pth`).

  `initial`: initial values for the parameters VindLU lacks (see `import_vindlu`).
  Prints the import table (loaded / resized / newly initialised / dropped) when verbose.
  """
  ckpt = read_vindlu_checkpoint(path)
  values, report = import_vindlu(ckpt.state, model_config, seed=seed, source=ckpt.source,
                                 initial=initial)
  report.upcast = ckpt.upcast
  if verbose:
    print(report.table(), flush=True)
  return values


# ----------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------

def _inverse(kind: str, value: np.ndarray) -> np.ndarray:
  if kind in ("copy", "rel_pos_table", "temporal_zero_pad", "temporal_interpolate"):
    return value
  if kind == "linear":
    return value.T
  if kind == "conv":
    return value.transpose(3, 2, 0, 1)
  raise ValueError(f"no inverse for transform {kind!r}")


def _t2v_is_identity(params: Mapping[str, np.ndarray]) -> tuple[bool, str]:
  gates = {p: float(np.asarray(v)) for p, v in params.items()
           if _is_t2v(p) and p.rsplit(".", 1)[-1] in ("gate", "ffn_gate")}
  if not gates:
    return False, "the T2V blocks have no gates (post-LN residuals)"
  nonzero = {p: g for p, g in gates.items() if g != 0.0}
  if nonzero:
    return False, "T2V gates are not 0: " + ", ".join(f"{p}={g:g}" for p, g in nonzero.items())
  return True, "T2V blocks are the identity (every gate 0): VindLU scores the same"


def export_vindlu(params: Mapping[str, np.ndarray], *, naming: str = "finetune",
                  drop_t2v: bool = False) -> tuple[dict[str, np.ndarray], VindluExportReport]:
  """Our params `{dotted path: array}` -> a VindLU-named state dict (numpy), and a report.

  Args:
    naming: 'finetune' (`text_encoder.*`, no MLM head: what VindLU's retrieval model and
      its evaluation load) or 'pretrain' (`text_encoder.bert.*` + `cls.predictions.*`).
    drop_t2v: leave out T2V blocks whose gates are not 0 (the PyTorch model then scores
      differently from ours); by default that is an error.
  """
  if naming not in NAMINGS:
    raise ValueError(f"naming={naming!r} is not one of {NAMINGS}")
  params = {k: np.asarray(v) for k, v in params.items()}
  has_mlm = any(p.startswith(MLM_HEAD_PREFIX) for p in params)
  if naming == "pretrain" and not has_mlm:
    raise VindluCheckpointError("pretrain naming needs an MLM head, and these params have none")
  layout = layout_from_params(params, naming, mlm=naming == "pretrain")
  mapping = vindlu_key_map(layout)
  report = VindluExportReport(naming=naming)
  problems: list[str] = []

  by_source: dict[str, list[KeyMapping]] = collections.OrderedDict()
  for m in mapping:
    by_source.setdefault(m.source, []).append(m)
  out: dict[str, np.ndarray] = collections.OrderedDict()
  bert = BERT_PREFIX[naming]
  extras_after: dict[str, list[tuple[str, np.ndarray]]] = collections.defaultdict(list)

  for source, ms in by_source.items():
    absent = [m.target for m in ms if m.target not in params]
    if absent:
      problems.append(f"VindLU key {source!r} needs our parameter(s) {', '.join(absent)}, "
                      "which these params lack")
      continue
    kinds = [m.transform for m in ms]
    if len(ms) == 1:
      value = _inverse(kinds[0], params[ms[0].target])
    elif sorted(kinds) == ["in_proj_k", "in_proj_q", "in_proj_v"]:
      parts = {m.transform[-1]: params[m.target] for m in ms}
      value = np.concatenate([parts[w].T if parts[w].ndim == 2 else parts[w] for w in "qkv"], 0)
    else:
      problems.append(f"VindLU key {source!r} has several sources with transforms {kinds}")
      continue
    out[source] = np.asarray(value, order="C")
    report.exported.append(source)

    # Buffers and unused keys VindLU's model has, next to their module.
    if source.endswith(REL_TABLE):
      grid = infer_square_grid(value.shape[0])
      key = source[:-len(REL_TABLE)] + REL_INDEX
      extras_after[source].append((key, ve.relative_position_index(grid).astype(np.int64)))
    elif source.endswith("temp_model.scale"):
      width = params[ms[0].target.replace(".scale", ".norm.scale")].shape[0]
      prefix = source[:-len("scale")]
      extras_after[source] += [(f"{prefix}linear.weight", np.zeros((width, width), np.float32)),
                               (f"{prefix}linear.bias", np.zeros((width,), np.float32))]
    elif source == f"{bert}embeddings.LayerNorm.bias":
      n = params["text_encoder.embeddings.position_embeddings.embedding"].shape[0]
      extras_after[source].append((f"{bert}embeddings.position_ids",
                                   np.arange(n, dtype=np.int64)[None]))
    elif naming == "pretrain" and source == f"{MLM_PREFIX}cls.predictions.bias":
      for dup, orig in tied_keys(naming).items():
        extras_after[source].append((dup, "tie:" + orig))

  consumed = {m.target for m in mapping}
  for path in params:
    if path in consumed:
      continue
    if path.startswith(MLM_HEAD_PREFIX) and naming == "finetune":
      report.not_exported[path] = "fine-tune naming has no MLM head (use naming='pretrain')"
    elif _is_t2v(path):
      identity, why = _t2v_is_identity(params)
      if identity or drop_t2v:
        report.not_exported[path] = why if identity else why + " (dropped on request: VindLU " \
            "will score differently)"
      else:
        problems.append(f"{path}: {why}; VindLU has no T2V blocks, so the exported model would "
                        "score differently (pass drop_t2v=True / --drop-t2v to export anyway)")
    else:
      problems.append(f"our parameter {path!r} has no VindLU key")
  if problems:
    raise VindluCheckpointError("cannot export to VindLU:\n  " + "\n  ".join(dict.fromkeys(problems)))

  final: dict[str, np.ndarray] = collections.OrderedDict()
  for key, value in out.items():
    final[key] = value
    for extra_key, extra in extras_after.get(key, []):
      if isinstance(extra, str) and extra.startswith("tie:"):
        final[extra_key] = out[extra[len("tie:"):]]
        report.tied.append(f"{extra_key} = {extra[len('tie:'):]}")
      else:
        final[extra_key] = extra
        report.rebuilt.append(extra_key)
  return final, report


def save_vindlu_checkpoint(state: Mapping[str, np.ndarray], path: str | os.PathLike, *,
                           config: dict | None = None) -> None:
  """`torch.save({'model': state_dict[, 'config': config]}, path)` with torch tensors.

  Tied tensors that are the same numpy object stay one torch tensor (one storage).
  """
  import torch

  tensors, by_id = collections.OrderedDict(), {}
  for key, value in state.items():
    if id(value) not in by_id:
      array = np.asarray(value, order="C")
      if not array.flags.writeable:  # torch tensors need writable memory
        array = array.copy()
      by_id[id(value)] = torch.from_numpy(array)
    tensors[key] = by_id[id(value)]
  obj = {"model": tensors}
  if config is not None:
    obj["config"] = dict(config)
  torch.save(obj, os.fspath(path))


# ----------------------------------------------------------------------------------------
# Architecture from a checkpoint.
# ----------------------------------------------------------------------------------------

def _variant(table: Mapping[str, tuple], values: tuple) -> str | None:
  return next((name for name, v in table.items() if tuple(v) == tuple(values)), None)


def infer_model_config(state: Mapping[str, np.ndarray], fusion_mode: str = "t2v2t"):
  """A `model` ConfigDict whose architecture fits a VindLU state dict.

  Widths, depths, MLP sizes, patch and image size, frames, vocabulary, positions,
  fusion_layer, embedding size and vision heads are read from tensor shapes. The number of
  text heads is not stored in any shape: it is taken from the known variant with that
  width (base: 12), else width // 64. Everything else keeps the SPEC defaults.
  """
  from t2v2t_jax.models import config as config_lib

  naming = detect_naming(state)
  bert = BERT_PREFIX[naming]

  def shape(key):
    if key not in state:
      raise VindluCheckpointError(f"cannot infer the architecture: {key!r} is missing")
    return tuple(np.shape(state[key]))

  keys = list(state)
  v_depth = _layer_count(keys, r"^vision_encoder\.encoder\.layer\.(\d+)\.")
  t_layers = _layer_count(keys, rf"^{re.escape(bert)}encoder\.layer\.(\d+)\.")
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
