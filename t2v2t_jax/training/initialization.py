"""Where a run's starting state comes from (the resume order of `train.py`).

1. the workdir's latest checkpoint: everything, including the data iterator;
2. `config.init_from`: parameters of another run (a workdir, its `checkpoints` folder or
   one step folder) or a VindLU `.pth` (`checkpoints/restore.py`); the optimizer starts
   fresh;
3. `config.pretrained.beit` / `.bert`: Hugging Face weights into a fresh model;
4. from scratch.
Parameters are matched by path (`checkpoints/params.py`); any unmatched or wrongly shaped
parameter is an error, except the temporal position embedding, resized by SPEC's rule
(zero-pad more frames, keep the first T for fewer).
"""

from __future__ import annotations

import jax
from flax import nnx

from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax import tree_paths
from t2v2t_jax.checkpoints import params as params_lib
from t2v2t_jax.checkpoints import restore
from t2v2t_jax.models import t2v2t
from t2v2t_jax.training import train_state as state_lib


def initial_state(config, *, ckpt, abstract, shardings, tx, data_iter):
  """Returns (state, description of its source)."""
  latest = ckpt.latest_step()
  if latest is not None:
    state = ckpt.restore(latest, sharding_lib.with_shardings(abstract, shardings), data_iter)
    return state, f"resumed from {ckpt.directory}/{latest}"

  state = state_lib.create_sharded_state(config.model, tx, config.seed, shardings)
  fresh_optimizer = jax.jit(tx.init, out_shardings=shardings["opt_state"])
  if config.init_from:
    # The run's own fresh parameters give VindLU's missing ones (no second model).
    values = restore.params_from(config.init_from, config.model,
                                 initial=tree_paths.flatten(state["params"]))
    state["params"] = params_lib.assign(state["params"], values, source=config.init_from,
                                        complete=True)
    state["opt_state"] = fresh_optimizer(state["params"])
    return state, f"initialised from {config.init_from}"
  pretrained = config.get("pretrained", {})
  if pretrained and (pretrained.get("beit") or pretrained.get("bert")):
    state["params"] = load_pretrained_hf(config, state["params"])
    state["opt_state"] = fresh_optimizer(state["params"])
    return state, "initialised from Hugging Face weights " + ", ".join(
        f"{k}={v}" for k, v in pretrained.items() if v)
  return state, "from scratch"


def load_pretrained_hf(config, params_state):
  """Hugging Face BEiT and/or BERT weights into the parameters of a fresh model."""
  from t2v2t_jax.checkpoints import hf_beit, hf_bert  # noqa: PLC0415
  # A host copy of the fresh model, rebuilt from its parameters (no second initialisation).
  graphdef, _ = t2v2t.abstract_params(config.model)
  model = nnx.merge(graphdef, jax.device_get(params_state))
  if config.pretrained.get("beit"):
    print(hf_beit.load_beit_into(model.vision_encoder, config.pretrained.beit))
  if config.pretrained.get("bert"):
    print(hf_bert.load_bert_into(model.text_encoder, model.fusion_encoder, config.pretrained.bert))
  _, params = nnx.split(model, nnx.Param)
  shardings = jax.tree.map(lambda x: x.sharding, params_state)
  return jax.device_put(params, shardings)
