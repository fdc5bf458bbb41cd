"""Where a run's starting state comes from (the resume order of `train.py`).

1. the workdir's latest checkpoint: everything, including the data iterator;
2. `config.init_from`: parameters of another run (a workdir, its `checkpoints` folder or
   one step folder) or a VindLU `.pth`; the optimizer starts fresh;
3. `config.pretrained.beit` / `.bert`: Hugging Face weights into a fresh model;
4. from scratch.
Parameters are matched by path; any unmatched or wrongly shaped parameter is an error,
except the temporal position embedding, resized by SPEC's rule (zero-pad more frames,
keep the first T for fewer).
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from t2v2t_jax.models import vision_encoder
from t2v2t_jax.training import checkpointing
from t2v2t_jax.training import train_state as state_lib
from t2v2t_jax.training.optimizer import parameter_path

TEMPORAL_EMBEDDING_SUFFIX = "temporal_pos_embed"


def initial_state(config, *, ckpt, abstract, shardings, tx, data_iter):
  """Returns (state, description of its source)."""
  latest = ckpt.latest_step()
  if latest is not None:
    target = checkpointing.abstract_with_shardings(abstract, shardings)
    state = ckpt.restore(latest, target, data_iter)
    return state, f"resumed from {ckpt.directory}/{latest}"

  state = state_lib.create_sharded_state(config.model, tx, config.seed, shardings)
  if config.init_from:
    params = load_params_from(config.init_from, config, initial=state["params"])
    state["params"] = assign_params(state["params"], params, source=config.init_from)
    state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["params"])
    return state, f"initialised from {config.init_from}"
  pretrained = config.get("pretrained", {})
  if pretrained and (pretrained.get("beit") or pretrained.get("bert")):
    state["params"] = load_pretrained_hf(config, state["params"])
    state["opt_state"] = jax.jit(tx.init, out_shardings=shardings["opt_state"])(state["params"])
    return state, "initialised from Hugging Face weights " + ", ".join(
        f"{k}={v}" for k, v in pretrained.items() if v)
  return state, "from scratch"


def flatten_tree(tree) -> dict:
  """Any params pytree (nnx.State, restored nested dicts) -> {dotted path: array}."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {".".join(parameter_path(path)): leaf for path, leaf in flat}


def unflatten_like(tree, flat: dict):
  """`tree` with each leaf replaced by `flat[its dotted path]`."""
  return jax.tree_util.tree_map_with_path(lambda path, _: flat[".".join(parameter_path(path))], tree)


def load_params_from(source: str, config, initial=None) -> dict:
  """{dotted path: np.ndarray} from a run folder or a VindLU checkpoint.

  `initial`: the run's freshly initialised parameters, which give the values of the
  parameters a VindLU checkpoint lacks (the T2V blocks), so no second model is built.
  """
  if source.endswith((".pth", ".pt", ".bin")):
    from t2v2t_jax.checkpoints import vindlu  # noqa: PLC0415 (torch-free unless needed)
    return vindlu.load_vindlu_params(
        source, config.model, initial=None if initial is None else flatten_tree(initial))
  directory = source
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"init_from={source!r}: no such checkpoint folder or .pth file")
  manager = ocp.CheckpointManager(os.path.abspath(directory), item_names=("state", "data_iter"))
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"init_from={source!r}: no checkpoint steps in {directory}")
  # Restore without a target: arrays come back with the shapes they were saved with, so a
  # 4-frame pretrain can initialise a 12-frame fine-tune.
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  manager.close()
  return flatten_tree(restored["state"]["params"])


def assign_params(params_state, values: dict, *, source: str):
  """Copies `values` {path: array} into `params_state`, resizing temporal embeddings.

  `source` names where the values came from, in error messages.
  """
  source_name = source
  ours = flatten_tree(params_state)
  missing = sorted(set(ours) - set(values))
  unexpected = sorted(set(values) - set(ours))
  if missing or unexpected:
    raise ValueError(f"Parameters of {source_name} do not match the model: "
                     f"missing {missing[:20]}{' ...' if len(missing) > 20 else ''}, "
                     f"unexpected {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''}")
  new = {}
  for path, target in ours.items():
    value = np.asarray(values[path])
    if value.shape != tuple(target.shape):
      if path.endswith(TEMPORAL_EMBEDDING_SUFFIX):
        value = np.asarray(vision_encoder.resize_temporal_embedding(
            value, target.shape[1], mode="zero_pad"))
      else:
        raise ValueError(f"{source_name}: parameter {path} has shape {value.shape}, "
                         f"the model expects {tuple(target.shape)}")
    new[path] = jax.device_put(value.astype(target.dtype), target.sharding)
  return unflatten_like(params_state, new)


def load_pretrained_hf(config, params_state):
  """Hugging Face BEiT and/or BERT weights into the parameters of a fresh model."""
  from t2v2t_jax.checkpoints import hf_beit, hf_bert  # noqa: PLC0415
  # A host copy of the fresh model, rebuilt from its parameters (no second initialisation).
  model = state_lib.merge_model(state_lib.model_graphdef(config.model), jax.device_get(params_state))
  if config.pretrained.get("beit"):
    report = hf_beit.load_beit_into(model.vision_encoder, config.pretrained.beit)
    print(report)
  if config.pretrained.get("bert"):
    report = hf_bert.load_bert_into(model.text_encoder, model.fusion_encoder, config.pretrained.bert)
    print(report)
  _, params = nnx.split(model, nnx.Param)
  shardings = jax.tree.map(lambda x: x.sharding, params_state)
  return jax.device_put(params, shardings)
