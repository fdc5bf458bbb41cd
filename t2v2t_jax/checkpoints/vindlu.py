"""Import VindLU PyTorch checkpoints into T2V2T.

Source: a VindLU `.pth` (`torch.save` of `{"model": state_dict, "config": EasyDict, ...}`,
SPEC 8), read with `safe_torch_load` (a restricted unpickler: nothing from the file is
executed) straight into numpy arrays (torch is never imported: a run that starts from a
VindLU checkpoint needs no torch installed), from a local path or a `gs://...` URL, in
either naming (`vindlu_keys.detect_naming`). The key map, the deliberately dropped keys
and the namings are in `vindlu_keys.py`; export is `vindlu_export.py`.

Checked before anything is returned: the dropped int buffers must hold what our model
rebuilds (the standard BEiT relative position index, `arange` position ids), the tied
decoder keys must equal what they are tied to (`cls.predictions.decoder.weight` the word
embeddings, `cls.predictions.decoder.bias` the MLM bias). Any other source key that
nothing maps, any key of a layer the model does not have (a dropped buffer included), any
mapped key that is missing, any weight that is not floating point or holds NaN / inf, any
shape that does not fit, and any parameter of ours that should come from the checkpoint
but does not, is an error naming it (SPEC 9: VindLU's silently dropped `bert.` keys
evaluate a random text encoder). All problems are collected and raised together, the
list capped (`errors.capped_list`).

Order (issue 25, `weight_rules`): `check_vindlu_state` does every check on key names,
dtypes and shapes against the abstract model before anything is converted, resized or
built; only then are the mapped tensors converted (half precision and float8 to float32,
once per storage however many keys share it) and transformed. The reader keeps tensors as
stored, so a tensor saved under 2,000 names costs its own size, not 2,000 copies.

Our parameters without a VindLU source are newly initialised (the model's own initial
values, seed `seed`, or the run's own `initial` values) and listed:
  fusion_encoder.t2v.* / t2v_blocks.*  the T2V bypass blocks of 't2v2t'/'t2v2t_naive'
                                       (gates 0: the model then scores exactly like v2t)
  text_encoder.mlm_head.*              DECISION: when the checkpoint has no MLM head (a
                                       fine-tune checkpoint), our head's transform and bias
                                       start fresh; the decoder is the word embeddings.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections.abc import Mapping

import jax
import ml_dtypes
import numpy as np

from t2v2t_jax.checkpoints import weight_rules
from t2v2t_jax.checkpoints.import_report import ImportReport
from t2v2t_jax.checkpoints.key_mapping import (KeyMapping, apply_transform, infer_square_grid,
                                               transformed_shape)
from t2v2t_jax.checkpoints.vindlu_config import describe_config, infer_model_config
from t2v2t_jax.checkpoints.vindlu_keys import (MLM_HEAD_PREFIX, MLM_PREFIX, REL_INDEX, REL_TABLE,
                                               VISION_LAYER, Layout, VindluCheckpointError,
                                               detect_naming, dropped_reason, is_t2v,
                                               layout_from_params, tied_keys, vindlu_key_map)
from t2v2t_jax.errors import capped_list, one_line
from t2v2t_jax.models import vision_encoder as ve


# ----------------------------------------------------------------------------------------
# Reading a .pth.
# ----------------------------------------------------------------------------------------

@dataclasses.dataclass
class VindluCheckpoint:
  state: dict[str, np.ndarray]  # as stored: half precision and float8 are not converted yet
  config: dict | None          # the pickled EasyDict, as plain dicts
  source: str
  upcast: list[str] = dataclasses.field(default_factory=list)  # fp16/bf16/fp8 keys (-> fp32)


class NamedState(dict):
  """A state dict that knows the file it was read from (`source`), so that functions given
  only the state (`vindlu_config.infer_model_config`, which `convert` calls) name it."""

  def __init__(self, *args, source: str = "<state dict>", **kw):
    super().__init__(*args, **kw)
    self.source = source


def _torch_tensor_type():
  """torch.Tensor if torch is already imported (a caller's own tensors), else None: torch
  is never imported here."""
  torch = sys.modules.get("torch")
  return getattr(torch, "Tensor", None)


def _torch_to_numpy(value) -> np.ndarray:
  """A CPU torch tensor as numpy without a copy; numpy has no bfloat16 / float8, so those
  are viewed through a same-sized integer type as the ml_dtypes type."""
  value = value.detach().cpu()
  name = str(value.dtype).rpartition(".")[2]
  if name == "bfloat16" or name.startswith("float8_"):
    import torch  # noqa: PLC0415 (already imported: the tensor is torch's)
    ints = {1: torch.uint8, 2: torch.int16}[value.element_size()]
    return value.view(ints).numpy().view(np.dtype(getattr(ml_dtypes, name)))
  return value.numpy()


def state_dict_to_numpy(state_dict: Mapping, source: str = "<state dict>", *,
                        upcast: bool = True) -> tuple[dict[str, np.ndarray], list[str]]:
  """Numpy arrays (as `safe_torch_load(..., tensors="numpy")` reads them) or torch tensors
  -> numpy; anything else is an error. Returns (state, keys of half / float8 tensors).

  `upcast=True` converts those to float32, each storage ONCE however many keys share it
  (issue 25: one fp16 tensor saved under 2,000 names made 2,000 float32 copies);
  `read_vindlu_checkpoint` passes False and `import_vindlu` converts only what it maps,
  after every key and shape is checked."""
  tensor_type = _torch_tensor_type()
  checks = weight_rules.WeightChecks()
  out, half, bad = {}, [], []
  for key, value in state_dict.items():
    if not isinstance(key, str):
      bad.append(f"key {str(key)[:80]!r} ({type(key).__name__}, not a string)")
      continue
    if tensor_type is not None and isinstance(value, tensor_type):
      value = _torch_to_numpy(value)
    if not isinstance(value, np.ndarray):
      bad.append(f"{key[:120]!r} ({type(value).__name__})")
      continue
    if weight_rules.needs_upcast(value.dtype):
      half.append(key)
      if upcast:
        value = checks.as_float32(value)
    out[key] = value
  if bad:
    raise VindluCheckpointError(f"{source}: state-dict entries that are not string-keyed "
                                "tensors: " + capped_list(bad))
  return out, half


def read_vindlu_checkpoint(path: str | os.PathLike) -> VindluCheckpoint:
  """Safely read a VindLU `.pth` (`{"model": state_dict, ...}` or a bare state dict) into
  numpy, without torch; `path` may be a `gs://...` URL."""
  from t2v2t_jax.checkpoints.safe_torch_load import safe_torch_load

  path = os.fspath(path)
  obj = safe_torch_load(path, tensors="numpy")
  config = None
  if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
    state_dict = obj["model"]
    config = obj.get("config")
    if config is not None and not isinstance(config, dict):
      config = None
  elif isinstance(obj, Mapping) and obj and all(isinstance(v, np.ndarray) for v in obj.values()):
    state_dict = obj
  else:
    keys = [str(k)[:80] for k in list(obj)[:10]] if isinstance(obj, Mapping) else \
        type(obj).__name__
    raise VindluCheckpointError(f"{path}: expected {{'model': state_dict, ...}} or a state dict, "
                                f"got {keys}")
  state, upcast = state_dict_to_numpy(state_dict, path, upcast=False)
  return VindluCheckpoint(state=NamedState(state, source=path), config=config, source=path,
                          upcast=upcast)


# ----------------------------------------------------------------------------------------
# Import.
# ----------------------------------------------------------------------------------------

_POSITION_IDS = re.compile(r"^text_encoder\.(bert\.)?embeddings\.position_ids$")


def _check_buffers(state: Mapping[str, np.ndarray]) -> list[str]:
  """The dropped int buffers must hold what our model rebuilds. Shapes are compared before
  the reference is built: a crafted table of (2g-1)^2 + 3 rows would otherwise make a
  (g^2 + 1)^2 reference index (64 GB for g = 300, from a 700 KB table)."""
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
      side = grid * grid + 1
      if value.dtype.kind not in "iu" or value.shape != (side, side) or \
          not np.array_equal(value, ve.relative_position_index(grid)):
        problems.append(f"buffer {key!r} (shape {tuple(value.shape)}) is not the standard BEiT "
                        f"relative position index of a {grid}x{grid} patch grid, which this model "
                        "uses")
    elif _POSITION_IDS.search(key):
      # Compared without reshaping first: a broadcast view would be copied out in full.
      table = key[:-len("position_ids")] + "position_embeddings.weight"
      rows = np.shape(state[table])[0] if table in state and np.ndim(state[table]) else None
      if value.dtype.kind not in "iu" or value.ndim > 2 or value.size != rows or \
          not np.array_equal(value.reshape(-1), np.arange(value.size)):
        problems.append(f"buffer {key!r} (shape {tuple(value.shape)}, {value.dtype}) is not "
                        f"arange({rows}) (this model uses positions 0..L-1)")
  return problems


def _layer_number(digits: str) -> int:
  """A layer index from a key name; absurdly long ones count as absurdly large (int() of
  a 5,000-digit string raises)."""
  return int(digits) if len(digits) <= 9 else 10 ** 9


_VISION_LAYER_KEY = re.compile(re.escape(VISION_LAYER) + r"(\d+)\.")
_TEXT_LAYER_KEY = re.compile(r"text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.")


def _absent_layer(key: str, layout: Layout) -> str | None:
  """For a key of a layer beyond the model's depth: which layer and what the model has.
  (Without this, such a layer's buffers and unused Linear would match a dropped pattern and
  vanish without a word.)"""
  m = _VISION_LAYER_KEY.match(key)
  if m and _layer_number(m.group(1)) >= layout.vision_depth:
    return (f"vision layer {m.group(1)[:20]}, which this model lacks (it has "
            f"{layout.vision_depth})")
  m = _TEXT_LAYER_KEY.match(key)
  depth = layout.num_text_layers + layout.num_fusion_layers
  if m and _layer_number(m.group(1)) >= depth:
    return f"text layer {m.group(1)[:20]}, which this model lacks (it has {depth})"
  return None


def _describe_source(state: Mapping[str, np.ndarray]) -> str:
  try:
    c = infer_model_config(state, "v2t", check=False)
  except Exception as e:  # noqa: BLE001 (a description must never hide the real error)
    return f"architecture not inferable ({one_line(e)[:300]})"
  return describe_config(c)


_SHAPES_CACHE: dict[str, dict[str, tuple[int, ...]]] = {}


def _abstract_shapes(model_config) -> dict[str, tuple[int, ...]]:
  """The parameter shapes of the model a config describes, by `nnx.eval_shape` (no
  memory), kept for the last few configs (by their JSON text): tracing even the test
  model takes seconds, and `convert` checks one config twice (`infer_model_config`, then
  the import)."""
  from t2v2t_jax.checkpoints.params import param_shapes  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import abstract_model  # noqa: PLC0415
  key = model_config.to_json_best_effort(sort_keys=True)
  if key not in _SHAPES_CACHE:
    if len(_SHAPES_CACHE) >= 8:
      _SHAPES_CACHE.pop(next(iter(_SHAPES_CACHE)))
    _SHAPES_CACHE[key] = param_shapes(abstract_model(model_config))
  return dict(_SHAPES_CACHE[key])


@dataclasses.dataclass
class ImportPlan:
  """What `check_vindlu_state` found: the rows to apply (source present, shape checked),
  the model's parameter shapes, and the report so far (dropped, tied, resized)."""
  rows: list[KeyMapping]
  shapes: dict[str, tuple[int, ...]]
  grid: tuple[int, int]
  report: ImportReport


def check_vindlu_state(state: Mapping[str, np.ndarray], model_config, *, model=None,
                       source: str = "<state dict>") -> ImportPlan:
  """Every check of `import_vindlu`, on key names, dtypes and shapes alone: nothing is
  converted, resized or built (the model is `nnx.eval_shape`d unless `model` is given).

  Issue 25: everything a crafted file could make expensive is refused here first: keys of
  layers the model lacks (bounded, no range()), unexpected keys, weights that are not
  finite floating point or are empty, and shapes that no transform turns into the
  model's (the temporal embedding's width is compared before it is padded). A caller that
  builds the model itself (`convert`) calls this before building it.

  Raises VindluCheckpointError listing every problem (capped, `errors.capped_list`).
  """
  from t2v2t_jax.checkpoints.params import param_shapes

  naming = detect_naming(state, source)
  has_mlm = any(k.startswith(MLM_PREFIX + "cls.predictions.") for k in state)
  shapes = param_shapes(model) if model is not None else _abstract_shapes(model_config)
  layout = layout_from_params(shapes, naming, has_mlm)
  mapping = vindlu_key_map(layout)
  grid = (model_config.vision.image_size // model_config.vision.patch_size,) * 2
  report = ImportReport(kind="VindLU", source=source, naming=naming)

  problems: list[str] = []
  mapped_sources = {m.source for m in mapping}
  ties = tied_keys(naming)
  unexpected = []
  for key in state:
    if key in mapped_sources or key in ties:
      continue
    absent = _absent_layer(key, layout)
    if absent:
      problems.append(f"source key {key[:200]!r} belongs to {absent}")
      continue
    reason = dropped_reason(key)
    if reason is not None:
      report.dropped[key] = reason
    else:
      unexpected.append(key)
  for key in unexpected:
    problems.append(f"unexpected source key {key[:200]!r} (shape {tuple(np.shape(state[key]))}): "
                    "neither mapped nor a known dropped key")
  targets: dict[str, list[str]] = {}
  for m in mapping:
    if m.source not in state:
      targets.setdefault(m.source, []).append(m.target)
  for key, ours in targets.items():
    problems.append(f"missing source key {key!r} (for {', '.join(ours)})")
  problems += _check_buffers(state)
  for key, other in ties.items():
    if key not in state:
      continue
    if other in state and np.shape(state[key]) == np.shape(state[other]) and \
        np.array_equal(state[key], state[other]):
      report.tied[key] = other
    else:
      problems.append(f"source key {key!r} differs from {other!r}, but our MLM decoder is tied to it")

  checks = weight_rules.WeightChecks()
  rows, checked = [], set()
  for m in mapping:
    if m.source not in state:
      continue
    src = state[m.source]
    if m.source not in checked:
      checked.add(m.source)
      bad = checks.problem(src)
      if bad:
        problems.append(f"source key {m.source!r} {bad}")
        continue
    if m.target not in shapes:
      hint = (" (fusion mode 'joint' has no cross-attention)"
              if ".crossattention" in m.target and model_config.fusion.mode == "joint" else "")
      problems.append(f"source key {m.source!r} maps to {m.target!r}, which this model lacks{hint}")
      continue
    want = tuple(shapes[m.target])
    have = tuple(np.shape(src))
    try:
      got = transformed_shape(m.transform, have, target_shape=want, dst_grid=grid)
    except ValueError as e:
      problems.append(f"source key {m.source!r} of shape {have} cannot become "
                      f"{m.target!r} {want}: {e}")
      continue
    if got != want:
      problems.append(f"shape mismatch: source key {m.source!r} {have} -> {m.target!r} "
                      f"expects {want}, got {got} after the {m.transform!r} transform")
      continue
    if m.transform == "rel_pos_table" and got != have:
      g0 = infer_square_grid(have[0])
      report.resized.append(f"{m.source}: {have} -> {want} (patch grid {g0}x{g0} -> "
                            f"{grid[0]}x{grid[1]}, bilinear)")
    elif m.transform.startswith("temporal_") and got != have:
      how = "zero-padded" if want[1] > have[1] else f"first {want[1]} kept"
      report.resized.append(f"{m.source}: {have[1]} -> {want[1]} frames ({how})")
    rows.append(m)

  mapped_targets = {m.target for m in mapping}
  for path in shapes:
    if path in mapped_targets:
      continue
    if is_t2v(path) or (path.startswith(MLM_HEAD_PREFIX) and not has_mlm):
      report.new.append(path)
    else:
      problems.append(f"our parameter {path!r} gets no value from a VindLU checkpoint")

  if problems:
    # The first line says it all for a log; the lines below list the problems (capped:
    # a 200,000-key file must not print megabytes).
    raise VindluCheckpointError(
        f"cannot import {source} ({naming} naming) into the model: "
        f"{weight_rules.headline(problems)}\n"
        f"  checkpoint: {_describe_source(state)}\n  model:      {describe_config(model_config)}\n"
        f"  {len(problems):,} problem(s):" + weight_rules.problems_text(problems))
  return ImportPlan(rows=rows, shapes=shapes, grid=grid, report=report)


def import_vindlu(state: Mapping[str, np.ndarray], model_config, *, model=None, seed: int = 0,
                  source: str = "<state dict>", initial: Mapping | None = None,
                  fill_new: bool = True) -> tuple[dict[str, np.ndarray], ImportReport]:
  """Map a VindLU state dict (numpy arrays) onto a T2V2T model described by `model_config`.

  Args:
    state: `{VindLU key: numpy array}` (see `read_vindlu_checkpoint`; half precision and
      float8 are converted to float32 here, after every check, once per storage).
    model_config: the `model` ConfigDict of the target.
    model: optional already built `T2V2T` of that config; its initial values are used for
      the newly initialised parameters (otherwise a model is built with `seed`, only if
      some parameter is new).
    source: a name for messages.
    initial: optional `{our dotted param path: array}` of initial values (a training run
      passes its freshly initialised parameters); takes precedence over `model`, and no
      model is built.
    fill_new: False leaves the parameters VindLU lacks (`report.new`) out of the result,
      for a caller that has its own initial values (`training/initialization.py` reads
      the weights before the run's model exists); nothing is built then.

  Returns:
    (`{our dotted param path: numpy array}` for EVERY parameter of the model (with
    `fill_new=False`, every one but `report.new`), report).
  Raises:
    VindluCheckpointError naming every unexpected, missing or misshapen key and every
    parameter of ours that gets no value (`check_vindlu_state`). Nothing is returned
    partially, and nothing is converted before every check has passed.
  """
  from t2v2t_jax.checkpoints.params import flatten_params
  from t2v2t_jax.models.t2v2t import create_model

  plan = check_vindlu_state(state, model_config, model=model, source=source)
  report, shapes = plan.report, plan.shapes
  checks = weight_rules.WeightChecks()
  values: dict[str, np.ndarray] = {}
  for m in plan.rows:
    src = checks.as_float32(state[m.source])  # one float32 copy per storage, if any
    value = apply_transform(m.transform, src, target_shape=shapes[m.target], dst_grid=plan.grid)
    values[m.target] = np.asarray(value, order="C")
    report.loaded.append((m.source, m.target))

  if report.new and fill_new:
    if initial is None:
      if model is None:  # a throw-away model for the initial values, kept in host memory
        with jax.default_device(jax.devices("cpu")[0]):
          model = create_model(model_config, seed=seed)
      initial = flatten_params(model)
    for path in report.new:
      values[path] = np.asarray(initial[path])
  ordered = {path: values[path] for path in shapes if path in values}
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
