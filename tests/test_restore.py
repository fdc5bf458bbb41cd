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


# -- issue 25: `init_from` a run folder is checked as a resume checks the workdir's steps -------

import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402

import tensorstore as ts  # noqa: E402

from t2v2t_jax.checkpoints import run_checkpoints  # noqa: E402
from t2v2t_jax.errors import Refusal  # noqa: E402


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
  """A run folder with steps 2 and 3 of the tiny model, step 3's weights step 2's + 1."""
  config = demo.get_config("tiny")
  root = tmp_path_factory.mktemp("two")
  _, params = nnx.split(create_model(config.model, seed=5), nnx.Param)
  ckpt = Checkpointer(str(root / "checkpoints"), async_save=False)
  for step in (2, 3):
    shifted = jax.tree.map(lambda x, s=step: x + (s - 2), params)
    ckpt.save(step, {"params": shifted, "step": jnp.int32(step)})
  ckpt.close()
  return config, root, {k: np.asarray(v) for k, v in flatten(params).items()}


def _copy(two_steps, tmp_path, drop=()):
  config, root, base = two_steps
  run = tmp_path / "run"
  shutil.copytree(root, run)
  for step in drop:
    shutil.rmtree(run / "checkpoints" / str(step))
  return config, run, base


def _data_file(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
           for f in fs if os.sep + "d" + os.sep in os.path.join(r, f)]
  return max(files, key=os.path.getsize)


def _flip(path):
  data = bytearray(open(path, "rb").read())
  data[len(data) // 2] ^= 0x01
  open(path, "wb").write(bytes(data))


def test_init_from_a_step_that_fails_its_record_falls_back_by_name(two_steps, tmp_path, capsys):
  """One flipped byte used to change the weights without a word."""
  config, run, base = _copy(two_steps, tmp_path)
  step3 = run / "checkpoints" / "3"
  _flip(_data_file(str(step3)))
  values = restore.params_from(str(run), config.model)
  out = capsys.readouterr().out
  assert f"Warning: init_from {step3} is damaged: state/" in out
  assert "does not match its checksum" in out and f"using {run / 'checkpoints' / '2'}" in out
  np.testing.assert_array_equal(values["text_proj.kernel"], base["text_proj.kernel"])
  # Both steps damaged: refused, naming the folder and each step.
  _flip(_data_file(str(run / "checkpoints" / "2")))
  with pytest.raises(Refusal, match=rf"init_from='{run}': no usable checkpoint step in "
                                    rf"{run / 'checkpoints'} \(step 3: state/.*; step 2: state/"):
    restore.params_from(str(run), config.model)


def _rewrite_metadata(step_dir, text):
  (step_dir / "state" / "_METADATA").write_text(text)
  run_checkpoints.write_integrity(str(step_dir))  # as a crafted folder would carry


CRAFTED_METADATA = {
    "a_list": ("[1, 2]", "not Orbax metadata"),
    # Not JSON to Python: damage found by the step check, as on resume (the file is named).
    "nested_deep": ("[" * 100_000 + "]" * 100_000,
                    "step 3: state/_METADATA is not valid JSON \\(RecursionError\\)"),
    "entry_without_keys": (json.dumps({"tree_metadata": {"x": {}}}), "the entry 'x' is not of"),
    "no_params": (json.dumps({"tree_metadata": {"('step',)": {
        "key_metadata": [{"key": "step", "key_type": 2}],
        "value_metadata": {"value_type": "jax.Array", "write_shape": []}}}}),
        "the state has no 'params' entry"),
}


@pytest.mark.parametrize("kind", CRAFTED_METADATA)
def test_crafted_metadata_is_a_refusal_naming_the_file(kind, two_steps, tmp_path):
  config, run, _ = _copy(two_steps, tmp_path, drop=[2])
  step3 = run / "checkpoints" / "3"
  text, message = CRAFTED_METADATA[kind]
  _rewrite_metadata(step3, text)
  if kind != "nested_deep":
    message = rf"^{step3 / 'state' / '_METADATA'}: {message}"
  with pytest.raises(Refusal, match=message):
    restore.params_from(str(run), config.model)


def test_deleted_metadata_is_damage_named_by_file(two_steps, tmp_path):
  config, run, _ = _copy(two_steps, tmp_path, drop=[2])
  os.remove(run / "checkpoints" / "3" / "state" / "_METADATA")
  with pytest.raises(Refusal, match=r"no usable checkpoint step .*step 3: state/_METADATA is "
                                    r"missing"):
    restore.params_from(str(run), config.model)


def _claim_shape(step_dir, name, shape):
  """Rewrites the stored shape of one array in the step's OCDBT store (its `.zarray`), as
  a crafted folder could, and records the result so that the integrity check passes."""
  kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{step_dir}/state/"}).result()
  key = next(k for k in kv.list().result() if k.endswith(b"/.zarray") and name in k.decode())
  meta = json.loads(kv.read(key).result().value)
  meta["shape"] = meta["chunks"] = list(shape)
  kv.write(key, json.dumps(meta).encode()).result()
  run_checkpoints.write_integrity(str(step_dir))


@pytest.mark.parametrize("with_model", [True, False])
def test_a_zarray_claiming_a_huge_shape_is_refused_before_restoring(with_model, two_steps,
                                                                    tmp_path):
  """Used as the restore target, [1e6, 1e6] aborted the process (SIGABRT)."""
  config, run, base = _copy(two_steps, tmp_path, drop=[2])
  step3 = run / "checkpoints" / "3"
  _claim_shape(step3, "text_proj.kernel", (1_000_000, 1_000_000))
  if with_model:
    want = tuple(base["text_proj.kernel"].shape)
    message = r"does not fit the model of the config: text_proj.kernel is stored as " \
              rf"\(1000000, 1000000\), the model has \({want[0]}, {want[1]}\)"
  else:  # export without --config: bounded by the largest model of the project
    message = r"stored shapes larger than any model of this project \(text_proj.kernel"
  with pytest.raises(Refusal, match=rf"^{step3 / 'state'}: {message}"):
    restore.params_from(str(run), config.model if with_model else None)


def test_a_model_of_other_shapes_is_refused_before_restoring(two_steps, tmp_path, monkeypatch):
  config, run, base = _copy(two_steps, tmp_path)
  width, embed = base["text_proj.kernel"].shape
  other = config.copy_and_resolve_references()
  other.model.embed_dim = config.model.embed_dim * 2
  from orbax.checkpoint import CheckpointManager

  def no_restore(*a, **k):
    raise AssertionError("restored before the shapes were compared")
  monkeypatch.setattr(CheckpointManager, "restore", no_restore)
  with pytest.raises(Refusal, match=r"does not fit the model of the config: .*text_proj.kernel "
                                    rf"is stored as \({width}, {embed}\), the model has "
                                    rf"\({width}, {2 * embed}\)"):
    restore.params_from(str(run), other.model)


def test_init_from_a_step_folder_holding_another_step(two_steps, tmp_path, capsys):
  config, run, base = _copy(two_steps, tmp_path)
  ckpts = run / "checkpoints"
  shutil.rmtree(ckpts / "3")
  shutil.copytree(ckpts / "2", ckpts / "3")
  values = restore.params_from(str(run), config.model)
  assert "integrity.json is step 2's" in capsys.readouterr().out
  np.testing.assert_array_equal(values["text_proj.kernel"], base["text_proj.kernel"])


def test_init_from_a_run_that_saved_nan_weights_is_refused_by_name(tmp_path):
  """The rule every weight source is held to: a step that restores cleanly (its integrity
  record matches) but holds NaN, as a diverged run might have saved, is refused, naming
  the step folder and the parameter."""
  config = demo.get_config("tiny")
  _, params = nnx.split(create_model(config.model, seed=5), nnx.Param)
  kernel = params["text_proj"]["kernel"]
  kernel[...] = jnp.asarray(kernel[...]).at[0, 0].set(jnp.nan)
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  ckpt.save(1, {"params": params, "step": jnp.int32(1)})
  ckpt.close()
  with pytest.raises(Refusal, match=r"init_from .*checkpoints/1: text_proj.kernel holds 1 "
                                    r"non-finite value"):
    restore.params_from(str(tmp_path), config.model)
