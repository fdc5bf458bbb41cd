"""Hugging Face BEiT import: parity with transformers, key checks, layouts and resizing."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402

from t2v2t_jax.checkpoints import hf_beit, hf_files  # noqa: E402
from t2v2t_jax.checkpoints.params import flatten_params  # noqa: E402
from t2v2t_jax.models.config import model_config  # noqa: E402
from t2v2t_jax.models.vision_encoder import VideoEncoder  # noqa: E402

WIDTH, DEPTH, HEADS, MLP, IMAGE, PATCH = 32, 2, 2, 64, 32, 16


def hf_config(**overrides):
  kw = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
            intermediate_size=MLP, image_size=IMAGE, patch_size=PATCH, use_mean_pooling=True,
            use_relative_position_bias=True, use_shared_relative_position_bias=False,
            use_absolute_position_embeddings=False, layer_scale_init_value=0.1,
            layer_norm_eps=1e-12, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  kw.update(overrides)
  return transformers.BeitConfig(**kw)


def randomized(model, seed):
  """HF initialises tables, CLS and biases to zero: give every tensor a random value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.2
      p.copy_(1.0 + noise if "layernorm" in name and name.endswith("weight") else noise)
  return model.eval()


def our_cfg(image_size=IMAGE, depth=DEPTH):
  c = model_config("test/16").vision
  c.update(dict(width=WIDTH, depth=depth, num_heads=HEADS, mlp_dim=MLP, patch_size=PATCH,
                image_size=image_size, num_frames=4))
  return c


@nnx.jit
def _forward(model, x):
  h, pooled = model(x)
  return h, pooled


def hf_outputs(model, images_nhwc):
  with torch.no_grad():
    out = model(pixel_values=torch.from_numpy(np.asarray(images_nhwc)).permute(0, 3, 1, 2))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def images(b, size=IMAGE, seed=0):
  return np.random.default_rng(seed).normal(size=(b, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_beit")
  torch.manual_seed(0)
  model = randomized(transformers.BeitModel(hf_config()), seed=0)
  model.save_pretrained(root / "beit_model")
  cls = randomized(transformers.BeitForImageClassification(hf_config(num_labels=3)), seed=1)
  cls.save_pretrained(root / "beit_cls")
  shared = randomized(transformers.BeitModel(hf_config(use_relative_position_bias=False,
                                                       use_shared_relative_position_bias=True)),
                      seed=2)
  shared.save_pretrained(root / "beit_shared")
  return dict(root=root, model=model, cls=cls, shared=shared)


@pytest.fixture(scope="module")
def fresh_encoder():
  return VideoEncoder(our_cfg(), rngs=nnx.Rngs(0))


def test_saved_layout_is_legacy(ckpt):
  keys = load_file(str(ckpt["root"] / "beit_model" / "model.safetensors"))
  assert "encoder.layer.0.attention.attention.query.weight" in keys
  assert "pooler.layernorm.weight" in keys


# (a) ------------------------------------------------------------------------------------

def test_matches_transformers_beit_model(ckpt, fresh_encoder):
  enc = nnx.clone(fresh_encoder)
  report = hf_beit.load_beit_into(enc, str(ckpt["root"] / "beit_model"))
  assert report.prefix == "" and report.dropped == {} and not report.warnings
  assert report.new and all(hf_beit.is_temporal_param(p) for p in report.new)
  assert len(report.loaded) + len(report.new) == len(flatten_params(enc))
  # Newly initialised temporal parts keep their init: zero scale, zero embedding.
  params = flatten_params(enc)
  assert float(params["layers.1.temporal.scale"]) == 0.0
  assert not np.any(np.asarray(params["embeddings.temporal_pos_embed"]))

  x = images(2)
  ref_h, ref_p = hf_outputs(ckpt["model"], x)
  h, pooled = _forward(enc, jnp.asarray(x)[:, None])
  np.testing.assert_allclose(h[:, 0], ref_h, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pooled[:, 0], ref_p, atol=1e-4, rtol=1e-4)

  # As a 2-frame video (temporal scale 0): each frame equals transformers on that image.
  video = np.stack([x, images(2, seed=1)], axis=1)
  h, pooled = _forward(enc, jnp.asarray(video))
  for t in range(2):
    ref_h, ref_p = hf_outputs(ckpt["model"], video[:, t])
    np.testing.assert_allclose(h[:, t], ref_h, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pooled[:, t], ref_p, atol=1e-4, rtol=1e-4)


def test_other_resolution_matches_transformers(ckpt, fresh_encoder):
  """A 2x2-grid checkpoint at 48x48 input (3x3 grid): tables resized at import (model
  built for 48) or on the fly (model built for 32) must match transformers, which resizes
  the tables bilinearly at run time."""
  x = images(1, size=48, seed=3)
  ref_h, ref_p = hf_outputs(ckpt["model"], x)
  enc48 = VideoEncoder(our_cfg(image_size=48), rngs=nnx.Rngs(0))
  report = hf_beit.load_beit_into(enc48, str(ckpt["root"] / "beit_model"))
  assert len(report.resized) == DEPTH
  assert flatten_params(enc48)["layers.0.relative_position_bias.table"].shape == (28, HEADS)
  enc32 = nnx.clone(fresh_encoder)
  hf_beit.load_beit_into(enc32, str(ckpt["root"] / "beit_model"))
  for enc in (enc48, enc32):
    h, pooled = _forward(enc, jnp.asarray(x)[:, None])
    np.testing.assert_allclose(h[:, 0], ref_h, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(pooled[:, 0], ref_p, atol=1e-4, rtol=1e-4)


def test_classification_checkpoint_with_prefix_and_dropped_keys(ckpt, fresh_encoder, tmp_path):
  folder = tmp_path / "cls_plus"
  shutil.copytree(ckpt["root"] / "beit_cls", folder)
  tensors = load_file(str(folder / "model.safetensors"))
  # Buffers and heads older checkpoints carry: all deliberately dropped.
  tensors["beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_index"] = \
      np.zeros((5, 5), np.int64)
  tensors["beit.embeddings.mask_token"] = np.zeros((1, 1, WIDTH), np.float32)
  save_file(tensors, str(folder / "model.safetensors"))

  enc = nnx.clone(fresh_encoder)
  report = hf_beit.load_beit_into(enc, str(folder))
  assert report.prefix == "beit."
  assert sorted(report.dropped) == sorted([
      "beit.embeddings.mask_token",
      "beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_index",
      "classifier.bias", "classifier.weight"])
  x = images(2)
  ref_h, ref_p = hf_outputs(ckpt["cls"].beit, x)
  h, pooled = _forward(enc, jnp.asarray(x)[:, None])
  np.testing.assert_allclose(h[:, 0], ref_h, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pooled[:, 0], ref_p, atol=1e-4, rtol=1e-4)


def test_shared_relative_position_bias_checkpoint(ckpt, fresh_encoder):
  enc = nnx.clone(fresh_encoder)
  hf_beit.load_beit_into(enc, str(ckpt["root"] / "beit_shared"))
  params = flatten_params(enc)
  np.testing.assert_array_equal(params["layers.0.relative_position_bias.table"],
                                params["layers.1.relative_position_bias.table"])
  x = images(2, seed=4)
  ref_h, ref_p = hf_outputs(ckpt["shared"], x)
  h, pooled = _forward(enc, jnp.asarray(x)[:, None])
  np.testing.assert_allclose(h[:, 0], ref_h, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pooled[:, 0], ref_p, atol=1e-4, rtol=1e-4)


def test_pytorch_bin_with_in_memory_names_loads_the_same(ckpt, fresh_encoder, tmp_path):
  folder = tmp_path / "bin"
  folder.mkdir()
  shutil.copy(ckpt["root"] / "beit_model" / "config.json", folder / "config.json")
  state = ckpt["model"].state_dict()       # transformers>=5 names: layers.0.attention.q_proj...
  assert any(k.startswith("layers.0.attention.q_proj") for k in state)
  torch.save(state, folder / "pytorch_model.bin")
  a, b = nnx.clone(fresh_encoder), nnx.clone(fresh_encoder)
  hf_beit.load_beit_into(a, str(folder))
  hf_beit.load_beit_into(b, str(ckpt["root"] / "beit_model" / "model.safetensors"))
  pa, pb = flatten_params(a), flatten_params(b)
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


# (e) ------------------------------------------------------------------------------------

def _edited_copy(src, dst, edit):
  shutil.copytree(src, dst)
  tensors = load_file(str(dst / "model.safetensors"))
  edit(tensors)
  save_file(tensors, str(dst / "model.safetensors"))
  return str(dst)


def test_unexpected_key_is_an_error_naming_it(ckpt, fresh_encoder, tmp_path):
  extra = "encoder.layer.1.attention.attention.extra_gate"
  folder = _edited_copy(ckpt["root"] / "beit_model", tmp_path / "extra",
                        lambda t: t.__setitem__(extra, np.zeros(3, np.float32)))
  enc = nnx.clone(fresh_encoder)
  before = flatten_params(enc)
  with pytest.raises(hf_beit.CheckpointMismatchError, match=extra):
    hf_beit.load_beit_into(enc, folder)
  after = flatten_params(enc)   # nothing written on failure
  assert all(np.array_equal(before[k], after[k]) for k in before)


def test_missing_key_is_an_error_naming_it(ckpt, fresh_encoder, tmp_path):
  gone = "encoder.layer.1.lambda_2"
  folder = _edited_copy(ckpt["root"] / "beit_model", tmp_path / "missing",
                        lambda t: t.pop(gone))
  with pytest.raises(hf_beit.CheckpointMismatchError, match=rf"{gone}.*layers\.1\.lambda_2"):
    hf_beit.load_beit_into(nnx.clone(fresh_encoder), folder)


def test_architecture_mismatch_is_an_error(ckpt, tmp_path):
  enc = VideoEncoder(our_cfg(depth=1), rngs=nnx.Rngs(0))
  with pytest.raises(hf_beit.CheckpointMismatchError, match="depth: checkpoint 2 vs model 1"):
    hf_beit.load_beit_into(enc, str(ckpt["root"] / "beit_model"))
  # Without config.json the key check catches it instead, naming the surplus layer's keys.
  folder = tmp_path / "noconfig"
  shutil.copytree(ckpt["root"] / "beit_model", folder)
  os.remove(folder / "config.json")
  with pytest.raises(hf_beit.CheckpointMismatchError, match=r"encoder\.layer\.1\.lambda_1"):
    hf_beit.load_beit_into(enc, str(folder))


# config and transforms --------------------------------------------------------------------

def test_vision_config_from_hf(ckpt):
  with open(ckpt["root"] / "beit_model" / "config.json") as f:
    cfg = json.load(f)
  assert hf_beit.vision_config_from_hf(cfg) == dict(
      width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP, patch_size=PATCH,
      image_size=IMAGE, layer_norm_eps=1e-12, layer_scale_init=0.1)
  with pytest.raises(ValueError, match="use_absolute_position_embeddings"):
    hf_beit.vision_config_from_hf({**cfg, "use_absolute_position_embeddings": True})
  with pytest.raises(ValueError, match="use_mean_pooling"):
    hf_beit.vision_config_from_hf({**cfg, "use_mean_pooling": False})


def test_key_map_with_prefix():
  keys = [m.source for m in hf_beit.beit_key_map(2, src_prefix="vision_encoder.")]
  assert len(keys) == len(set(keys)) and all(k.startswith("vision_encoder.") for k in keys)


def test_reads_half_precision_safetensors_and_reports_missing_paths(tmp_path):
  save_file({"a": np.ones((2, 2), np.float16)}, str(tmp_path / "w.safetensors"))
  config, tensors, _ = hf_files.read_hf_checkpoint(str(tmp_path / "w.safetensors"))
  assert config is None and tensors["a"].dtype == np.float32
  with pytest.raises(FileNotFoundError):
    hf_files.read_hf_checkpoint(str(tmp_path / "nothing_here"))
  with pytest.raises(FileNotFoundError, match="holds none of"):
    hf_files.read_hf_checkpoint(str(tmp_path))


def test_run_started_from_pretrained_beit(ckpt, tmp_path, monkeypatch):
  """`config.pretrained.beit` at the start of a run: the video encoder reproduces
  transformers' BEiT, everything else keeps the run's own init, one model is built."""
  from flax import nnx as nnx_lib  # noqa: PLC0415
  from t2v2t_jax import sharding  # noqa: PLC0415
  from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer  # noqa: PLC0415
  from t2v2t_jax.models.t2v2t import abstract_params  # noqa: PLC0415
  from t2v2t_jax.recipes import load_recipe  # noqa: PLC0415
  from t2v2t_jax.training import initialization  # noqa: PLC0415
  from t2v2t_jax.training import optimizer as optimizer_lib  # noqa: PLC0415
  from t2v2t_jax.training import train_state as state_lib  # noqa: PLC0415
  from t2v2t_jax.tree_paths import flatten  # noqa: PLC0415
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cfg = load_recipe(os.path.join(repo, "configs", "msrvtt_ft.py") + ":tiny")
  with cfg.unlocked():
    cfg.model.dtype = "float32"  # compared with transformers' float32 BEiT below
    cfg.model.vision.update(dict(width=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_dim=MLP,
                                 patch_size=PATCH, image_size=IMAGE))
    cfg.model.text.update(dict(width=WIDTH, num_heads=HEADS))  # t2v2t: equal widths
    cfg.pretrained.beit, cfg.pretrained.bert = str(ckpt["root"] / "beit_model"), ""
  mesh = sharding.make_mesh(cfg.mesh)
  tx = optimizer_lib.make_optimizer(cfg.optimizer, 10)
  abstract = state_lib.abstract_state(cfg.model, tx, cfg.seed)
  shardings = state_lib.state_shardings(abstract, mesh)
  fresh = flatten(state_lib.create_sharded_state(cfg.model, tx, cfg.seed, shardings)["params"])

  seeded_builds = []  # shape-only builds (eval_shape) pass no seed
  real_create = state_lib.create_model
  for module in (state_lib, initialization):  # wherever a start-up could build one
    monkeypatch.setattr(module, "create_model", raising=False, value=lambda c, **kw: (
        "seed" in kw and seeded_builds.append(kw)) or real_create(c, **kw))
  state, source = initialization.initial_state(
      cfg, ckpt=Checkpointer(str(tmp_path / "ckpt")), abstract=abstract,
      shardings=shardings, tx=tx, data_iter=None)
  assert "Hugging Face" in source and len(seeded_builds) == 1

  model = nnx_lib.merge(abstract_params(cfg.model)[0], state["params"])
  x = images(2)
  ref_h, ref_p = hf_outputs(ckpt["model"], x)
  h, pooled = _forward(model.vision_encoder, jnp.asarray(x)[:, None])
  np.testing.assert_allclose(h[:, 0], ref_h, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pooled[:, 0], ref_p, atol=1e-4, rtol=1e-4)
  got = flatten(state["params"])
  for path, value in got.items():
    if not path.startswith("vision_encoder.") or hf_beit.is_temporal_param(path):
      np.testing.assert_array_equal(np.asarray(value), np.asarray(fresh[path]), err_msg=path)
