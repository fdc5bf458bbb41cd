"""Weights load without torch (issue 23): every form the Hub serves, and VindLU `.pth`.

Folders are laid out as the Hub repositories serve them: BEiT with only `config.json` +
`flax_model.msgpack` (as `microsoft/beit-base-patch16-224-pt22k-ft22k`), BEiT and BERT
with only `pytorch_model.bin`, and a real BERT `model.safetensors` (all-MiniLM-L6-v2).
Each is loaded in a subprocess in which `import torch` fails (a `sys.meta_path` finder
installed before anything else), which then checks that torch never got imported. The
parameters come back here and are checked against torch references: transformers' BEiT
outputs, the safetensors-loaded BERT, VindLU state dicts converted tensor by tensor.

The Flax files are written by hand in the Hugging Face Flax layout (module names, kernels
[in, out], HWIO convolutions, `scale` / `embedding` leaves), from the torch weights, so
they check the reader's renaming rather than repeat it.
"""

import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from flax import serialization  # noqa: E402
from safetensors.numpy import load_file  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

import test_hf_beit as beit_t  # noqa: E402
import test_vindlu_import as vindlu_t  # noqa: E402

from t2v2t_jax.checkpoints import hf_beit, hf_files, vindlu  # noqa: E402
from t2v2t_jax.checkpoints.params import assign_into, flatten_params  # noqa: E402
from t2v2t_jax.models.vision_encoder import VideoEncoder  # noqa: E402
from t2v2t_jax.recipes import load_recipe  # noqa: E402

RECIPE = os.path.join(REPO, "configs", "msrvtt_ft.py") + ":tiny"
BERT_FUSION_LAYER = 4

# Runs in a fresh interpreter; `args` (JSON) names the folders. Prints NO_TORCH_OK last.
WORKER = r'''
import sys


class NoTorch:
  """`import torch` fails, as on a machine without torch."""

  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      raise ImportError(f"{name} is blocked: weights must load without torch")
    return None


sys.meta_path.insert(0, NoTorch())

import json
import numpy as np

try:
  import torch  # noqa: F401
  raise SystemExit("the torch blocker does not work")
except ImportError:
  pass

from flax import nnx
from t2v2t_jax.checkpoints import hf_beit, hf_bert, hf_files
from t2v2t_jax.checkpoints.params import flatten_params
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.fusion import FusionEncoder
from t2v2t_jax.models.text_encoder import TextEncoder
from t2v2t_jax.models.vision_encoder import VideoEncoder
from t2v2t_jax.recipes import load_recipe
from t2v2t_jax.training import initialization

args = json.loads(sys.argv[1])
out = {}


def keep(case, params):
  for k, v in params.items():
    out[f"{case}|{k}"] = np.asarray(v)


for case in ("beit_flax", "beit_bin"):
  c = model_config("test/16").vision
  c.update(args["vision"])
  enc = VideoEncoder(c, rngs=nnx.Rngs(0))
  hf_beit.load_beit_into(enc, args[case])
  keep(case, flatten_params(enc))

for case in ("bert_st", "bert_flax", "bert_bin"):
  checkpoint = hf_files.read_hf_checkpoint(args[case])
  cfg = model_config("test/16", "test", "v2t")
  cfg.text.update(hf_bert.text_config_from_hf(checkpoint[0], args["fusion_layer"]))
  # Checked against encoders of shapes only (as a run does before building its model).
  text = nnx.eval_shape(lambda: TextEncoder(cfg.text, rngs=nnx.Rngs(0)))
  fusion = nnx.eval_shape(lambda: FusionEncoder(cfg, rngs=nnx.Rngs(1)))
  updates, _, _ = hf_bert.bert_values(text, fusion, checkpoint)
  for owner, values in updates.items():
    keep(case, {f"{owner}.{k}": v for k, v in values.items()})

# What a training run does before it builds anything: VindLU .pth, then HF BEiT (msgpack).
cfg = load_recipe(args["recipe"])
with cfg.unlocked():
  cfg.init_from = args["vindlu"]
fetched = initialization.fetch_weights(cfg)
keep("vindlu", fetched.values)
out["vindlu_keep|names"] = np.array(sorted(fetched.keep_initial))

cfg = load_recipe(args["recipe"])
with cfg.unlocked():
  cfg.model.vision.update(args["vision"])
  cfg.model.text.update(dict(width=args["vision"]["width"], num_heads=args["vision"]["num_heads"]))
  cfg.pretrained.beit, cfg.pretrained.bert = args["beit_flax"], ""
fetched = initialization.fetch_weights(cfg)
keep("fetch_beit", fetched.values)

np.savez(args["out"], **out)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
print("NO_TORCH_OK")
'''


# -- Flax trees in the Hugging Face Flax layout, built from PyTorch-named weights ---------------

def _dense(sd, name, bias=True):
  d = {"kernel": sd.pop(f"{name}.weight").T}
  if bias:
    d["bias"] = sd.pop(f"{name}.bias")
  return d


def _norm(sd, name):
  return {"scale": sd.pop(f"{name}.weight"), "bias": sd.pop(f"{name}.bias")}


def beit_flax_tree(state, depth):
  """`FlaxBeitForImageClassification` params: `beit` (embeddings, encoder.layer.<i>,
  pooler) and `classifier`, as `microsoft/beit-base-patch16-224-pt22k-ft22k` stores them."""
  sd = dict(state)
  layers = {}
  for i in range(depth):
    p = f"encoder.layer.{i}"
    layers[str(i)] = {
        "attention": {
            "attention": {
                "query": _dense(sd, f"{p}.attention.attention.query"),
                "key": _dense(sd, f"{p}.attention.attention.key", bias=False),
                "value": _dense(sd, f"{p}.attention.attention.value"),
                "relative_position_bias": {"relative_position_bias_table": sd.pop(
                    f"{p}.attention.attention.relative_position_bias."
                    "relative_position_bias_table")},
            },
            "output": {"dense": _dense(sd, f"{p}.attention.output.dense")},
        },
        "intermediate": {"dense": _dense(sd, f"{p}.intermediate.dense")},
        "output": {"dense": _dense(sd, f"{p}.output.dense")},
        "layernorm_before": _norm(sd, f"{p}.layernorm_before"),
        "layernorm_after": _norm(sd, f"{p}.layernorm_after"),
        "lambda_1": sd.pop(f"{p}.lambda_1"),
        "lambda_2": sd.pop(f"{p}.lambda_2"),
    }
  conv = sd.pop("embeddings.patch_embeddings.projection.weight")  # OIHW -> HWIO
  beit = {
      "embeddings": {
          "cls_token": sd.pop("embeddings.cls_token"),
          "patch_embeddings": {"projection": {
              "kernel": conv.transpose(2, 3, 1, 0),
              "bias": sd.pop("embeddings.patch_embeddings.projection.bias")}},
      },
      "encoder": {"layer": layers},
      "pooler": {"layernorm": _norm(sd, "pooler.layernorm")},
  }
  assert not [k for k in sd if not k.endswith("relative_position_index")], sorted(sd)
  width = beit["embeddings"]["cls_token"].shape[-1]
  rng = np.random.default_rng(5)
  return {"beit": beit, "classifier": {"kernel": rng.normal(size=(width, 3)).astype(np.float32),
                                       "bias": np.zeros(3, np.float32)}}


def bert_flax_tree(state, num_layers):
  """`FlaxBertModel` params (embeddings, encoder.layer.<i>, pooler)."""
  sd = {k: v for k, v in state.items() if k != "embeddings.position_ids"}  # a buffer
  layers = {}
  for i in range(num_layers):
    p = f"encoder.layer.{i}"
    layers[str(i)] = {
        "attention": {
            "self": {n: _dense(sd, f"{p}.attention.self.{n}") for n in ("query", "key", "value")},
            "output": {"dense": _dense(sd, f"{p}.attention.output.dense"),
                       "LayerNorm": _norm(sd, f"{p}.attention.output.LayerNorm")},
        },
        "intermediate": {"dense": _dense(sd, f"{p}.intermediate.dense")},
        "output": {"dense": _dense(sd, f"{p}.output.dense"),
                   "LayerNorm": _norm(sd, f"{p}.output.LayerNorm")},
    }
  tree = {
      "embeddings": {
          "word_embeddings": {"embedding": sd.pop("embeddings.word_embeddings.weight")},
          "position_embeddings": {"embedding": sd.pop("embeddings.position_embeddings.weight")},
          "token_type_embeddings": {"embedding": sd.pop("embeddings.token_type_embeddings.weight")},
          "LayerNorm": _norm(sd, "embeddings.LayerNorm"),
      },
      "encoder": {"layer": layers},
      "pooler": {"dense": _dense(sd, "pooler.dense")},
  }
  assert not sd, sorted(sd)
  return tree


# -- the folders, and one torch-free subprocess loading them all -----------------------------------



@pytest.fixture(scope="module")
def hub(tmp_path_factory, minilm_folder):
  root = tmp_path_factory.mktemp("hub")
  torch.manual_seed(0)
  beit = beit_t.randomized(transformers.BeitModel(beit_t.hf_config()), seed=0)
  beit.save_pretrained(root / "saved_beit")
  beit_sd = load_file(str(root / "saved_beit" / "model.safetensors"))  # on-disk (legacy) names
  config = root / "saved_beit" / "config.json"

  beit_flax = root / "beit_flax"  # as microsoft/beit-base-patch16-224-pt22k-ft22k serves it
  beit_flax.mkdir()
  shutil.copy(config, beit_flax / "config.json")
  (beit_flax / "flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize(beit_flax_tree(beit_sd, beit_t.DEPTH)))

  beit_bin = root / "beit_bin"
  beit_bin.mkdir()
  shutil.copy(config, beit_bin / "config.json")
  torch.save({k: torch.from_numpy(v) for k, v in beit_sd.items()}, beit_bin / "pytorch_model.bin")

  bert_sd = load_file(os.path.join(minilm_folder, "model.safetensors"))
  with open(os.path.join(minilm_folder, "config.json")) as f:
    layers = json.load(f)["num_hidden_layers"]
  bert_flax, bert_bin = root / "bert_flax", root / "bert_bin"
  for folder in (bert_flax, bert_bin):
    folder.mkdir()
    shutil.copy(os.path.join(minilm_folder, "config.json"), folder / "config.json")
  (bert_flax / "flax_model.msgpack").write_bytes(
      serialization.msgpack_serialize(bert_flax_tree(bert_sd, layers)))
  # bfloat16, as some checkpoints are stored: read through ml_dtypes, upcast to float32.
  torch.save({k: torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32
              else torch.from_numpy(v) for k, v in bert_sd.items()}, bert_bin / "pytorch_model.bin")

  cfg = load_recipe(RECIPE)
  m = cfg.model
  vindlu_sd = vindlu_t.make_vindlu_state("finetune", frames=m.vision.num_frames,
                                         image=m.vision.image_size, vocab=m.text.vocab_size,
                                         embed=m.embed_dim)
  vindlu_sd = {k: v.half() if k.endswith("lambda_1") else v for k, v in vindlu_sd.items()}
  vindlu_pth = root / "vindlu.pth"
  vindlu_t.save_vindlu(vindlu_pth, vindlu_sd)
  return dict(root=root, beit=beit, beit_sd=beit_sd, bert_sd=bert_sd, beit_flax=beit_flax,
              beit_bin=beit_bin, bert_flax=bert_flax, bert_bin=bert_bin, vindlu_sd=vindlu_sd,
              vindlu=vindlu_pth, config=cfg)


@pytest.fixture(scope="module")
def without_torch(hub, minilm_folder):
  """Everything loaded in one subprocess where torch cannot be imported."""
  out = hub["root"] / "loaded.npz"
  args = dict(vision=dict(width=beit_t.WIDTH, depth=beit_t.DEPTH, num_heads=beit_t.HEADS,
                          mlp_dim=beit_t.MLP, patch_size=beit_t.PATCH, image_size=beit_t.IMAGE,
                          num_frames=4),
              beit_flax=str(hub["beit_flax"]), beit_bin=str(hub["beit_bin"]),
              bert_st=minilm_folder, bert_flax=str(hub["bert_flax"]),
              bert_bin=str(hub["bert_bin"]), fusion_layer=BERT_FUSION_LAYER,
              vindlu=str(hub["vindlu"]), recipe=RECIPE, out=str(out))
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-c", WORKER, json.dumps(args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0 and proc.stdout.rstrip().endswith("NO_TORCH_OK"), \
      proc.stdout[-3000:] + proc.stderr[-5000:]
  with np.load(out) as data:
    loaded = {k: data[k] for k in data.files}
  cases = {}
  for key, value in loaded.items():
    case, _, path = key.partition("|")
    cases.setdefault(case, {})[path] = value
  return cases


def _beit_outputs_match(params, reference_model):
  enc = VideoEncoder(beit_t.our_cfg(), rngs=nnx.Rngs(0))
  assign_into(enc, params)
  x = beit_t.images(2, seed=7)
  ref_h, ref_p = beit_t.hf_outputs(reference_model, x)
  h, pooled = beit_t._forward(enc, jnp.asarray(x)[:, None])
  np.testing.assert_allclose(h[:, 0], ref_h, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(pooled[:, 0], ref_p, atol=1e-4, rtol=1e-4)


# -- the tests -------------------------------------------------------------------------------------

def test_beit_flax_msgpack_matches_transformers(hub, without_torch):
  params = without_torch["beit_flax"]
  _beit_outputs_match(params, hub["beit"])
  fresh = flatten_params(VideoEncoder(beit_t.our_cfg(), rngs=nnx.Rngs(0)))
  assert not np.array_equal(params["layers.0.attention.query.kernel"],
                            fresh["layers.0.attention.query.kernel"])


def test_beit_pytorch_bin_matches_transformers(hub, without_torch):
  _beit_outputs_match(without_torch["beit_bin"], hub["beit"])
  for path, value in without_torch["beit_bin"].items():
    np.testing.assert_array_equal(value, without_torch["beit_flax"][path], err_msg=path)


def test_bert_safetensors_flax_msgpack_and_bf16_bin_agree(hub, without_torch):
  """MiniLM's safetensors, the msgpack made from them and a bfloat16 pytorch_model.bin:
  the same parameters (the bin rounded to bfloat16), in our layout."""
  st, flax_, bin_ = (without_torch[c] for c in ("bert_st", "bert_flax", "bert_bin"))
  assert set(st) == set(flax_) == set(bin_) and len(st) > 90
  sd = hub["bert_sd"]
  np.testing.assert_array_equal(st["text_encoder.layers.0.attention.query.kernel"],
                                sd["encoder.layer.0.attention.self.query.weight"].T)
  np.testing.assert_array_equal(st["fusion_encoder.layers.1.ffn.output.kernel"],
                                sd["encoder.layer.5.output.dense.weight"].T)
  np.testing.assert_array_equal(st["text_encoder.embeddings.word_embeddings.embedding"],
                                sd["embeddings.word_embeddings.weight"])
  rounded_somewhere = 0
  for path, value in st.items():
    np.testing.assert_array_equal(flax_[path], value, err_msg=path)
    rounded = value.astype(ml_dtypes.bfloat16).astype(np.float32)
    assert bin_[path].dtype == np.float32
    np.testing.assert_array_equal(bin_[path], rounded, err_msg=path)
    rounded_somewhere += not np.array_equal(rounded, value)
  assert rounded_somewhere > 50  # the bin really held bfloat16


def test_vindlu_pth_converts_without_torch(hub, without_torch):
  """`fetch_weights` of `init_from=X.pth`, torch-free, equals the importer fed tensor by
  tensor through torch (fp16 upcast included); VindLU's missing T2V block is left to the
  run's own init."""
  m = hub["config"].model
  want, report = vindlu.import_vindlu(vindlu_t.to_numpy(hub["vindlu_sd"]), m, fill_new=False)
  got = without_torch["vindlu"]
  assert set(got) == set(want) and set(without_torch["vindlu_keep"]["names"]) == set(report.new)
  assert any(p.startswith("fusion_encoder.t2v") for p in report.new)
  for path, value in want.items():
    np.testing.assert_array_equal(got[path], value, err_msg=path)
  lam = next(k for k in hub["vindlu_sd"] if k.endswith("lambda_1"))
  assert hub["vindlu_sd"][lam].dtype == torch.float16


def test_fetch_weights_reads_the_flax_beit_for_a_run(hub, without_torch):
  fetched = without_torch["fetch_beit"]
  assert set(fetched) == {f"vision_encoder.{p}" for p in without_torch["beit_flax"]
                          if not hf_beit.is_temporal_param(p)}
  for path, value in fetched.items():
    np.testing.assert_array_equal(value, without_torch["beit_flax"][path[len("vision_encoder."):]])


def test_sharded_flax_checkpoint_reads_like_one_file(hub, tmp_path):
  """`flax_model.msgpack.index.json`: shards of flat '/'-joined keys, as HF writes them."""
  tree = serialization.msgpack_restore((hub["beit_flax"] / "flax_model.msgpack").read_bytes())
  flat = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, dict):
        walk(v, prefix + k + "/")
      else:
        flat[prefix + k] = v
  walk(tree, "")
  keys = sorted(flat)
  shards = {"flax_model-00001-of-00002.msgpack": keys[:len(keys) // 2],
            "flax_model-00002-of-00002.msgpack": keys[len(keys) // 2:]}
  folder = tmp_path / "sharded"
  folder.mkdir()
  shutil.copy(hub["beit_flax"] / "config.json", folder / "config.json")
  for name, names in shards.items():
    (folder / name).write_bytes(serialization.msgpack_serialize({k: flat[k] for k in names}))
  (folder / "flax_model.msgpack.index.json").write_text(json.dumps(
      {"metadata": {}, "weight_map": {k: n for n, names in shards.items() for k in names}}))
  _, sharded, source = hf_files.read_hf_checkpoint(str(folder))
  _, whole, _ = hf_files.read_hf_checkpoint(str(hub["beit_flax"]))
  assert source.endswith("flax_model.msgpack.index.json") and set(sharded) == set(whole)
  for k in whole:
    np.testing.assert_array_equal(sharded[k], whole[k], err_msg=k)
  assert whole["beit.encoder.layer.0.attention.attention.query.weight"].shape == (beit_t.WIDTH,) * 2
  np.testing.assert_array_equal(whole["beit.encoder.layer.1.output.dense.weight"],
                                hub["beit_sd"]["encoder.layer.1.output.dense.weight"])


# -- Hub downloads: what each repository serves decides what is fetched ----------------------------

class LocalHub:
  """`list_repo_files` / `snapshot_download` over local folders laid out as Hub repos."""

  def __init__(self, repos, cache):
    self.repos, self.cache, self.downloaded = repos, cache, {}

  def list_repo_files(self, name, **kw):
    if name not in self.repos:
      raise RuntimeError(f"404 Client Error: Repository Not Found for url: .../{name}")
    return sorted(os.listdir(self.repos[name]))

  def snapshot_download(self, name, allow_patterns=None, **kw):
    import fnmatch  # noqa: PLC0415
    out = self.cache / name.replace("/", "--")
    out.mkdir(parents=True)
    got = [f for f in self.list_repo_files(name)
           if any(fnmatch.fnmatch(f, p) for p in allow_patterns)]
    for f in got:
      shutil.copy(os.path.join(self.repos[name], f), out / f)
    self.downloaded[name] = got
    return str(out)


def test_hub_names_fetch_only_the_preferred_weights(hub, minilm_folder, tmp_path, monkeypatch):
  import huggingface_hub  # noqa: PLC0415
  beit_repo = tmp_path / "beit_repo"  # microsoft/beit-base-patch16-224-pt22k-ft22k's files
  shutil.copytree(hub["beit_flax"], beit_repo)
  (beit_repo / "pytorch_model.bin").write_bytes(b"not read: the msgpack is preferred")
  (beit_repo / "preprocessor_config.json").write_text("{}")
  bert_repo = tmp_path / "bert_repo"  # bert-base-uncased: safetensors beside the others
  bert_repo.mkdir()
  for f in ("config.json", "model.safetensors", "vocab.txt"):
    shutil.copy(os.path.join(minilm_folder, f), bert_repo / f)
  (bert_repo / "flax_model.msgpack").write_bytes(b"not read")
  (bert_repo / "pytorch_model.bin").write_bytes(b"not read")
  (bert_repo / "tf_model.h5").write_bytes(b"not read")
  empty_repo = tmp_path / "empty_repo"
  empty_repo.mkdir()
  (empty_repo / "config.json").write_text("{}")
  (empty_repo / "tf_model.h5").write_bytes(b"")

  local = LocalHub({"microsoft/beit-base-patch16-224-pt22k-ft22k": beit_repo,
                    "bert-base-uncased": bert_repo, "someone/tf-only": empty_repo,
                    "someone/bin-only": hub["beit_bin"]}, tmp_path / "cache")
  monkeypatch.setattr(huggingface_hub, "list_repo_files", local.list_repo_files)
  monkeypatch.setattr(huggingface_hub, "snapshot_download", local.snapshot_download)

  config, tensors, source = hf_files.read_hf_checkpoint(
      "microsoft/beit-base-patch16-224-pt22k-ft22k")
  assert local.downloaded["microsoft/beit-base-patch16-224-pt22k-ft22k"] == [
      "config.json", "flax_model.msgpack"]
  assert source.endswith("flax_model.msgpack") and config["hidden_size"] == beit_t.WIDTH
  assert "beit.pooler.layernorm.weight" in tensors and "classifier.weight" in tensors

  _, tensors, source = hf_files.read_hf_checkpoint("bert-base-uncased")
  assert local.downloaded["bert-base-uncased"] == ["config.json", "model.safetensors"]
  assert "encoder.layer.5.output.dense.weight" in tensors

  _, tensors, source = hf_files.read_hf_checkpoint("someone/bin-only")
  assert local.downloaded["someone/bin-only"] == ["config.json", "pytorch_model.bin"]
  np.testing.assert_array_equal(tensors["embeddings.cls_token"],
                                hub["beit_sd"]["embeddings.cls_token"])

  with pytest.raises(FileNotFoundError, match=r"'someone/tf-only' serves none of") as e:
    hf_files.read_hf_checkpoint("someone/tf-only")
  assert "\n" not in str(e.value)
  with pytest.raises(FileNotFoundError, match=r"'someone/missing' is no local folder") as e:
    hf_files.read_hf_checkpoint("someone/missing")
  assert "\n" not in str(e.value)


def test_sharded_listings_choose_index_and_shards():
  assert hf_files.choose_weight_files(
      ["config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
       "model-00002-of-00002.safetensors", "pytorch_model.bin"]) == [
      "config.json", "model.safetensors.index.json", "model-*.safetensors"]
  assert hf_files.choose_weight_files(
      ["config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00003.bin"]) == [
      "config.json", "pytorch_model.bin.index.json", "pytorch_model-*.bin"]
  assert hf_files.choose_weight_files(["config.json", "tf_model.h5"]) is None


# -- a run: fetched before anything else, then used without reading again ------------------------

def test_fetched_weights_are_what_initial_state_uses(hub, tmp_path):
  from t2v2t_jax import sharding  # noqa: PLC0415
  from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer  # noqa: PLC0415
  from t2v2t_jax.training import initialization  # noqa: PLC0415
  from t2v2t_jax.training import optimizer as optimizer_lib  # noqa: PLC0415
  from t2v2t_jax.training import train_state as state_lib  # noqa: PLC0415
  from t2v2t_jax.tree_paths import flatten  # noqa: PLC0415
  folder = tmp_path / "beit"
  shutil.copytree(hub["beit_flax"], folder)
  cfg = load_recipe(RECIPE)
  with cfg.unlocked():
    cfg.model.vision.update(dict(width=beit_t.WIDTH, depth=beit_t.DEPTH, num_heads=beit_t.HEADS,
                                 mlp_dim=beit_t.MLP, patch_size=beit_t.PATCH,
                                 image_size=beit_t.IMAGE))
    cfg.model.text.update(dict(width=beit_t.WIDTH, num_heads=beit_t.HEADS))
    cfg.pretrained.beit, cfg.pretrained.bert = str(folder), ""
  fetched = initialization.fetch_weights(cfg)
  shutil.rmtree(folder)  # initial_state must not read again

  mesh = sharding.make_mesh(cfg.mesh)
  tx = optimizer_lib.make_optimizer(cfg.optimizer, 10)
  abstract = state_lib.abstract_state(cfg.model, tx, cfg.seed)
  shardings = state_lib.state_shardings(abstract, mesh)
  state, source = initialization.initial_state(
      cfg, ckpt=Checkpointer(str(tmp_path / "ckpt")), abstract=abstract, shardings=shardings,
      tx=tx, data_iter=None, fetched=fetched)
  assert source == f"initialised from Hugging Face weights beit={folder}"
  got = flatten(state["params"])
  for path, value in fetched.values.items():
    np.testing.assert_array_equal(np.asarray(got[path]), value, err_msg=path)

  with cfg.unlocked():
    cfg.pretrained.beit = ""
  assert initialization.fetch_weights(cfg) is None


def test_names_without_weights_fail_in_one_line(tmp_path):
  from t2v2t_jax.training import initialization  # noqa: PLC0415
  (tmp_path / "config_only").mkdir()
  (tmp_path / "config_only" / "config.json").write_text("{}")
  cfg = load_recipe(RECIPE)
  cases = [("beit", str(tmp_path / "config_only"), r"config_only.*holds none of"),
           ("bert", str(tmp_path / "nowhere"), r"no checkpoint at .*nowhere"),
           ("init_from", str(tmp_path / "missing.pth"), r"missing\.pth: checkpoint not found")]
  for field, value, match in cases:
    with cfg.unlocked():
      cfg.init_from = value if field == "init_from" else ""
      cfg.pretrained.beit = value if field == "beit" else ""
      cfg.pretrained.bert = value if field == "bert" else ""
    with pytest.raises(FileNotFoundError, match=match) as e:
      initialization.fetch_weights(cfg)
    assert "\n" not in str(e.value)


# -- gs:// folders and files, on a GCS API served on this machine (tests/test_cloud_storage.py) ----

@pytest.fixture(scope="module")
def gcs_bucket(gcs):
  """The bucket of conftest.py's GCS API, with its endpoints in the environment."""
  return gcs.bucket


def test_gs_folders_and_files_read_like_local_ones(hub, minilm_folder, gcs_bucket):
  import uuid  # noqa: PLC0415
  from etils import epath  # noqa: PLC0415
  base = f"gs://{gcs_bucket}/weights-{uuid.uuid4().hex[:8]}"
  uploads = {"beit/config.json": hub["beit_flax"] / "config.json",
             "beit/flax_model.msgpack": hub["beit_flax"] / "flax_model.msgpack",
             "bert/config.json": os.path.join(minilm_folder, "config.json"),
             "bert/model.safetensors": os.path.join(minilm_folder, "model.safetensors"),
             "vindlu.pth": hub["vindlu"]}
  for name, local in uploads.items():
    epath.Path(f"{base}/{name}").write_bytes(epath.Path(local).read_bytes())

  for remote, local in ((f"{base}/beit", hub["beit_flax"]), (f"{base}/bert", minilm_folder)):
    config_r, got, source = hf_files.read_hf_checkpoint(remote)
    config_l, want, _ = hf_files.read_hf_checkpoint(str(local))
    assert source.startswith(remote) and config_r == config_l and set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  got = vindlu.read_vindlu_checkpoint(f"{base}/vindlu.pth")
  want = vindlu.read_vindlu_checkpoint(hub["vindlu"])
  assert got.config == want.config and set(got.state) == set(want.state)
  for k in want.state:
    np.testing.assert_array_equal(got.state[k], want.state[k], err_msg=k)
  with pytest.raises(FileNotFoundError, match="no checkpoint at"):
    hf_files.read_hf_checkpoint(f"{base}/nothing")
