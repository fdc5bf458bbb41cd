"""Export our parameters as a VindLU state dict, to evaluate them with the PyTorch original.

`export_vindlu` walks the key map (`vindlu_keys.py`) backwards: our params -> a VindLU-named
state dict in either naming. Buffers are rebuilt (int64), `temp_model.linear.*` is
written as zeros (unused by VindLU), and the tied decoder tensors are copies of the word
embeddings and the MLM bias. The T2V blocks have no VindLU counterpart: they are left out
when they are the identity (every gate exactly 0), otherwise export refuses unless
`drop_t2v=True`. `save_vindlu_checkpoint` writes the `.pth`.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Mapping

import numpy as np

from t2v2t_jax.checkpoints.import_report import format_table
from t2v2t_jax.checkpoints.key_mapping import KeyMapping, infer_square_grid, inverse_transform
from t2v2t_jax.checkpoints.vindlu_keys import (BERT_PREFIX, MLM_HEAD_PREFIX, MLM_PREFIX, NAMINGS,
                                               REL_INDEX, REL_TABLE, VindluCheckpointError,
                                               is_t2v, layout_from_params, tied_keys,
                                               vindlu_key_map)
from t2v2t_jax.models import vision_encoder as ve


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


def _t2v_is_identity(params: Mapping[str, np.ndarray]) -> tuple[bool, str]:
  gates = {p: float(np.asarray(v)) for p, v in params.items()
           if is_t2v(p) and p.rsplit(".", 1)[-1] in ("gate", "ffn_gate")}
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
      value = inverse_transform(kinds[0], params[ms[0].target])
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
    elif is_t2v(path):
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
