"""Import Hugging Face BERT weights into the text encoder and the fusion encoder.

Layers 0..fusion_layer-1 go to `TextEncoder.layers`, layers fusion_layer.. to the
self-attention and FFN parts of `FusionEncoder.layers`; their cross-attention and the T2V
blocks are new (init normal(0.02), zero bias, gates 0) and listed in the report. The MLM
head (`cls.predictions.*`) is loaded when the source has one. `pooler.*`,
`embeddings.position_ids` and the NSP head `cls.seq_relationship.*` are dropped on
purpose and listed. Any other source key that nothing consumes, and any of our parameters
that should come from the source but does not, is an error naming it (SPEC 9: a loader
that silently drops keys evaluates a random model).

The mapping is a table of `KeyMapping(source, target, transform, group)` rows
(`bert_rules`, `key_mapping.py`): `source` is relative to a BertModel (`embeddings.*`,
`encoder.layer.{i}.*`) or to the MLM head (`cls.predictions.*`); `target` is relative to
the T2V2T model (`text_encoder.*`, `fusion_encoder.*`), so a VindLU importer can prepend
its own source prefixes (`text_encoder.bert.`, `text_encoder.`) and reuse the rows.

The weights are read without torch (`hf_files.py`: safetensors, else `flax_model.msgpack`
renamed to these PyTorch keys, else `pytorch_model.bin`), also from `gs://...`.
`bert_values` checks everything and returns the values without writing (what a training
run does before it builds its model); `load_bert_into` writes them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import numpy as np

from t2v2t_jax.checkpoints import weight_rules
from t2v2t_jax.checkpoints.hf_files import read_hf_checkpoint
from t2v2t_jax.checkpoints.import_report import ImportReport
from t2v2t_jax.checkpoints.key_mapping import (REQUIRED, KeyMapping, apply_transform, layer_norm,
                                               linear, transformed_shape)
from t2v2t_jax.checkpoints.params import assign_into, param_shapes
from t2v2t_jax.errors import Refusal

TEXT, FUSION = "text_encoder", "fusion_encoder"
# Bounds on config.json sizes: far above any published BERT, far below what would make an
# abstract model expensive.
_MAX_SIZE = 1 << 20


class BertImportError(Refusal):
  """Missing, unexpected or mismatching weights in a BERT import."""


def embedding_rules() -> list[KeyMapping]:
  return [
      KeyMapping("embeddings.word_embeddings.weight", f"{TEXT}.embeddings.word_embeddings.embedding"),
      KeyMapping("embeddings.position_embeddings.weight", f"{TEXT}.embeddings.position_embeddings.embedding"),
      KeyMapping("embeddings.token_type_embeddings.weight", f"{TEXT}.embeddings.token_type_embeddings.embedding"),
      *layer_norm("embeddings.LayerNorm", f"{TEXT}.embeddings.layer_norm"),
  ]


def layer_rules(src: str, dst: str) -> list[KeyMapping]:
  """Self-attention + FFN of one BERT layer: `src`='encoder.layer.{i}', `dst`=our layer path."""
  return [
      *linear(f"{src}.attention.self.query", f"{dst}.attention.query"),
      *linear(f"{src}.attention.self.key", f"{dst}.attention.key"),
      *linear(f"{src}.attention.self.value", f"{dst}.attention.value"),
      *linear(f"{src}.attention.output.dense", f"{dst}.attention_output.dense"),
      *layer_norm(f"{src}.attention.output.LayerNorm", f"{dst}.attention_output.layer_norm"),
      *linear(f"{src}.intermediate.dense", f"{dst}.ffn.intermediate"),
      *linear(f"{src}.output.dense", f"{dst}.ffn.output"),
      *layer_norm(f"{src}.output.LayerNorm", f"{dst}.ffn_layer_norm"),
  ]


def cross_attention_rules(src: str, dst: str) -> list[KeyMapping]:
  """VindLU/ALBEF cross-attention of a fusion layer (absent from plain BERT: optional)."""
  g = f"{src}.crossattention"
  return [
      *linear(f"{src}.crossattention.self.query", f"{dst}.crossattention.query", group=g),
      *linear(f"{src}.crossattention.self.key", f"{dst}.crossattention.key", group=g),
      *linear(f"{src}.crossattention.self.value", f"{dst}.crossattention.value", group=g),
      *linear(f"{src}.crossattention.output.dense", f"{dst}.crossattention_output.dense", group=g),
      *layer_norm(f"{src}.crossattention.output.LayerNorm", f"{dst}.crossattention_output.layer_norm",
                  group=g),
  ]


def mlm_rules() -> list[KeyMapping]:
  g = "cls.predictions"
  return [
      *linear("cls.predictions.transform.dense", f"{TEXT}.mlm_head.dense", group=g),
      *layer_norm("cls.predictions.transform.LayerNorm", f"{TEXT}.mlm_head.layer_norm", group=g),
      KeyMapping("cls.predictions.bias", f"{TEXT}.mlm_head.bias", "copy", g),
  ]


# Source keys that duplicate another source tensor (our decoder is tied): checked equal.
TIED_KEYS = {
    "cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}

# Source key prefixes deliberately not imported, with the reason.
DROPPED_PREFIXES = {
    "pooler.": "BERT pooler: unused (the VTC/VTM features are raw [CLS] states, SPEC 2)",
    "embeddings.position_ids": "buffer, recomputed as arange(L)",
    "cls.seq_relationship.": "next-sentence-prediction head: unused",
}


def bert_rules(num_text_layers: int, num_fusion_layers: int, *,
               cross_attention: bool = False, mlm: bool = True) -> list[KeyMapping]:
  """The full table: BERT layer i < num_text_layers -> text_encoder.layers.i, the next
  num_fusion_layers -> fusion_encoder.layers.(i - num_text_layers)."""
  rules = embedding_rules()
  for i in range(num_text_layers + num_fusion_layers):
    if i < num_text_layers:
      dst = f"{TEXT}.layers.{i}"
    else:
      dst = f"{FUSION}.layers.{i - num_text_layers}"
    rules += layer_rules(f"encoder.layer.{i}", dst)
    if cross_attention and i >= num_text_layers:
      rules += cross_attention_rules(f"encoder.layer.{i}", dst)
  if mlm:
    rules += mlm_rules()
  return rules


# -- reading a Hugging Face folder -----------------------------------------------------------

def read_hf_bert(folder_or_name) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json as a dict, {source key: numpy array}) from a folder or a hub name, or
  from what `hf_files.read_hf_checkpoint` returned for one (a BERT import needs the
  config)."""
  hf_config, state, weights = read_hf_checkpoint(folder_or_name)
  if hf_config is None:
    raise FileNotFoundError(f"no config.json beside {weights}")
  return hf_config, state


def _config_file(source: str) -> str:
  return os.path.join(os.path.dirname(source), "config.json")


def normalize_source_keys(state: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Strip the `bert.` prefix (BertForMaskedLM/BertForPreTraining) and rename the old
  TF-era LayerNorm `gamma`/`beta` to `weight`/`bias`; two keys landing on one name is an error."""
  out = type(state)() if hasattr(state, "files") else {}
  files = getattr(state, "files", None)
  for key, value in state.items():
    new = key[len("bert."):] if key.startswith("bert.") else key
    if new.endswith(".gamma"):
      new = new[:-len("gamma")] + "weight"
    elif new.endswith(".beta"):
      new = new[:-len("beta")] + "bias"
    if new in out:
      raise BertImportError(f"source keys collide after normalisation: {key[:200]!r} -> "
                            f"{new[:200]!r}")
    out[new] = value
    if files is not None and key in files:
      out.files[new] = files[key]  # which file each key came from, for messages
  return out


# -- config ------------------------------------------------------------------------------------

def text_config_from_hf(hf_config: dict, fusion_layer: int | None,
                        file: str = "config.json") -> dict:
  """Our `model.text` fields from a Hugging Face BERT config.json.

  `fusion_layer=None` leaves that field out (the caller's config keeps its own).
  Attention-probability dropout uses our single `dropout_rate` (= hidden_dropout_prob).
  A field of the wrong type or range is one BertImportError naming `file` and the field.
  """
  if not isinstance(hf_config, Mapping):
    raise BertImportError(f"{file}: expected a JSON object, got {type(hf_config).__name__}")

  def get(name, kind, default=weight_rules.NO_DEFAULT, **bounds):
    return weight_rules.field(hf_config, name, file, kind, default=default,
                              error=BertImportError, **bounds)

  model_type = get("model_type", str, "bert")
  if model_type != "bert":
    raise BertImportError(f"{file}: model_type={model_type[:80]!r}: only 'bert' checkpoints "
                          "are supported")
  act = get("hidden_act", str, "gelu")
  if act != "gelu":
    raise BertImportError(f"{file}: hidden_act={act[:80]!r}: our BERT layers use exact GELU "
                          "('gelu') only")
  pos = get("position_embedding_type", str, "absolute")
  if pos != "absolute":
    raise BertImportError(f"{file}: position_embedding_type={pos[:80]!r}: only 'absolute' is "
                          "supported")
  size = dict(minimum=1, maximum=_MAX_SIZE)
  num_layers = get("num_hidden_layers", int, minimum=1, maximum=weight_rules.MAX_LAYER_INDEX)
  out = dict(
      width=get("hidden_size", int, **size),
      num_layers=num_layers,
      num_heads=get("num_attention_heads", int, **size),
      mlp_dim=get("intermediate_size", int, **size),
      vocab_size=get("vocab_size", int, **size),
      max_position=get("max_position_embeddings", int, 512, **size),
      type_vocab_size=get("type_vocab_size", int, 2, **size),
      dropout_rate=get("hidden_dropout_prob", float, 0.1, minimum=0, maximum=1),
      layer_norm_eps=get("layer_norm_eps", float, 1e-12, minimum=0),
  )
  if fusion_layer is not None:
    if not 0 < fusion_layer < num_layers:
      raise BertImportError(f"fusion_layer={fusion_layer} must be in [1, num_hidden_layers={num_layers})")
    out["fusion_layer"] = int(fusion_layer)
  return out


# -- import ------------------------------------------------------------------------------------

def _expected_new(path: str, has_mlm: bool) -> bool:
  """Our params that plain BERT does not provide."""
  owner, rest = path.split(".", 1)
  if owner == FUSION:
    parts = rest.split(".")
    if parts[0] in ("t2v", "t2v_blocks"):
      return True
    if parts[0] == "layers" and parts[2].startswith("crossattention"):
      return True
  return owner == TEXT and rest.startswith("mlm_head.") and not has_mlm


def _check_structure(hf_text: dict, text_encoder, fusion_encoder) -> list[str]:
  problems = []
  heads = text_encoder.layers[0].attention.num_heads
  if heads != hf_text["num_heads"]:
    problems.append(f"num_attention_heads={hf_text['num_heads']} in the source, {heads} in our model")
  eps = text_encoder.embeddings.layer_norm.epsilon
  if not np.isclose(eps, hf_text["layer_norm_eps"], rtol=1e-6, atol=0):
    problems.append(f"layer_norm_eps={hf_text['layer_norm_eps']} in the source, {eps} in our model")
  ours = len(text_encoder.layers) + (len(fusion_encoder.layers) if fusion_encoder is not None else 0)
  if ours > hf_text["num_layers"] or (fusion_encoder is not None and ours != hf_text["num_layers"]):
    problems.append(f"num_hidden_layers={hf_text['num_layers']} in the source, {ours} in our "
                    f"model ({len(text_encoder.layers)} text"
                    + (f" + {len(fusion_encoder.layers)} fusion" if fusion_encoder is not None else "")
                    + ")")
  return problems


def load_bert_into(text_encoder, fusion_encoder, folder_or_name) -> ImportReport:
  """Load Hugging Face BERT weights in place; returns an ImportReport.

  Args:
    text_encoder: a TextEncoder (gets the embeddings, layers 0..fusion_layer-1, MLM head).
    fusion_encoder: a FusionEncoder (gets layers fusion_layer.. self-attention and FFN),
      or None to import the text encoder only (the remaining source layers are then
      dropped and listed).
    folder_or_name: a folder (config.json + model.safetensors, flax_model.msgpack or
      pytorch_model.bin; local or gs://), a Hugging Face hub name, or what
      `hf_files.read_hf_checkpoint` returned for one.

  Raises:
    BertImportError naming every unexpected source key, every missing one, every
    shape or structure mismatch; nothing is written unless all checks pass.
  """
  modules = {TEXT: text_encoder, FUSION: fusion_encoder}
  updates, loaded, report = bert_values(text_encoder, fusion_encoder, folder_or_name)
  _assign(modules, updates, loaded, report.source)
  return report


def bert_values(text_encoder, fusion_encoder, folder_or_name
                ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str], ImportReport]:
  """Everything `load_bert_into` checks, without writing: `({'text_encoder' /
  'fusion_encoder': {path below it: array}}, {our full path: source key}, report)`. The
  encoders may be abstract (`nnx.eval_shape`: only attributes and parameter shapes are
  read). Raises as `load_bert_into` does."""
  hf_config, raw_state, weights = read_hf_checkpoint(folder_or_name)
  if hf_config is None:
    raise FileNotFoundError(f"no config.json beside {weights}")
  source = folder_or_name[2] if isinstance(folder_or_name, tuple) else str(folder_or_name)
  state = normalize_source_keys(raw_state)
  hf_text = text_config_from_hf(hf_config, None, _config_file(weights))
  problems = _check_structure(hf_text, text_encoder, fusion_encoder)
  if problems:
    raise BertImportError(f"{source}: BERT checkpoint does not fit the model:\n  "
                          + "\n  ".join(problems))

  num_text = len(text_encoder.layers)
  num_fusion = len(fusion_encoder.layers) if fusion_encoder is not None else 0
  has_mlm = any(k.startswith("cls.predictions.") for k in state)
  rules = bert_rules(num_text, num_fusion, cross_attention=fusion_encoder is not None, mlm=has_mlm)
  return plan_with_rules({TEXT: text_encoder, FUSION: fusion_encoder}, state, rules,
                         source=source, dropped_prefixes=DROPPED_PREFIXES,
                         tied_keys=TIED_KEYS, expected_new=lambda p: _expected_new(p, has_mlm),
                         extra_dropped=_surplus_layers(state, num_text + num_fusion)
                         if fusion_encoder is None else {})


def _surplus_layers(state: Mapping[str, np.ndarray], num_layers: int) -> dict[str, str]:
  out = {}
  for key in state:
    parts = key.split(".")
    # Digits only, and compared by length first: int() of a 5,000-digit name raises.
    if key.startswith("encoder.layer.") and len(parts) > 3 and parts[2].isdigit() and \
        (len(parts[2]) > 9 or int(parts[2]) >= num_layers):
      out[key] = f"layer {parts[2][:20]} >= {num_layers}: no fusion encoder given"
  return out


def import_with_rules(modules: Mapping[str, object], state: Mapping[str, np.ndarray],
                      rules: list[KeyMapping], *, source: str, dropped_prefixes: Mapping[str, str],
                      tied_keys: Mapping[str, str], expected_new: Callable[[str], bool],
                      extra_dropped: Mapping[str, str] | None = None) -> ImportReport:
  """Apply a rule table; generic over owners (`{'text_encoder': module, ...}`, None = absent).

  An optional rule group (anything but 'required') is loaded all-or-nothing: if any of
  its source keys exists, all must. Every check runs before the first write.
  """
  updates, loaded, report = plan_with_rules(
      modules, state, rules, source=source, dropped_prefixes=dropped_prefixes,
      tied_keys=tied_keys, expected_new=expected_new, extra_dropped=extra_dropped)
  _assign(modules, updates, loaded, source)
  return report


def _assign(modules, updates, loaded, source) -> None:
  for owner, updates_for_owner in updates.items():
    names = {p: loaded[f"{owner}.{p}"] for p in updates_for_owner}
    assign_into(modules[owner], updates_for_owner, source=source, source_names=names)


def plan_with_rules(modules: Mapping[str, object], state: Mapping[str, np.ndarray],
                    rules: list[KeyMapping], *, source: str, dropped_prefixes: Mapping[str, str],
                    tied_keys: Mapping[str, str], expected_new: Callable[[str], bool],
                    extra_dropped: Mapping[str, str] | None = None
                    ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, str], ImportReport]:
  """`import_with_rules` up to the first write: `({owner: {path: array}}, {our full path:
  source key}, report)`, every check done (the modules may be abstract).

  Keys, dtypes, finiteness and shapes (`key_mapping.transformed_shape`) are all checked
  before any source tensor is transformed or converted (issue 25); problems are listed
  capped, each naming the file its key came from."""
  files = getattr(state, "files", {})

  def where(key):
    return weight_rules.named(files.get(key, ""), key)

  problems: list[str] = []
  consumed: set[str] = set()
  updates: dict[str, dict[str, np.ndarray]] = {owner: {} for owner, m in modules.items() if m is not None}
  loaded: dict[str, str] = {}
  shapes = {owner: param_shapes(modules[owner]) for owner in updates}
  checks = weight_rules.WeightChecks()

  present_groups = {r.group for r in rules if r.source in state}
  planned = []
  for rule in rules:
    owner, path = rule.target.split(".", 1)
    if modules.get(owner) is None:
      continue
    if rule.source not in state:
      if rule.group == REQUIRED or rule.group in present_groups:
        problems.append(f"missing source key {rule.source!r} (for {rule.target})")
      continue
    consumed.add(rule.source)
    loaded[rule.target] = rule.source
    src = state[rule.source]
    bad = checks.problem(src)
    if bad:
      problems.append(f"source key {where(rule.source)} {bad}")
      continue
    if path not in shapes[owner]:
      problems.append(f"no parameter {rule.target!r} in our model (for {rule.source!r})")
      continue
    want = shapes[owner][path]
    try:
      got = transformed_shape(rule.transform, np.shape(src), target_shape=want)
    except ValueError as e:
      got = f"none ({e})"
    if got != want:
      problems.append(f"shape mismatch for {rule.target!r} from {where(rule.source)}: ours "
                      f"{want}, source {got} (after transform)")
      continue
    planned.append((owner, path, rule))

  tied = {}
  for key, other in tied_keys.items():
    if key not in state:
      continue
    consumed.add(key)
    if other not in state or np.shape(state[key]) != np.shape(state[other]) or \
        not np.array_equal(np.asarray(state[key]), np.asarray(state[other])):
      problems.append(f"source key {key!r} differs from {other!r} (missing or not equal), "
                      f"but our model ties them ({files.get(key, source)})")
    else:
      tied[key] = other

  dropped = dict(extra_dropped or {})
  for key in state:
    for prefix, reason in dropped_prefixes.items():
      if key.startswith(prefix):
        dropped[key] = reason
  consumed |= set(dropped)

  for key in sorted(set(state) - consumed):
    problems.append(f"unexpected source key {where(key)} (shape "
                    f"{tuple(np.shape(state[key]))}): no rule maps it")

  # Our side: params that nothing fills but should be filled.
  new = []
  for owner in updates:
    filled = {path for o, path, _ in planned if o == owner} | {
        t.split(".", 1)[1] for t in loaded if t.startswith(owner + ".")}
    for path in sorted(set(shapes[owner]) - filled):
      target = f"{owner}.{path}"
      if expected_new(target):
        new.append(target)
      else:
        problems.append(f"our parameter {target!r} gets no value from the source")

  if problems:
    raise BertImportError(f"cannot import {source}: {weight_rules.headline(problems)}"
                          + weight_rules.problems_text(problems, "\n  "))
  for owner, path, rule in planned:  # every check passed: now transform (fp32 once per storage)
    updates[owner][path] = apply_transform(rule.transform, checks.as_float32(state[rule.source]))
  return updates, loaded, ImportReport(kind="BERT", source=source,
                                       loaded=[(s, t) for t, s in loaded.items()],
                                       new=new, dropped=dropped, tied=tied)
