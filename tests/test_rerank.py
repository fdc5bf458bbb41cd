"""Stage-2 rerank (`RetrievalEvaluator.score_candidates`): every pair's score is the
matching head on that pair alone, however the pairs are batched and whichever way the
scorer feeds the videos (in 'v2t' one set of cross-attention keys and values a video)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bert_reference import randomize
from t2v2t_jax import sharding
from t2v2t_jax.evaluation import retrieval
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.t2v2t import create_model

NUM_VIDEOS, NUM_TEXTS, T, L = 5, 7, 2, 6


def pairs_of_uneven_videos():
  """(video, text) pairs, shuffled: video 0 has 9 pairs, 1 has 1, 2 none, 3 has 4, 4 has 6;
  so batches of 8 pairs hold one to three videos."""
  counts = {0: 9, 1: 1, 3: 4, 4: 6}
  rng = np.random.default_rng(1)
  pairs = np.array([[v, t] for v, n in counts.items() for t in rng.permutation(NUM_TEXTS + 2)[:n] % NUM_TEXTS])
  return pairs[rng.permutation(len(pairs))]


@pytest.mark.parametrize("mode", ["v2t", "t2v2t"])
def test_rerank_scores_are_each_pair_alone(mode, monkeypatch):
  cfg = model_config("test/16", "test", mode)
  model = create_model(cfg)
  randomize(model, seed=3, scale=0.05)   # the ITM head's logits differ from pair to pair
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  n_tokens = (cfg.vision.image_size // 16) ** 2 + 1
  tokens = rng.standard_normal((NUM_VIDEOS, T, n_tokens, cfg.vision.width)).astype(np.float16)
  hidden = rng.standard_normal((NUM_TEXTS, L, cfg.text.width)).astype(np.float32)
  mask = np.ones((NUM_TEXTS, L), np.int32)
  mask[::2, 4:] = 0
  pairs = pairs_of_uneven_videos()

  @jax.jit
  def one_pair(params, hidden, mask, video):
    m = nnx.merge(graphdef, params)
    fused, _ = m.fuse(hidden[None], mask[None], video[None].astype(jnp.float32))
    return m.itm_logits(fused)[0, 1]

  expected = np.array([one_pair(params, hidden[t], mask[t], tokens[v]) for v, t in pairs])
  assert np.ptp(expected) > 1e-2, expected   # a test that can fail: scores differ

  # Slots of 4 texts in 'v2t' (32 at full size), so that a batch of 8 holds two: video 0's
  # 9 pairs fill slots of 4, 4 and 1, video 4's 6 fill 4 and 2.
  monkeypatch.setattr(retrieval, "MAX_TEXTS_PER_SLOT", 4)
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:1])
  evaluator = retrieval.RetrievalEvaluator(graphdef, mesh, rerank_batch_size=8,
                                           videos_per_batch=2, progress=False)
  scores = evaluator.score_candidates(params, pairs, hidden, mask, tokens)
  np.testing.assert_allclose(scores, expected, atol=2e-5)
  stats = evaluator.transfer_stats
  assert stats["pairs"] == len(pairs) == 20
  if mode == "v2t":
    # Slots (videos 0 0 0 1 3 4 4) in batches of at most 2 slots and 2 videos:
    # [0 0] [0 1] [3 4] [4].
    assert stats["texts_per_slot"] == 4 and stats["batches"] == 4
    assert stats["padded_texts"] == 4 * 8 - 20
  else:
    # A pair a slot; at most 8 slots and 2 videos a batch: [0 x 8] [0 1] [3 x 4, 4 x 4] [4 x 2].
    assert stats["texts_per_slot"] == 1 and stats["batches"] == 4
    assert stats["padded_texts"] == 4 * 8 - 20
  # No candidates (an empty corpus side): no batch, no score.
  assert evaluator.score_candidates(params, pairs[:0], hidden, mask, tokens).shape == (0,)
