"""Where a run's starting state comes from (the resume order of `train.py`).

1. the workdir's latest checkpoint: everything, including the data iterator;
2. `config.init_from`: parameters of another run (a workdir, its `checkpoints` folder or
   one step folder) or a VindLU `.pth` (`checkpoints/restore.py`, `checkpoints/vindlu.py`);
   the optimizer starts fresh;
3. `config.pretrained.beit` / `.bert`: Hugging Face weights into a fresh model;
4. from scratch.
Parameters are matched by path (`checkpoints/params.py`); any unmatched or wrongly shaped
parameter is an error, except the temporal position embedding, resized by SPEC's rule
(zero-pad more frames, keep the first T for fewer).

The weights of 2. and 3. are fetched and checked by `fetch_weights` before anything is
compiled or the data pipeline starts (`train.py` calls it once it knows the run will not
resume): a wrong name, a missing file or a key that does not fit fails in seconds, not
after minutes of compilation. Checked against the abstract model (shapes only, no
memory); `initial_state` then writes the fetched values into the run's freshly
initialised parameters, so no second model is built and the parameters VindLU or
Hugging Face lack keep the run's own initial values. Nothing here needs torch.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from t2v2t_jax import tree_paths
from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.checkpoints import params as params_lib
from t2v2t_jax.checkpoints import restore
from t2v2t_jax.models import t2v2t
from t2v2t_jax.training import train_state as state_lib


@dataclasses.dataclass
class FetchedWeights:
  """What `fetch_weights` read and checked, ready for `initial_state`.

  values: `{our dotted parameter path: numpy array}`.
  keep_initial: the parameters that keep the run's own initial values (VindLU's T2V
    blocks, what a Hugging Face backbone lacks); every other parameter is in `values`.
  description: how the run's log names its start ("initialised from ...").
  source: the name of the weights in error messages.
  """
  values: dict[str, np.ndarray]
  keep_initial: frozenset[str]
  description: str
  source: str
  reports: list = dataclasses.field(default_factory=list)


def _pretrained(config) -> dict[str, str]:
  pretrained = config.get("pretrained", None) or {}
  return {k: str(pretrained.get(k)) for k in ("beit", "bert") if pretrained.get(k)}


def fetch_weights(config) -> FetchedWeights | None:
  """Reads and checks the weights `config.init_from` or `config.pretrained.beit/bert`
  name (for a run that will not resume); None when there are none.

  Raises FileNotFoundError / ValueError (one line naming the file, folder or repository)
  when a name has no usable weights, and the importers' errors (every unexpected,
  missing or misshapen key) when they do not fit the model of `config.model`.
  """
  if config.get("init_from"):
    return _fetch_init_from(config)
  if _pretrained(config):
    return _fetch_pretrained(config)
  return None


def _fetch_init_from(config) -> FetchedWeights:
  source = str(config.init_from)
  description = f"initialised from {source}"
  if source.endswith(restore.TORCH_SUFFIXES):
    from t2v2t_jax.checkpoints import vindlu  # noqa: PLC0415
    ckpt = vindlu.read_vindlu_checkpoint(source)
    # Checked against the abstract model of `config.model` (every key, shape, buffer).
    # The parameters VindLU lacks are left out: the run's own initial values fill them.
    values, report = vindlu.import_vindlu(ckpt.state, config.model, source=ckpt.source,
                                          fill_new=False)
    report.upcast = ckpt.upcast
    if jax.process_index() == 0:
      print(report.table(), flush=True)
    return FetchedWeights(values=values, keep_initial=frozenset(report.new), source=source,
                          description=description, reports=[report])
  # Another run's parameters, read as saved (a 4-frame run may start a 12-frame one).
  values = restore.params_from(source, config.model, pick=config.get("pick_checkpoint", "best"))
  _, abstract = t2v2t.abstract_params(config.model)
  shapes = {p: tuple(v.shape) for p, v in tree_paths.flatten(abstract).items()}
  _check_paths_and_shapes(values, shapes, frozenset(), source)
  return FetchedWeights(values=values, keep_initial=frozenset(), source=source,
                        description=description)


def _check_paths_and_shapes(values, shapes, keep, source) -> None:
  """`params.assign`'s checks, on shapes only (before the run's parameters exist)."""
  problems = []
  unknown = sorted(set(values) - set(shapes))
  if unknown:
    problems.append("no such parameter in the model: " + ", ".join(unknown[:20]))
  missing = sorted(set(shapes) - set(values) - keep)
  if missing:
    problems.append("missing: " + ", ".join(missing[:20]))
  for path, value in values.items():
    want = shapes.get(path)
    if want is None or tuple(np.shape(value)) == want:
      continue
    if path.endswith(params_lib.TEMPORAL_EMBEDDING_SUFFIX) and np.ndim(value) == 4 \
        and len(want) == 4:
      continue  # resized by `params.assign` (SPEC 1's rule)
    problems.append(f"shape mismatch for {path!r}: the model expects {want}, got "
                    f"{tuple(np.shape(value))}")
  if problems:
    raise params_lib.ParamAssignError(f"cannot assign the parameters of {source}:\n  "
                                      + "\n  ".join(problems))


def _fetch_pretrained(config) -> FetchedWeights:
  from t2v2t_jax.checkpoints import hf_beit, hf_bert, hf_files  # noqa: PLC0415
  names = _pretrained(config)
  # Read first (a wrong name fails before the model is even traced), then checked against
  # the abstract model: attributes and shapes only.
  checkpoints = {k: hf_files.read_hf_checkpoint(v) for k, v in names.items()}
  model = t2v2t.abstract_model(config.model)
  values: dict[str, np.ndarray] = {}
  reports = []
  if "beit" in checkpoints:
    updates, _, report = hf_beit.beit_values(model.vision_encoder, checkpoints["beit"])
    values.update({f"vision_encoder.{p}": v for p, v in updates.items()})
    reports.append(report)
  if "bert" in checkpoints:
    updates, _, report = hf_bert.bert_values(model.text_encoder, model.fusion_encoder,
                                             checkpoints["bert"])
    for owner, owner_updates in updates.items():
      values.update({f"{owner}.{p}": v for p, v in owner_updates.items()})
    reports.append(report)
  if jax.process_index() == 0:
    for report in reports:
      print(report.table(), flush=True)
  shapes = params_lib.param_shapes(model)
  _check_paths_and_shapes(values, shapes, frozenset(set(shapes) - set(values)),
                          ", ".join(names.values()))
  return FetchedWeights(
      values=values, keep_initial=frozenset(set(shapes) - set(values)),
      source=", ".join(names.values()), reports=reports,
      description="initialised from Hugging Face weights " + ", ".join(
          f"{k}={v}" for k, v in names.items()))


def initial_state(config, *, ckpt, abstract, shardings, tx, data_iter, fetched=None):
  """Returns (state, description of its source).

  `fetched`: what `fetch_weights(config)` returned (a run that resumes ignores it); when
  not given, the weights are fetched here.
  """
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, sharding_lib.with_shardings(abstract, shardings), data_iter)
    return state, f"resumed from {ckpt.directory}/{latest}"

  if fetched is None:
    fetched = fetch_weights(config)
  state = state_lib.create_sharded_state(config.model, tx, config.seed, shardings)
  if fetched is None:
    return state, "from scratch"
  # Written into the run's own fresh parameters: those in `keep_initial` keep their values.
  state["params"] = params_lib.assign(state["params"], fetched.values, source=fetched.source)
  missing = set(tree_paths.flatten(state["params"])) - set(fetched.values) - fetched.keep_initial
  if missing:
    raise params_lib.ParamAssignError(f"cannot assign the parameters of {fetched.source}: "
                                      f"missing: {', '.join(sorted(missing)[:20])}")
  fresh_optimizer = jax.jit(tx.init, out_shardings=shardings["opt_state"])
  state["opt_state"] = fresh_optimizer(state["params"])
  return state, fetched.description
