"""Parameters-only restore for evaluation and search (`checkpoints/restore.py`): from the
workdir's checkpoint, else from `init_from`, never through the optimizer state."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import demo
from t2v2t_jax import sharding
from t2v2t_jax.checkpoints import restore
from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer
from t2v2t_jax.models.t2v2t import create_model
from t2v2t_jax.tree_paths import flatten


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A workdir whose step-3 checkpoint holds the tiny model's parameters and the state of
  plain SGD with momentum: not the AdamW state the recipe's optimizer would make, so a
  restore that went through the optimizer state could not read it."""
  config = demo.get_config("tiny")
  workdir = tmp_path_factory.mktemp("run")
  _, params = nnx.split(create_model(config.model, seed=5), nnx.Param)
  tx = optax.sgd(0.1, momentum=0.9)
  state = {"params": params, "opt_state": tx.init(params), "step": jnp.int32(3),
           "rng": jnp.zeros((4,), jnp.uint32)}
  ckpt = Checkpointer(str(workdir / "checkpoints"), async_save=False)
  ckpt.save(3, state)
  ckpt.close()
  return config, str(workdir), {k: np.asarray(v) for k, v in flatten(params).items()}


def _assert_same(params, want):
  got = flatten(params)
  assert set(got) == set(want)
  for path, value in want.items():
    np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)


def test_params_of_the_workdirs_checkpoint(saved_run):
  config, workdir, want = saved_run
  mesh = sharding.make_mesh(config.mesh)
  params, graphdef, step = restore.load_params(config, workdir, mesh)
  assert step == 3
  _assert_same(params, want)
  leaf = jax.tree.leaves(params)[0]
  assert isinstance(leaf, jax.Array) and leaf.sharding.mesh.shape == mesh.shape
  # (graphdef, params) is a model.
  model = nnx.merge(graphdef, params)
  assert float(model.temp[...]) == pytest.approx(float(want["temp"]))


def test_params_from_init_from_when_the_workdir_has_none(saved_run, tmp_path, capsys):
  config, run, want = saved_run
  config = config.copy_and_resolve_references()
  config.init_from = run
  params, _, step = restore.load_params(config, str(tmp_path), sharding.make_mesh(config.mesh))
  assert step == 0 and f"Evaluating {run}" in capsys.readouterr().out
  _assert_same(params, want)
  # The same values through the reader a training run uses for init_from.
  values = restore.params_from(run, config.model)
  assert set(values) == set(want) and all(isinstance(v, np.ndarray) for v in values.values())


def test_nothing_to_load(tmp_path):
  config = demo.get_config("tiny")
  with pytest.raises(FileNotFoundError, match="no --config.init_from"):
    restore.load_params(config, str(tmp_path), sharding.make_mesh(config.mesh))
