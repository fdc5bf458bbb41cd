"""The fusion ablation script end to end at the tiniest size: it trains, evaluates both
splits, writes the tables and keeps the discussion of an earlier report."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not first: benchmarks/input_pipeline.py would shadow the input_pipeline package
# (in this process and in every process it spawns, which inherit sys.path).
sys.path.append(os.path.join(ROOT, "benchmarks"))

import fusion_ablation  # noqa: E402


def test_ablation_tiny(tmp_path):
  out = tmp_path / "ablation.md"
  out.write_text("old tables\n<!-- discussion -->\nWhat we make of it.\n")
  argv = ["--recipe-arg", "tiny", "--modes", "t2v2t", "--seeds", "0", "--steps", "2",
          "--root", str(tmp_path / "runs"), "--out", str(out),
          "--data-root", str(tmp_path / "data")]
  fusion_ablation.main(argv)
  text = out.read_text()
  assert "old tables" not in text and text.endswith("<!-- discussion -->\nWhat we make of it.\n")
  assert "| t2v2t | reranked |" in text and "## Event-order split" in text
  result = json.loads((tmp_path / "runs" / "t2v2t_seed0" / "ablation.json").read_text())
  order = result["corpora"]["synthetic_test_order"]
  # Every caption of the order split is compared with exactly one twin.
  assert order["pair_texts"] == order["num_texts"] > 0
  assert 0 <= order["pair_acc_emb"] <= 100 and 0 <= order["pair_acc_itm"] <= 100
  assert order["num_videos"] % 2 == 0
  assert result["fusion_flops_per_pair"] > 0 and result["train_s"] > 0
  # A rerun reuses the finished run instead of training again.
  mtime = os.path.getmtime(tmp_path / "runs" / "t2v2t_seed0" / "ablation.json")
  fusion_ablation.main(argv)
  assert os.path.getmtime(tmp_path / "runs" / "t2v2t_seed0" / "ablation.json") == mtime
  # ... but never a run trained with another config: the error names the field.
  with pytest.raises(ValueError, match="total_steps"):
    fusion_ablation.main([a if a != "2" else "3" for a in argv])


def test_order_pair_accuracy_by_hand():
  """4 videos in 2 order pairs, one caption each; scores chosen so the accuracies are known."""
  import types

  import numpy as np

  from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator

  class Stub:
    embed = RetrievalEvaluator.embed  # the real composition of the two encoders below

    def embed_videos(self, params, data):
      # One frame per video, embeddings e_v; text t's embedding picks a score row below.
      return np.eye(4, dtype=np.float32)[:, None, :], np.zeros((4, 1, 1, 1), np.float16)

    def embed_texts(self, params, data):
      # stage 1 score[v, t] = text_emb[t, v]: captions 0 and 3 prefer their own video,
      # caption 1 prefers its twin (0), caption 2 ties with its twin (3).
      s = np.array([[0.9, 0.1, 0, 0], [0.8, 0.2, 0, 0], [0, 0, 0.5, 0.5], [0, 0, 0.1, 0.7]],
                   np.float32)
      return s, np.zeros((4, 1, 1), np.float32)

    def score_candidates(self, params, pairs, hidden, mask, tokens):
      # The matching head is right for every caption but caption 0.
      own = {0: -1.0, 1: 2.0, 2: 3.0, 3: 1.0}
      return np.array([own[t] if v == t else 0.0 for v, t in pairs], np.float32)

  data = types.SimpleNamespace(txt2vid=np.arange(4), attention_mask=np.ones((4, 1), np.int32))
  acc = fusion_ablation.order_pair_accuracy(Stub(), None, data)
  assert acc == {"pair_acc_emb": 100 * (1 + 0 + 0.5 + 1) / 4, "pair_acc_itm": 75.0,
                 "pair_texts": 4}
  # Given the evaluation's embeddings, it uses them instead of embedding again.
  embedded = Stub().embed(None, data)
  lazy = Stub()
  lazy.embed = None  # would fail if called
  assert fusion_ablation.order_pair_accuracy(lazy, None, data, embedded) == acc
