"""VindLU .pth import/export: safe unpickling, key accounting, parity with transformers,
resizing, and t2v2t (gates 0) == v2t after loading the same checkpoint."""

import collections
import contextlib
import os
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from t2v2t_jax import convert  # noqa: E402
from t2v2t_jax.checkpoints import hf_beit, restore, vindlu, vindlu_export, vindlu_keys  # noqa: E402
from t2v2t_jax.checkpoints.params import assign_into  # noqa: E402
from t2v2t_jax.checkpoints.safe_torch_load import UnsafeCheckpointError, safe_torch_load  # noqa: E402
from t2v2t_jax.models import vision_encoder as ve  # noqa: E402
from t2v2t_jax.models.config import model_config  # noqa: E402
from t2v2t_jax.models.t2v2t import create_model  # noqa: E402
from t2v2t_jax.recipes import load_recipe  # noqa: E402
from t2v2t_jax.training import initialization  # noqa: E402
from t2v2t_jax.tree_paths import flatten  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
W, VDEPTH, HEADS, MLP, PATCH, IMAGE = 32, 2, 2, 64, 16, 32       # vision 'test/16'
TLAYERS, FUSION, VOCAB, MAXPOS, EMBED = 4, 2, 100, 512, 16        # text 'test'


def tiny_config(mode="t2v2t", *, frames=4, image=IMAGE, vocab=VOCAB, embed=EMBED):
  c = model_config("test/16", "test", mode)
  c.vision.image_size = image
  c.vision.num_frames = frames
  c.text.vocab_size = vocab
  c.embed_dim = embed
  return c


def beit_index(g):
  """BEiT's relative position index for a g x g grid, built as VindLU builds it (int64)."""
  coords = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="ij")).reshape(2, -1)
  rel = (coords[:, :, None] - coords[:, None, :]).transpose(1, 2, 0).copy()
  rel[:, :, 0] += g - 1
  rel[:, :, 1] += g - 1
  rel[:, :, 0] *= 2 * g - 1
  n = (2 * g - 1) ** 2 + 3
  idx = np.zeros((g * g + 1,) * 2, np.int64)
  idx[1:, 1:] = rel.sum(-1)
  idx[0, :] = n - 3
  idx[:, 0] = n - 2
  idx[0, 0] = n - 1
  return torch.from_numpy(idx)


def make_vindlu_state(naming, *, frames=4, image=IMAGE, vocab=VOCAB, embed=EMBED, seed=0):
  """A VindLU state dict (exact key names, SPEC 8) for the tiny sizes, random values."""
  gen = torch.Generator().manual_seed(seed)

  def r(*shape):
    return torch.randn(*shape, generator=gen) * 0.1

  def ln(sd, key):
    sd[f"{key}.weight"] = 1.0 + r(W)
    sd[f"{key}.bias"] = r(W)

  def lin(sd, key, out_f, in_f, bias=True):
    sd[f"{key}.weight"] = r(out_f, in_f)
    if bias:
      sd[f"{key}.bias"] = r(out_f)

  g = image // PATCH
  sd = collections.OrderedDict()
  v = "vision_encoder."
  sd[v + "embeddings.cls_token"] = r(1, 1, W)
  sd[v + "embeddings.patch_embeddings.projection.weight"] = r(W, 3, PATCH, PATCH)
  sd[v + "embeddings.patch_embeddings.projection.bias"] = r(W)
  sd[v + "embeddings.temporal_position_embeddings"] = r(1, frames, 1, W)
  for i in range(VDEPTH):
    p = f"{v}encoder.layer.{i}."
    sd[p + "lambda_1"] = r(W)
    sd[p + "lambda_2"] = r(W)
    lin(sd, p + "attention.attention.query", W, W)
    lin(sd, p + "attention.attention.key", W, W, bias=False)
    lin(sd, p + "attention.attention.value", W, W)
    rp = p + "attention.attention.relative_position_bias."
    sd[rp + "relative_position_bias_table"] = r((2 * g - 1) ** 2 + 3, HEADS)
    sd[rp + "relative_position_index"] = beit_index(g)
    lin(sd, p + "attention.output.dense", W, W)
    ln(sd, p + "layernorm_before")
    ln(sd, p + "layernorm_after")
    lin(sd, p + "intermediate.dense", MLP, W)
    lin(sd, p + "output.dense", W, MLP)
    t = p + "temp_model."
    sd[t + "temporal_attn.in_proj_weight"] = r(3 * W, W)
    sd[t + "temporal_attn.in_proj_bias"] = r(3 * W)
    lin(sd, t + "temporal_attn.out_proj", W, W)
    ln(sd, t + "norm")
    sd[t + "scale"] = r(())
    lin(sd, t + "linear", W, W)
  ln(sd, v + "pooler.layernorm")
  ln(sd, "vision_layernorm")
  b = "text_encoder.bert." if naming == "pretrain" else "text_encoder."
  sd[b + "embeddings.word_embeddings.weight"] = r(vocab, W)
  sd[b + "embeddings.position_embeddings.weight"] = r(MAXPOS, W)
  sd[b + "embeddings.token_type_embeddings.weight"] = r(2, W)
  ln(sd, b + "embeddings.LayerNorm")
  sd[b + "embeddings.position_ids"] = torch.arange(MAXPOS, dtype=torch.int64)[None]
  for i in range(TLAYERS):
    p = f"{b}encoder.layer.{i}."
    for name in ("query", "key", "value"):
      lin(sd, f"{p}attention.self.{name}", W, W)
    lin(sd, p + "attention.output.dense", W, W)
    ln(sd, p + "attention.output.LayerNorm")
    if i >= FUSION:
      for name in ("query", "key", "value"):
        lin(sd, f"{p}crossattention.self.{name}", W, W)
      lin(sd, p + "crossattention.output.dense", W, W)
      ln(sd, p + "crossattention.output.LayerNorm")
    lin(sd, p + "intermediate.dense", MLP, W)
    lin(sd, p + "output.dense", W, MLP)
    ln(sd, p + "output.LayerNorm")
  if naming == "pretrain":
    c = "text_encoder.cls.predictions."
    sd[c + "bias"] = r(vocab)
    lin(sd, c + "transform.dense", W, W)
    ln(sd, c + "transform.LayerNorm")
    sd[c + "decoder.weight"] = sd[b + "embeddings.word_embeddings.weight"]  # tied
    sd[c + "decoder.bias"] = sd[c + "bias"]
  lin(sd, "vision_proj", embed, W)
  lin(sd, "text_proj", embed, W)
  sd["temp"] = torch.tensor(0.07)
  lin(sd, "itm_head", 2, W)
  return sd


@contextlib.contextmanager
def fake_vindlu_package():
  """`utils.easydict.EasyDict` importable while saving, as in a VindLU checkout."""
  saved = {k: sys.modules.get(k) for k in ("utils", "utils.easydict")}

  class EasyDict(dict):
    def __init__(self, d=None, **kw):
      super().__init__()
      for k, v in {**(d or {}), **kw}.items():
        setattr(self, k, v)

    def __setattr__(self, name, value):
      if isinstance(value, dict) and not isinstance(value, EasyDict):
        value = EasyDict(value)
      super().__setattr__(name, value)
      super().__setitem__(name, value)

    __setitem__ = __setattr__

  EasyDict.__module__, EasyDict.__qualname__ = "utils.easydict", "EasyDict"
  pkg, mod = types.ModuleType("utils"), types.ModuleType("utils.easydict")
  mod.EasyDict, pkg.easydict = EasyDict, mod
  sys.modules["utils"], sys.modules["utils.easydict"] = pkg, mod
  try:
    yield EasyDict
  finally:
    for k, v in saved.items():
      if v is None:
        sys.modules.pop(k, None)
      else:
        sys.modules[k] = v


def save_vindlu(path, sd):
  """torch.save as VindLU does: model, optimizer, scheduler, scaler, EasyDict config, ..."""
  p = torch.nn.Parameter(torch.zeros(3))
  opt = torch.optim.AdamW([p], lr=1e-4, betas=(0.9, 0.98))
  p.grad = torch.ones(3)
  opt.step()
  with fake_vindlu_package() as EasyDict:
    config = EasyDict({"model": {"text_encoder": {"name": "bert_base", "fusion_layer": FUSION}},
                       "num_frames": 4, "optimizer": {"lr": 1e-4}})
    torch.save({"model": sd, "optimizer": opt.state_dict(), "scheduler": {"last_epoch": 3},
                "scaler": {"scale": 65536.0}, "config": config, "epoch": 4, "global_step": 123},
               path)
  assert "utils.easydict" not in sys.modules  # the loader must map the class itself


def to_numpy(sd):
  return vindlu.state_dict_to_numpy(sd)[0]


def expected_dropped(sd):
  return {k for k in sd if k.endswith(("relative_position_index", "position_ids"))
          or ".temp_model.linear." in k}


def assert_same_state(exported, sd):
  assert set(exported) == set(sd), (set(exported) ^ set(sd))
  for k, v in sd.items():
    ref = v.numpy()
    got = np.asarray(exported[k])
    assert got.dtype == ref.dtype and got.shape == ref.shape, k
    if ".temp_model.linear." in k:  # unused by VindLU: exported as zeros
      assert not got.any(), k
    else:
      np.testing.assert_array_equal(got, ref, err_msg=k)


# ------------------------------------------------------------------------------------------
# 1. Round trip, key accounting.
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("naming", ["pretrain", "finetune"])
def test_roundtrip_accounts_for_every_key(tmp_path, naming):
  sd = make_vindlu_state(naming)
  path = tmp_path / "vindlu.pth"
  save_vindlu(path, sd)

  ckpt = vindlu.read_vindlu_checkpoint(path)
  assert type(ckpt.config) is dict and type(ckpt.config["model"]) is dict
  assert ckpt.config["model"]["text_encoder"]["fusion_layer"] == FUSION
  assert set(ckpt.state) == set(sd)
  assert ckpt.state[next(k for k in sd if k.endswith("relative_position_index"))].dtype == np.int64

  cfg = tiny_config("t2v2t")
  values, report = vindlu.import_vindlu(ckpt.state, cfg, source=str(path))
  assert report.naming == naming
  loaded, dropped, tied = set(report.loaded_sources), set(report.dropped), set(report.tied)
  assert loaded | dropped | tied == set(sd)
  assert not (loaded & dropped) and not (loaded & tied) and not (dropped & tied)
  assert dropped == expected_dropped(sd)
  decoder = {"text_encoder.cls.predictions.decoder.weight", "text_encoder.cls.predictions.decoder.bias"}
  assert tied == (decoder if naming == "pretrain" else set())
  new = set(report.new)
  assert {p for p in new if not p.startswith("fusion_encoder.t2v.")} == (
      set() if naming == "pretrain" else
      {p for p in values if p.startswith("text_encoder.mlm_head.")})
  assert any(p == "fusion_encoder.t2v.gate" for p in new)
  assert float(values["fusion_encoder.t2v.gate"]) == 0.0
  table = report.table()
  for word in ("loaded", "resized", "newly initialised", "dropped", "relative_position_index"):
    assert word in table

  # Layout transforms, spot checks.
  pre = "text_encoder.bert." if naming == "pretrain" else "text_encoder."
  np.testing.assert_array_equal(values["vision_encoder.embeddings.patch_embed.kernel"],
                                sd["vision_encoder.embeddings.patch_embeddings.projection.weight"]
                                .numpy().transpose(2, 3, 1, 0))
  packed = sd["vision_encoder.encoder.layer.1.temp_model.temporal_attn.in_proj_weight"].numpy()
  for j, name in enumerate(("query", "key", "value")):
    np.testing.assert_array_equal(values[f"vision_encoder.layers.1.temporal.attention.{name}.kernel"],
                                  packed[j * W:(j + 1) * W].T)
  np.testing.assert_array_equal(values["fusion_encoder.layers.1.crossattention.key.kernel"],
                                sd[pre + "encoder.layer.3.crossattention.self.key.weight"].numpy().T)

  exported, xreport = vindlu_export.export_vindlu(values, naming=naming)
  assert_same_state(exported, sd)
  assert set(xreport.rebuilt) == expected_dropped(sd)
  assert set(xreport.not_exported) == new  # T2V (gates 0) and, fine-tune naming, the MLM head


def test_cli_roundtrip_through_orbax(tmp_path, capsys):
  recipe = os.path.join(REPO, "configs", "msrvtt_ft.py") + ":tiny"
  cfg = load_recipe(recipe)
  m = cfg.model
  sd = make_vindlu_state("finetune", frames=m.vision.num_frames, image=m.vision.image_size,
                         vocab=m.text.vocab_size, embed=m.embed_dim)
  src, out_dir, back = tmp_path / "in.pth", tmp_path / "converted", tmp_path / "back.pth"
  save_vindlu(src, sd)

  assert convert.main(["vindlu", str(src), str(out_dir), "--config", recipe]) == 0
  printed = capsys.readouterr().out
  assert "newly initialised" in printed and "fusion_encoder.t2v.gate" in printed
  assert os.path.exists(out_dir / convert.IMPORT_REPORT)

  # What --config.init_from=OUT_DIR reads equals what --config.init_from=IN.pth reads.
  params = restore.params_from(str(out_dir), cfg.model)
  direct = restore.params_from(str(src), cfg.model)
  assert "dropped" in capsys.readouterr().out  # the .pth path prints the table too
  assert set(params) == set(direct)
  for k, v in direct.items():
    np.testing.assert_array_equal(np.asarray(params[k]), v, err_msg=k)

  assert convert.main(["--to", "vindlu", str(out_dir), str(back), "--config", recipe]) == 0
  assert "not exported" in capsys.readouterr().out
  assert_same_state(safe_torch_load(back)["model"], sd)


def test_init_from_pth_gives_new_params_the_runs_own_init(tmp_path, monkeypatch):
  """A run started with `init_from=X.pth`: VindLU's parameters come from the file, the
  T2V block (VindLU has none) keeps the run's own seeded init, and no second model is built."""
  from t2v2t_jax.models import t2v2t as t2v2t_lib  # noqa: PLC0415
  from t2v2t_jax import sharding  # noqa: PLC0415
  from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer  # noqa: PLC0415
  from t2v2t_jax.training import optimizer as optimizer_lib  # noqa: PLC0415
  from t2v2t_jax.training import train_state as state_lib  # noqa: PLC0415
  cfg = load_recipe(os.path.join(REPO, "configs", "msrvtt_ft.py") + ":tiny")
  m = cfg.model
  sd = make_vindlu_state("finetune", frames=m.vision.num_frames, image=m.vision.image_size,
                         vocab=m.text.vocab_size, embed=m.embed_dim)
  src = tmp_path / "in.pth"
  save_vindlu(src, sd)
  _, report = vindlu.import_vindlu(to_numpy(sd), m)
  with cfg.unlocked():
    cfg.init_from, cfg.seed = str(src), 3  # not the throw-away model's seed 0
  mesh = sharding.make_mesh(cfg.mesh)
  tx = optimizer_lib.make_optimizer(cfg.optimizer, 10)
  abstract = state_lib.abstract_state(m, tx, cfg.seed)
  shardings = state_lib.state_shardings(abstract, mesh)
  fresh = flatten(state_lib.create_sharded_state(m, tx, cfg.seed, shardings)["params"])
  from_file = restore.params_from(str(src), cfg.model)

  real_create = t2v2t_lib.create_model

  def no_second_model(config, **kwargs):
    # Shape-only builds (`abstract_model`, under eval_shape) pass no seed; a real one does.
    if "seed" in kwargs:
      raise AssertionError("the import built a second, seeded model")
    return real_create(config, **kwargs)
  monkeypatch.setattr(t2v2t_lib, "create_model", no_second_model)
  state, source = initialization.initial_state(
      cfg, ckpt=Checkpointer(str(tmp_path / "ckpt")), abstract=abstract,
      shardings=shardings, tx=tx, data_iter=None)
  assert source == f"initialised from {src}"
  got = flatten(state["params"])
  assert set(got) == set(from_file) and any(vindlu_keys.is_t2v(p) for p in report.new)
  assert any(not np.array_equal(fresh[p], from_file[p]) for p in report.new)  # seeds differ
  for path, value in got.items():
    want = fresh[path] if path in report.new else from_file[path]
    np.testing.assert_array_equal(np.asarray(value), np.asarray(want), err_msg=path)


# ------------------------------------------------------------------------------------------
# 2. Numerical parity with transformers, weights taken through the VindLU naming.
# ------------------------------------------------------------------------------------------

def randomized(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.2
      is_ln_weight = ("layernorm" in name.lower()) and name.endswith("weight")
      p.copy_(1.0 + noise if is_ln_weight else noise)
  return model.eval()


def test_parity_with_transformers_bert_and_beit():
  beit = randomized(transformers.BeitModel(transformers.BeitConfig(
      hidden_size=W, num_hidden_layers=VDEPTH, num_attention_heads=HEADS, intermediate_size=MLP,
      image_size=IMAGE, patch_size=PATCH, use_mean_pooling=True, use_relative_position_bias=True,
      use_absolute_position_embeddings=False, layer_scale_init_value=0.1, layer_norm_eps=1e-12,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), seed=1)
  bert = randomized(transformers.BertForMaskedLM(transformers.BertConfig(
      hidden_size=W, num_hidden_layers=TLAYERS, num_attention_heads=HEADS, intermediate_size=MLP,
      vocab_size=VOCAB, max_position_embeddings=MAXPOS, layer_norm_eps=1e-12,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)), seed=2)

  # VindLU-named state dict from the two HF models, by renaming keys (pretrain naming).
  sd = make_vindlu_state("pretrain", seed=3)  # VindLU-only keys (temporal, cross-attn, heads)
  hf_vision = {"vision_encoder." + hf_beit.legacy_key(k): v for k, v in beit.state_dict().items()}
  hf_text = {"text_encoder." + k: v for k, v in bert.state_dict().items()}
  for key in list(hf_vision) + list(hf_text):
    assert key in sd, f"renamed HF key {key} is not a VindLU key"
  sd.update(hf_vision)
  sd.update(hf_text)
  # An image BEiT has no temporal position embedding (VindLU adds row 0 even for T=1).
  sd["vision_encoder.embeddings.temporal_position_embeddings"].zero_()

  cfg = tiny_config("v2t")
  cfg.text.dropout_rate = 0.0
  model = create_model(cfg, seed=0)
  values, report = vindlu.import_vindlu(to_numpy(sd), cfg, model=model)
  assert report.naming == "pretrain" and report.new == []
  assign_into(model, values)

  # BEiT: one frame (T=1: temporal blocks skipped) against BeitModel.
  rng = np.random.default_rng(0)
  images = rng.normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  with torch.no_grad():
    out = beit(pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2))
  hidden, pooled = model.vision_encoder(jnp.asarray(images)[:, None])
  np.testing.assert_allclose(np.asarray(hidden[:, 0]), out.last_hidden_state.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(pooled[:, 0]), out.pooler_output.numpy(), atol=1e-4)

  # BERT: text layers, then the fusion layers without video (= BERT layers), then MLM head.
  ids = rng.integers(1, VOCAB, size=(2, 7))
  mask = np.ones((2, 7), np.int64)
  mask[1, 5:] = 0
  with torch.no_grad():
    ref = bert(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
               output_hidden_states=True)
  x, _ = model.encode_text(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(x), ref.hidden_states[FUSION].numpy(), atol=1e-4)
  for layer in model.fusion_encoder.layers:
    x = layer(x, jnp.asarray(mask).astype(bool))
  np.testing.assert_allclose(np.asarray(x), ref.hidden_states[-1].numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(model.mlm_logits(x)), ref.logits.numpy(), atol=1e-4)


# ------------------------------------------------------------------------------------------
# 3. Safety.
# ------------------------------------------------------------------------------------------

def test_pickled_call_is_refused_and_never_made(tmp_path):
  calls = []
  payload_module = types.ModuleType("vindlu_test_payload")

  def record(*args):
    calls.append(args)
    return {}

  record.__module__, record.__qualname__ = "vindlu_test_payload", "record"
  payload_module.record = record

  class Payload:
    def __reduce__(self):
      return record, ("called",)

  path = tmp_path / "payload.pth"
  sys.modules["vindlu_test_payload"] = payload_module
  try:
    torch.save({"model": make_vindlu_state("finetune"), "config": Payload()}, path)
    # Refused even while the function is importable: the loader never resolves it.
    with pytest.raises(UnsafeCheckpointError, match=r"vindlu_test_payload\.record") as e:
      vindlu.read_vindlu_checkpoint(path)
    assert e.value.global_name == "vindlu_test_payload.record"
  finally:
    del sys.modules["vindlu_test_payload"]
  assert calls == []

  marker = tmp_path / "pwned"

  class Shell:
    def __reduce__(self):
      return os.system, (f"echo pwned > {marker}",)

  path = tmp_path / "shell.pth"
  torch.save({"model": {"x": torch.zeros(1)}, "optimizer": Shell()}, path)
  with pytest.raises(UnsafeCheckpointError, match=r"(posix|nt|os)\.system"):
    safe_torch_load(path)
  assert not marker.exists()


def test_legacy_and_non_torch_files_are_refused(tmp_path):
  legacy = tmp_path / "legacy.pth"
  torch.save({"model": {"x": torch.zeros(1)}}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(UnsafeCheckpointError, match="legacy"):
    safe_torch_load(legacy)
  junk = tmp_path / "junk.pth"
  junk.write_bytes(b"not a checkpoint")
  with pytest.raises(UnsafeCheckpointError):
    safe_torch_load(junk)


# ------------------------------------------------------------------------------------------
# 4. Mismatches are errors that name every key.
# ------------------------------------------------------------------------------------------

def test_extra_missing_and_misshapen_keys_are_named():
  state = to_numpy(make_vindlu_state("pretrain"))
  state["text_encoder.bert.encoder.layer.0.attention.self.extra.weight"] = np.zeros((W, W), np.float32)
  del state["text_encoder.bert.encoder.layer.1.output.dense.bias"]
  state["vision_proj.weight"] = np.zeros((EMBED + 1, W), np.float32)
  with pytest.raises(vindlu_keys.VindluCheckpointError) as e:
    vindlu.import_vindlu(state, tiny_config("v2t"))
  msg = str(e.value)
  assert "unexpected source key 'text_encoder.bert.encoder.layer.0.attention.self.extra.weight'" in msg
  assert "missing source key 'text_encoder.bert.encoder.layer.1.output.dense.bias'" in msg
  assert "'vision_proj.weight'" in msg and "vision_proj.kernel" in msg
  assert msg.count("\n    ") == 3  # exactly these three problems


def test_bad_buffers_mixed_naming_and_tied_mismatch_are_errors():
  state = to_numpy(make_vindlu_state("pretrain"))
  key = "vision_encoder.encoder.layer.1.attention.attention.relative_position_bias.relative_position_index"
  state[key] = state[key][::-1].copy()
  state["text_encoder.cls.predictions.decoder.bias"] = state["text_encoder.cls.predictions.bias"] + 1
  with pytest.raises(vindlu_keys.VindluCheckpointError) as e:
    vindlu.import_vindlu(state, tiny_config("v2t"))
  assert key in str(e.value) and "'text_encoder.cls.predictions.decoder.bias' differs" in str(e.value)

  mixed = to_numpy(make_vindlu_state("pretrain"))
  mixed["text_encoder.embeddings.word_embeddings.weight"] = np.zeros((VOCAB, W), np.float32)
  with pytest.raises(vindlu_keys.VindluCheckpointError, match="mixes the pretrain naming"):
    vindlu.import_vindlu(mixed, tiny_config("v2t"))


# ------------------------------------------------------------------------------------------
# Resizing: relative position tables (image size) and temporal embedding (frames).
# ------------------------------------------------------------------------------------------

def test_resizing_tables_and_temporal_embedding():
  sd = make_vindlu_state("finetune", frames=2)           # 32 px (2x2 grid), 2 frames
  values, report = vindlu.import_vindlu(to_numpy(sd), tiny_config("v2t", frames=4, image=48))
  for i in range(VDEPTH):
    table = sd[f"vision_encoder.encoder.layer.{i}.attention.attention.relative_position_bias."
               "relative_position_bias_table"].numpy()
    np.testing.assert_allclose(values[f"vision_encoder.layers.{i}.relative_position_bias.table"],
                               ve.resize_relative_position_table(table, 2, 3), rtol=0, atol=0)
  emb = values["vision_encoder.embeddings.temporal_pos_embed"]
  stored = sd["vision_encoder.embeddings.temporal_position_embeddings"].numpy()
  np.testing.assert_array_equal(emb[:, :2], stored)       # T=2 checkpoint into T=4: zero-pad
  assert not emb[:, 2:].any()
  assert len(report.resized) == VDEPTH + 1 and "zero-padded" in report.table()

  # Checkpoints saved without the int buffers load too (they are rebuilt, not read).
  sd4 = make_vindlu_state("finetune", frames=4)
  for key in expected_dropped(sd4):
    if not key.startswith("vision_encoder.encoder.layer.0.temp_model.linear"):
      del sd4[key]
  values, report = vindlu.import_vindlu(to_numpy(sd4), tiny_config("v2t", frames=2))
  np.testing.assert_array_equal(values["vision_encoder.embeddings.temporal_pos_embed"],
                                sd4["vision_encoder.embeddings.temporal_position_embeddings"].numpy()[:, :2])


# ------------------------------------------------------------------------------------------
# 5. t2v2t with gates at 0 scores exactly like v2t from the same checkpoint.
# ------------------------------------------------------------------------------------------

def retrieval_scores(model, frames, ids, mask):
  pooled, tokens = model.encode_video(frames)
  text, _ = model.encode_text(ids, mask)
  v, t = model.video_embedding(pooled), model.text_embedding(text)
  sim = jnp.einsum("vfe,te->vt", v, t) / v.shape[1] / model.clamped_temp()   # mean of cosines
  nv, nt = frames.shape[0], ids.shape[0]
  vi, ti = np.repeat(np.arange(nv), nt), np.tile(np.arange(nt), nv)          # every pair
  fused, _ = model.fuse(text[ti], mask[ti], tokens[vi])
  return np.asarray(sim), np.asarray(model.itm_logits(fused))


def test_t2v2t_with_zero_gates_scores_like_v2t():
  state = to_numpy(make_vindlu_state("pretrain"))
  rng = np.random.default_rng(0)
  frames = jnp.asarray(rng.integers(0, 256, size=(2, 2, IMAGE, IMAGE, 3)), jnp.uint8)
  ids = jnp.asarray(rng.integers(1, VOCAB, size=(3, 6)))
  mask = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
  scores = {}
  for mode in ("v2t", "t2v2t"):
    cfg = tiny_config(mode)
    model = create_model(cfg, seed=5)
    values, report = vindlu.import_vindlu(state, cfg, model=model)
    assert bool(report.new) == (mode == "t2v2t")
    assign_into(model, values)
    scores[mode] = retrieval_scores(model, frames, ids, mask)
  for a, b in zip(scores["v2t"], scores["t2v2t"]):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
  assert np.ptp(scores["v2t"][1]) > 0  # non-trivial logits


def test_export_refuses_t2v_blocks_that_change_the_model():
  values, _ = vindlu.import_vindlu(to_numpy(make_vindlu_state("finetune")), tiny_config("t2v2t"))
  values["fusion_encoder.t2v.gate"] = np.asarray(0.5, np.float32)
  with pytest.raises(vindlu_keys.VindluCheckpointError, match=r"fusion_encoder\.t2v\.gate=0\.5"):
    vindlu_export.export_vindlu(values)
  exported, report = vindlu_export.export_vindlu(values, drop_t2v=True)
  assert "fusion_encoder.t2v.gate" in report.not_exported
  assert not any("t2v" in k for k in exported)
