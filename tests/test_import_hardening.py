"""Issue 25, importers after the reader: every finding as a test.

Small crafted inputs must be refused (one `Refusal`, naming the file and key or field)
before anything proportional to what they claim is allocated or built. Memory is
measured with tracemalloc, which numpy reports its array buffers to.
"""

import json
import os
import sys
import time
import tracemalloc

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not first: benchmarks/input_pipeline.py would shadow the input_pipeline package
# (in this process and in every process it spawns, which inherit sys.path).
sys.path.append(os.path.join(ROOT, "benchmarks"))

import crafted_checkpoints as crafted  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from t2v2t_jax import convert  # noqa: E402
from t2v2t_jax.checkpoints import (hf_beit, hf_bert, hf_files, import_report, key_mapping,  # noqa: E402
                                   params, vindlu, vindlu_config, weight_rules)
from t2v2t_jax.errors import Refusal  # noqa: E402

MiB = 1 << 20


class Peak:
  """Peak bytes traced (numpy buffers included) inside the `with` block."""

  def __enter__(self):
    tracemalloc.start()
    tracemalloc.reset_peak()
    self.t0 = time.perf_counter()
    return self

  def __exit__(self, *exc):
    self.seconds = time.perf_counter() - self.t0
    self.bytes = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return False


def valid_state():
  return dict(crafted._valid_state())


def save_pth(path, state):
  path.write_bytes(crafted._torch_save_bytes({"model": state}))
  return str(path)


# -- one fp16 storage under many keys: converted once, not once per key ----------------------

def test_one_fp16_storage_under_many_keys_is_converted_once(tmp_path):
  state = {k: torch.from_numpy(np.array(v)) for k, v in valid_state().items()}
  shared = torch.ones(1 << 20, dtype=torch.float16)  # 2 MiB, 4 MiB as float32
  for i in range(100):
    state[f"extra.{i}"] = shared
  path = save_pth(tmp_path / "shared.pth", state)
  with Peak() as peak, pytest.raises(vindlu.VindluCheckpointError) as e:
    vindlu.load_vindlu_params(path, crafted.tiny_model_config(), verbose=False)
  assert "unexpected source key 'extra.0'" in str(e.value)
  assert peak.bytes < 40 * MiB, peak.bytes  # was 100 float32 copies: 400 MiB

  # The numpy conversion of a state dict: one float32 array for all keys of a storage.
  arrays, half = vindlu.state_dict_to_numpy({"a": shared, "b": shared, "c": shared[:10]})
  assert arrays["a"] is arrays["b"] and arrays["a"].dtype == np.float32
  assert arrays["c"].shape == (10,) and half == ["a", "b", "c"]


def test_one_fp16_storage_under_many_keys_in_a_hf_bin(tmp_path):
  shared = torch.ones(1 << 20, dtype=torch.float16)
  torch.save({f"encoder.layer.{i}.x": shared for i in range(100)},
             tmp_path / "pytorch_model.bin")
  with Peak() as peak:
    _, tensors, _ = hf_files.read_hf_checkpoint(str(tmp_path))
  assert peak.bytes < 40 * MiB, peak.bytes
  assert tensors["encoder.layer.0.x"] is tensors["encoder.layer.99.x"]
  assert tensors["encoder.layer.0.x"].dtype == np.float32


# -- shapes before building, padding or ranges -----------------------------------------------

def test_zero_element_tensors_are_refused_before_convert_builds_a_model(tmp_path):
  state = valid_state()
  state["vision_encoder.embeddings.cls_token"] = np.zeros((1, 0, 1024), np.float32)
  state["text_encoder.embeddings.word_embeddings.weight"] = np.zeros((0, 1024), np.float32)
  path = tmp_path / "empty.pth"
  path.write_bytes(crafted._save_state(state))
  t0 = time.perf_counter()
  with pytest.raises(vindlu.VindluCheckpointError, match=r"2 tensor\(s\) hold no elements.*"
                     r"'vision_encoder\.embeddings\.cls_token'"):
    convert.vindlu_to_orbax(str(path), str(tmp_path / "out"), verbose=False)
  assert time.perf_counter() - t0 < 5
  assert not (tmp_path / "out").exists()


def test_layers_stated_by_stray_keys_are_refused_before_building(tmp_path):
  """Depth comes from key names: 40 layers of 1-element tensors must not describe a model
  that is then built (every layer must look like the first)."""
  state = valid_state()
  layer0 = {k: v for k, v in state.items() if k.startswith("vision_encoder.encoder.layer.0.")}
  for i in range(2, 40):
    for k in layer0:
      state[k.replace(".layer.0.", f".layer.{i}.")] = np.ones(1, np.float32)
  with pytest.raises(vindlu.VindluCheckpointError, match="the layers are not alike.*vision "
                     "layer 2 differs from vision layer 0"):
    vindlu_config.infer_model_config(state, "v2t", source="x.pth")
  assert vindlu_config.infer_model_config(valid_state(), "v2t").vision.depth == 2


def test_zero_element_temporal_embedding_is_not_padded(tmp_path):
  state = valid_state()
  key = "vision_encoder.embeddings.temporal_position_embeddings"
  state[key] = np.zeros((1, 0, 1, 10 ** 9), np.float32)  # padding it: T x 4 GB
  with Peak() as peak, pytest.raises(vindlu.VindluCheckpointError) as e:
    vindlu.import_vindlu(state, crafted.tiny_model_config(), source="x.pth")
  assert f"source key '{key}' is empty" in str(e.value)
  assert peak.bytes < 40 * MiB
  # A non-empty one of the wrong width: refused on its shape, which is computed without
  # padding anything.
  assert key_mapping.transformed_shape("temporal_zero_pad", (1, 1, 1, 10 ** 9),
                                       target_shape=(1, 4, 1, 32)) == (1, 4, 1, 10 ** 9)
  state[key] = np.ones((1, 1, 1, 64), np.float32)
  with pytest.raises(vindlu.VindluCheckpointError, match=r"expects \(1, 4, 1, 32\), got "
                     r"\(1, 4, 1, 64\)"):
    vindlu.import_vindlu(state, crafted.tiny_model_config(), source="x.pth")
  # And `params.assign` compares shapes before resizing.
  tree = {"vision_encoder": {"embeddings": {"temporal_pos_embed": np.zeros((1, 4, 1, 32))}}}
  with Peak() as peak, pytest.raises(params.ParamAssignError, match=r"expects \(1, 4, 1, 32\)"):
    params.assign(tree, {"vision_encoder.embeddings.temporal_pos_embed":
                         np.zeros((1, 0, 1, 10 ** 9), np.float32)})
  assert peak.bytes < 10 * MiB


def test_a_layer_index_of_30_million_makes_no_range():
  state = valid_state()
  state["vision_encoder.encoder.layer.30000000.temp_model.linear.weight"] = \
      np.ones((2, 2), np.float32)
  with Peak() as peak:
    with pytest.raises(vindlu.VindluCheckpointError, match="belongs to vision layer 30000000"):
      vindlu.import_vindlu(state, crafted.tiny_model_config(), source="x.pth")
    with pytest.raises(vindlu.VindluCheckpointError, match="names layer 30000000, more than"):
      vindlu_config.infer_model_config(state, "v2t", source="x.pth")
    names = import_report.compact_names(["a.0.b", "a.30000000.b"])
    surplus = hf_bert._surplus_layers({"encoder.layer.30000000.x": 0, "encoder.layer.x.y": 0}, 2)
  assert names == ["a.{0,30000000}.b"] and list(surplus) == ["encoder.layer.30000000.x"]
  assert peak.bytes < 40 * MiB and peak.seconds < 10


# -- dtypes --------------------------------------------------------------------------------

def test_float8_weights_are_converted_not_a_type_error(tmp_path):
  state = valid_state()
  w = "vision_proj.weight"
  state[w] = state[w].astype(ml_dtypes.float8_e4m3fn)
  values, _ = vindlu.import_vindlu(state, crafted.tiny_model_config(), source="x.pth")
  np.testing.assert_array_equal(values["vision_proj.kernel"], state[w].astype(np.float32).T)

  # The same through a file torch wrote with a float8 tensor.
  tstate = {k: torch.from_numpy(np.array(v)) for k, v in valid_state().items()}
  tstate[w] = tstate[w].to(torch.float8_e5m2)
  ckpt = vindlu.read_vindlu_checkpoint(save_pth(tmp_path / "f8.pth", tstate))
  assert ckpt.state[w].dtype == np.dtype(ml_dtypes.float8_e5m2) and w in ckpt.upcast
  values, _ = vindlu.import_vindlu(ckpt.state, crafted.tiny_model_config(), source="f8.pth")
  np.testing.assert_array_equal(values["vision_proj.kernel"],
                                tstate[w].float().numpy().T)
  # Direct torch tensors too (viewed, not copied, then converted once).
  arrays, half = vindlu.state_dict_to_numpy({w: tstate[w]})
  assert arrays[w].dtype == np.float32 and half == [w]
  # Hugging Face: float8 in a pytorch_model.bin is converted; in safetensors (which has
  # no numpy reader for it) refused by name.
  folder = tmp_path / "hf"
  folder.mkdir()
  torch.save({"a": tstate[w]}, folder / "pytorch_model.bin")
  _, tensors, _ = hf_files.read_hf_checkpoint(str(folder))
  np.testing.assert_array_equal(tensors["a"], tstate[w].float().numpy())
  from safetensors.torch import save_file as save_torch
  save_torch({"a": tstate[w]}, str(folder / "model.safetensors"))
  with pytest.raises(hf_files.HfCheckpointError, match="holds tensors of dtype F8_E5M2"):
    hf_files.read_hf_checkpoint(str(folder))
  # Types that are not floating point stay refused by name.
  assert weight_rules.weight_problem(np.zeros(3, ml_dtypes.int4)).startswith("has dtype int4")


def test_error_lists_are_capped():
  state = valid_state()
  tiny = np.ones(1, np.float32)
  for i in range(200_000):
    state[f"junk.{i}"] = tiny
  with pytest.raises(vindlu.VindluCheckpointError) as e:
    vindlu.import_vindlu(state, crafted.tiny_model_config(), source="x.pth")
  text = str(e.value)
  assert len(text) < 20_000, len(text)
  assert "200,000 problem(s)" in text and "... and 199,980 more" in text


# -- Hugging Face folders ------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bert():
  """The tiny model's text side as a Hugging Face BERT folder's contents (the suite's
  builder): `(state, config)`."""
  from safetensors.numpy import load
  files = crafted._hf_bert_files()
  return load(files["model.safetensors"]), json.loads(files["config.json"])


def abstract_tiny():
  return crafted._abstract_model(crafted.tiny_model_config())


def variant(tmp_path, tiny_bert, edit_state=None, edit_config=None):
  state, config = dict(tiny_bert[0]), dict(tiny_bert[1])
  if edit_state:
    edit_state(state)
  if edit_config:
    edit_config(config)
  save_file(state, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(config))
  return str(tmp_path)


def test_the_unedited_tiny_hf_bert_folder_loads(tmp_path, tiny_bert):
  """The control for the refusals below: the same folder, unedited, in fp16, loads."""
  folder = variant(tmp_path, tiny_bert, lambda s: s.update(
      {k: v.astype(np.float16) for k, v in s.items()}))
  model = abstract_tiny()
  updates, _, report = hf_bert.bert_values(model.text_encoder, model.fusion_encoder, folder)
  kernel = updates["text_encoder"]["layers.0.attention.query.kernel"]
  np.testing.assert_array_equal(
      kernel, tiny_bert[0]["encoder.layer.0.attention.self.query.weight"]
      .astype(np.float16).astype(np.float32).T)
  assert report.loaded


@pytest.mark.parametrize("value, reason", [
    (np.ones((32, 32), np.int64), "has dtype int64"),
    (np.ones((32, 32), bool), "has dtype bool"),
    (np.full((32, 32), np.nan, np.float32), "holds 1024 non-finite value"),
])
def test_hf_weights_must_be_finite_floating_point(tmp_path, tiny_bert, value, reason):
  key = "encoder.layer.0.attention.self.query.weight"
  folder = variant(tmp_path, tiny_bert, lambda s: s.__setitem__(key, value))
  model = abstract_tiny()
  with pytest.raises(hf_bert.BertImportError) as e:
    hf_bert.bert_values(model.text_encoder, model.fusion_encoder, folder)
  msg = str(e.value)
  assert f"'{key}' (in {folder}/model.safetensors) {reason}" in msg, msg


def test_hf_beit_nan_weight_is_refused(tmp_path):
  """The tiny model's image side as a Hugging Face BEiT folder, one lambda set to inf."""
  prefix = "vision_encoder."
  state = {k[len(prefix):]: np.asarray(v) for k, v in valid_state().items()
           if k.startswith(prefix) and "temp_model" not in k and "temporal_position" not in k}
  state["encoder.layer.0.lambda_1"] = state["encoder.layer.0.lambda_1"] * np.inf
  save_file(state, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(dict(
      hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
      image_size=32, patch_size=16, use_relative_position_bias=True, use_mean_pooling=True)))
  with pytest.raises(hf_beit.CheckpointMismatchError,
                     match=r"'encoder\.layer\.0\.lambda_1' \(in .*model\.safetensors\) holds 32 "
                           "non-finite"):
    hf_beit.beit_values(abstract_tiny().vision_encoder, str(tmp_path))
  # The same folder without the inf loads (the check is not what refuses every folder).
  state["encoder.layer.0.lambda_1"] = np.ones(32, np.float32)
  save_file(state, str(tmp_path / "model.safetensors"))
  updates, _, _ = hf_beit.beit_values(abstract_tiny().vision_encoder, str(tmp_path))
  assert updates["layers.0.lambda_1"].dtype == np.float32


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.__setitem__("hidden_size", "32"), "field 'hidden_size' is \"32\", expected an integer"),
    (lambda c: c.__setitem__("num_hidden_layers", True), "field 'num_hidden_layers' is true"),
    (lambda c: c.__setitem__("num_attention_heads", 0), "field 'num_attention_heads' is 0, expected"),
    (lambda c: c.__setitem__("layer_norm_eps", None), "field 'layer_norm_eps' is null"),
    (lambda c: c.pop("vocab_size"), "field 'vocab_size' is missing"),
])
def test_malformed_config_values_are_one_refusal_naming_file_and_field(
    tmp_path, tiny_bert, edit, message):
  folder = variant(tmp_path, tiny_bert, edit_config=edit)
  with pytest.raises(hf_bert.BertImportError) as e:
    hf_bert.bert_values(None, None, folder)
  assert str(e.value).startswith(f"{folder}/config.json: {message}"), str(e.value)
  with pytest.raises(hf_beit.CheckpointMismatchError, match="config.json: field 'image_size'"):
    hf_beit.vision_config_from_hf({"image_size": [16.5, 16.5], "patch_size": 16,
                                   "hidden_size": 8, "num_hidden_layers": 1,
                                   "num_attention_heads": 1, "intermediate_size": 8,
                                   "use_relative_position_bias": True})


@pytest.mark.parametrize("text, message", [
    ("{", "not valid JSON"),
    ("[1, 2]", "the file is a JSON list, expected an object"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply"),
    (b"\xff\xfe{}", "not UTF-8 text"),
])
def test_unreadable_config_json_names_the_file(tmp_path, tiny_bert, text, message):
  folder = variant(tmp_path, tiny_bert)
  path = tmp_path / "config.json"
  path.write_bytes(text if isinstance(text, bytes) else text.encode())
  with pytest.raises(hf_files.HfCheckpointError, match=f"^{path}: {message}"):
    hf_files.read_hf_checkpoint(folder)


def write_index(folder, weight_map):
  (folder / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("weight_map, message", [
    (None, "field 'weight_map' is missing"),
    ([1], "field 'weight_map' is list"),
    ({"a": 3}, r"names files that are not \.safetensors shards: 'a' -> 3"),
    ({"a": "model.safetensors.index.json"}, "not .safetensors shards"),
    ({"a": "../other/model-00001.safetensors"}, "lies outside the folder"),
    ({"a": "/etc/model.safetensors"}, "lies outside the folder"),
])
def test_malformed_index_files_are_refused(tmp_path, weight_map, message):
  folder = tmp_path / "m"
  folder.mkdir()
  if weight_map is None:
    (folder / "model.safetensors.index.json").write_text('{"metadata": {}}')
  else:
    write_index(folder, weight_map)
  (tmp_path / "other").mkdir()
  save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "other/model-00001.safetensors"))
  with pytest.raises(hf_files.HfCheckpointError,
                     match=f"^{folder}/model.safetensors.index.json: .*{message}"):
    hf_files.read_hf_checkpoint(str(folder))


def test_a_symlinked_shard_outside_the_folder_is_refused(tmp_path):
  folder, other = tmp_path / "m", tmp_path / "other"
  folder.mkdir()
  other.mkdir()
  save_file({"a": np.ones(2, np.float32)}, str(other / "model-00001.safetensors"))
  os.symlink(other / "model-00001.safetensors", folder / "model-00001.safetensors")
  write_index(folder, {"a": "model-00001.safetensors"})
  with pytest.raises(hf_files.HfCheckpointError, match="resolves to .*outside the folder"):
    hf_files.read_hf_checkpoint(str(folder))
  # A shard inside the folder reads, and every key remembers its file.
  (folder / "model-00001.safetensors").unlink()
  save_file({"a": np.ones(2, np.float16)}, str(folder / "model-00001.safetensors"))
  _, tensors, _ = hf_files.read_hf_checkpoint(str(folder))
  assert tensors["a"].dtype == np.float32
  assert hf_files.file_of(tensors, "a") == str(folder / "model-00001.safetensors")


def test_every_refusal_is_a_refusal():
  for cls in (vindlu.VindluCheckpointError, hf_bert.BertImportError,
              hf_beit.CheckpointMismatchError, params.ParamAssignError,
              hf_files.HfCheckpointError):
    assert issubclass(cls, Refusal) and issubclass(cls, ValueError)
  from t2v2t_jax.checkpoints.safe_torch_load import UnsafeCheckpointError
  import pickle
  assert issubclass(UnsafeCheckpointError, Refusal)
  assert issubclass(UnsafeCheckpointError, pickle.UnpicklingError)
