"""Hugging Face BERT import: parity with transformers' PyTorch BERT, and strictness."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from t2v2t_jax.checkpoints import hf_bert
from t2v2t_jax.checkpoints.params import flatten_params
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.fusion import FusionEncoder
from t2v2t_jax.models.text_encoder import TextEncoder

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "a man is playing a guitar on stage while the crowd cheers.",
    "a cat sleeps",
    "two people are cooking pasta in a small kitchen",
]


def build(hf_config: dict, fusion_layer: int, mode: str = "v2t"):
  cfg = model_config("test/16", "test", mode)
  cfg.text.update(hf_bert.text_config_from_hf(hf_config, fusion_layer))
  if mode != "v2t":
    cfg.vision.width = cfg.text.width
  text = TextEncoder(cfg.text, rngs=nnx.Rngs(0))
  fusion = FusionEncoder(cfg, rngs=nnx.Rngs(1))
  return cfg, text, fusion


def all_hidden_states(text, fusion, ids, mask):
  """Embeddings output and every BERT layer's output; fusion layers on their text-only path."""
  h, aux = text(jnp.asarray(ids), jnp.asarray(mask))
  states = list(aux["hidden_states"])
  for layer in fusion.layers:
    h = layer(h, jnp.asarray(mask).astype(bool))
    states.append(h)
  return states, h


# -- a real checkpoint: all-MiniLM-L6-v2 (6 layers, 384 wide, 12 heads) --------------------------



def test_minilm_every_layer_matches_transformers(minilm_folder):
  hf_config, _ = hf_bert.read_hf_bert(minilm_folder)
  _, text, fusion = build(hf_config, fusion_layer=4)
  report = hf_bert.load_bert_into(text, fusion, minilm_folder)
  assert "pooler.dense.weight" in report.dropped and "embeddings.position_ids" in report.dropped
  assert any("crossattention" in p for p in report.new)
  assert any(p.startswith("text_encoder.mlm_head.") for p in report.new)  # no MLM head in source

  tokenizer = transformers.BertTokenizer(vocab=os.path.join(minilm_folder, "vocab.txt"))
  enc = tokenizer(SENTENCES, padding=True, return_tensors="np")
  assert (enc["input_ids"] != tokenizer.unk_token_id).mean() > 0.9  # real tokens, not [UNK]
  ids, mask = enc["input_ids"], enc["attention_mask"]
  assert (mask == 0).any()

  ref = transformers.BertModel.from_pretrained(minilm_folder, attn_implementation="eager").eval()
  with torch.no_grad():
    out = ref(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
              output_hidden_states=True)
  ours, _ = all_hidden_states(text, fusion, ids, mask)
  assert len(ours) == len(out.hidden_states) == 7
  for i, (a, b) in enumerate(zip(ours, out.hidden_states)):
    # Padding positions too: they attend to the real tokens in both implementations.
    np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, rtol=0,
                               err_msg=f"hidden state {i}")


# -- a tiny BertForMaskedLM written by transformers (bert. prefix, MLM head) ----------------------

@pytest.fixture(scope="module")
def tiny_mlm(tmp_path_factory):
  torch.manual_seed(0)
  config = transformers.BertConfig(
      vocab_size=99, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
      intermediate_size=64, max_position_embeddings=40, attn_implementation="eager")
  model = transformers.BertForMaskedLM(config).eval()
  with torch.no_grad():  # non-trivial LayerNorms and biases
    for name, p in model.named_parameters():
      if "word_embeddings" not in name:
        p.add_(0.1 * torch.randn_like(p))
  folder = tmp_path_factory.mktemp("tiny_bert_mlm")
  model.save_pretrained(folder)
  return str(folder), model


def test_tiny_mlm_logits_match_transformers(tiny_mlm):
  folder, model = tiny_mlm
  hf_config, state = hf_bert.read_hf_bert(folder)
  assert any(k.startswith("bert.") for k in state)
  _, text, fusion = build(hf_config, fusion_layer=2, mode="t2v2t")
  report = hf_bert.load_bert_into(text, fusion, folder)
  assert "text_encoder.mlm_head.bias" in report.loaded_targets
  assert any(p.startswith("fusion_encoder.t2v.") for p in report.new)

  rng = np.random.default_rng(0)
  ids = rng.integers(1, 99, size=(2, 9))
  mask = np.ones_like(ids)
  mask[1, 5:] = 0
  ids[1, 5:] = 0
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                output_hidden_states=True)
  states, last = all_hidden_states(text, fusion, ids, mask)
  for i, (a, b) in enumerate(zip(states, out.hidden_states)):
    np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-4, err_msg=f"hidden state {i}")
  np.testing.assert_allclose(np.asarray(text.mlm_logits(last)), out.logits.numpy(), atol=1e-4)


def test_pytorch_bin_with_old_names_loads_the_same(tiny_mlm, tmp_path):
  """pytorch_model.bin, LayerNorm gamma/beta, tied decoder weight/bias present."""
  folder, model = tiny_mlm
  sd = {}
  for k, v in model.state_dict().items():
    k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
    sd[k] = v.clone()
  assert "cls.predictions.decoder.weight" in sd
  sd["cls.predictions.decoder.bias"] = sd["cls.predictions.bias"].clone()
  torch.save(sd, tmp_path / "pytorch_model.bin")
  (tmp_path / "config.json").write_text((open(os.path.join(folder, "config.json")).read()))

  hf_config, _ = hf_bert.read_hf_bert(folder)
  _, text_a, fusion_a = build(hf_config, 2)
  hf_bert.load_bert_into(text_a, fusion_a, folder)
  _, text_b, fusion_b = build(hf_config, 2)
  report = hf_bert.load_bert_into(text_b, fusion_b, str(tmp_path))
  assert set(report.tied) == {"cls.predictions.decoder.weight", "cls.predictions.decoder.bias"}
  for m_a, m_b in [(text_a, text_b), (fusion_a, fusion_b)]:
    pa, pb = flatten_params(m_a), flatten_params(m_b)
    for key in pa:
      if "crossattention" not in key:
        np.testing.assert_array_equal(np.asarray(pa[key]), np.asarray(pb[key]), err_msg=key)


# -- strictness ----------------------------------------------------------------------------------

def write_variant(tmp_path, folder, edit):
  state = dict(load_file(os.path.join(folder, "model.safetensors")))
  edit(state)
  save_file(state, str(tmp_path / "model.safetensors"))
  (tmp_path / "config.json").write_text(open(os.path.join(folder, "config.json")).read())
  return str(tmp_path)


@pytest.mark.parametrize("edit, expected", [
    (lambda s: s.__setitem__("bert.encoder.layer.0.attention.self.extra", np.zeros(3, np.float32)),
     "unexpected source key 'encoder.layer.0.attention.self.extra'"),
    (lambda s: s.pop("bert.encoder.layer.3.output.dense.bias"),
     "missing source key 'encoder.layer.3.output.dense.bias'"),
    (lambda s: s.pop("cls.predictions.transform.LayerNorm.weight"),
     "missing source key 'cls.predictions.transform.LayerNorm.weight'"),
    (lambda s: s.__setitem__("cls.predictions.decoder.weight", np.ones((99, 32), np.float32)),
     "'cls.predictions.decoder.weight' differs from 'embeddings.word_embeddings.weight'"),
    (lambda s: s.__setitem__("bert.encoder.layer.1.intermediate.dense.bias", np.zeros(65, np.float32)),
     "shape mismatch for 'text_encoder.layers.1.ffn.intermediate.bias'"),
])
def test_import_errors_name_the_key(tiny_mlm, tmp_path, edit, expected):
  folder, _ = tiny_mlm
  bad = write_variant(tmp_path, folder, edit)
  hf_config, _ = hf_bert.read_hf_bert(folder)
  _, text, fusion = build(hf_config, 2)
  before = {k: np.asarray(v) for k, v in flatten_params(text).items()}
  with pytest.raises(hf_bert.BertImportError, match=expected.replace("(", r"\(").replace(")", r"\)")):
    hf_bert.load_bert_into(text, fusion, bad)
  after = flatten_params(text)
  assert all(np.array_equal(before[k], np.asarray(after[k])) for k in before)  # nothing written


def test_structure_mismatch_and_text_only_import(tiny_mlm):
  folder, _ = tiny_mlm
  hf_config, _ = hf_bert.read_hf_bert(folder)
  cfg = model_config("test/16", "test", "v2t")
  cfg.text.update(hf_bert.text_config_from_hf(hf_config, 2))
  cfg.text.num_heads = 4
  with pytest.raises(hf_bert.BertImportError, match="num_attention_heads=2"):
    hf_bert.load_bert_into(TextEncoder(cfg.text, rngs=nnx.Rngs(0)), FusionEncoder(cfg, rngs=nnx.Rngs(0)),
                           folder)
  # Text encoder only: the fusion layers' source keys are dropped and listed, not silently.
  _, text, _ = build(hf_config, 2)
  report = hf_bert.load_bert_into(text, None, folder)
  assert "encoder.layer.3.output.dense.weight" in report.dropped
  assert "text_encoder.layers.1.ffn.output.kernel" in report.loaded_targets


def test_text_config_from_hf():
  hf = {"model_type": "bert", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "vocab_size": 30522, "max_position_embeddings": 512,
        "type_vocab_size": 2, "hidden_dropout_prob": 0.1, "layer_norm_eps": 1e-12, "hidden_act": "gelu"}
  got = hf_bert.text_config_from_hf(hf, 9)
  base = model_config("B/16", "base").text
  for key, value in got.items():
    assert base[key] == value, key
  assert "fusion_layer" not in hf_bert.text_config_from_hf(hf, None)
  with pytest.raises(hf_bert.BertImportError, match="hidden_act"):
    hf_bert.text_config_from_hf({**hf, "hidden_act": "gelu_new"}, 9)
  with pytest.raises(hf_bert.BertImportError, match="fusion_layer=12"):
    hf_bert.text_config_from_hf(hf, 12)


def test_rule_table_is_reusable():
  rules = hf_bert.bert_rules(9, 3, cross_attention=True)
  targets = {r.source: r.target for r in rules}
  assert targets["encoder.layer.8.attention.self.query.weight"] == "text_encoder.layers.8.attention.query.kernel"
  assert targets["encoder.layer.9.attention.self.query.weight"] == "fusion_encoder.layers.0.attention.query.kernel"
  assert targets["encoder.layer.11.crossattention.output.LayerNorm.weight"] == \
      "fusion_encoder.layers.2.crossattention_output.layer_norm.scale"
  assert targets["cls.predictions.bias"] == "text_encoder.mlm_head.bias"
  assert len({r.target for r in rules}) == len(rules)
