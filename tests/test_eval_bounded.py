"""Evaluation without a video-token store (`eval.token_cache='recompute'`): the rerank reads
and encodes the videos again, batch by batch, and must score the same pairs with the same
tokens as the stored ('memory', 'disk') paths; each video is encoded once in the rerank
pass; a video that reads differently the second time is caught; and 'auto' picks by size.

Exact equality is asserted: on one CPU device the same jitted encoder on the same frames
gives the same tokens bit for bit, and a pair's matching score does not depend on which
other pairs share its scoring batch (rows are independent, the programs' shapes are the
same), so any difference would mean other tokens or other pairs."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from bert_reference import randomize
from configs import common
from input_pipeline.pipeline import EvalData
from t2v2t_jax import sharding
from t2v2t_jax.evaluation import evaluate as evaluate_lib
from t2v2t_jax.evaluation import metrics as metrics_lib
from t2v2t_jax.evaluation import retrieval
from t2v2t_jax.models.config import model_config
from t2v2t_jax.models.t2v2t import create_model, similarity

NUM_VIDEOS, FRAMES, SIZE, L, BATCH, K = 9, 2, 32, 6, 4, 3


class CountingVideos:
  """Re-iterable eval batches (as a Grain dataset is) that count each video's readings;
  `change_on_reading`: {video: n} gives video other frames from its n-th reading on."""

  def __init__(self, frames: np.ndarray, change_on_reading: dict | None = None):
    self.frames, self.change = frames, change_on_reading or {}
    self.readings = np.zeros(len(frames), int)

  def __iter__(self):
    n = len(self.frames)
    padded = -(-n // BATCH) * BATCH   # the last batch repeats the last video, valid = 0
    ids = np.minimum(np.arange(padded), n - 1)
    valid = (np.arange(padded) < n).astype(np.int32)
    for start in range(0, padded, BATCH):
      index = ids[start:start + BATCH]
      frames = self.frames[index].copy()
      for row, (v, ok) in enumerate(zip(index, valid[start:start + BATCH])):
        if ok:
          self.readings[v] += 1
          if v in self.change and self.readings[v] >= self.change[v]:
            frames[row] = 255 - frames[row]
      yield {"frames": frames, "video_idx": index.astype(np.int32),
             "valid": valid[start:start + BATCH]}


def corpus(change_on_reading=None) -> EvalData:
  rng = np.random.default_rng(0)
  txt2vid = np.array([0, 1, 1, 2, 3, 4, 4, 5, 6, 7, 8, 8], np.int32)   # 12 texts
  vid2txt = [list(np.flatnonzero(txt2vid == v)) for v in range(NUM_VIDEOS)]
  ids = rng.integers(5, 60, (len(txt2vid), L)).astype(np.int32)
  ids[:, 0] = 1
  mask = np.ones_like(ids)
  mask[::3, 4:] = 0
  frames = rng.integers(0, 256, (NUM_VIDEOS, FRAMES, SIZE, SIZE, 3), dtype=np.uint8)
  return EvalData(name="bounded", num_frames=FRAMES,
                  videos=CountingVideos(frames, change_on_reading), num_videos=NUM_VIDEOS,
                  texts=[str(i) for i in range(len(txt2vid))], input_ids=ids,
                  attention_mask=mask, txt2vid=txt2vid, vid2txt=vid2txt,
                  video_paths=[f"v{i}.mp4" for i in range(NUM_VIDEOS)])


@pytest.fixture(scope="module", params=["v2t", "t2v2t"])
def model(request):
  cfg = model_config("test/16", "test", request.param)
  cfg.vision.image_size, cfg.vision.num_frames, cfg.text.vocab_size = SIZE, FRAMES, 64
  m = create_model(cfg)
  randomize(m, seed=5, scale=0.05)   # the ITM head's logits differ from pair to pair
  return nnx.split(m, nnx.Param)


def evaluator(graphdef, **kw):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1}, devices=jax.devices()[:1])
  return retrieval.RetrievalEvaluator(graphdef, mesh, k=K, rerank_batch_size=8,
                                      text_batch_size=8, videos_per_batch=2, progress=False,
                                      **kw)


def test_recompute_scores_the_same_pairs_with_the_same_tokens(model, tmp_path):
  graphdef, params = model
  # Reference: the stored in-memory path, step by step.
  stored = evaluator(graphdef, token_cache="memory")
  data = corpus()
  video_emb, tokens, text_emb, hidden = stored.embed(params, data)
  assert data.videos.readings.tolist() == [1] * NUM_VIDEOS
  sim = similarity(video_emb, text_emb)
  pairs, _, _ = metrics_lib.candidate_pairs(sim, K)
  expected = stored.score_candidates(params, pairs, hidden, data.attention_mask, tokens)
  assert np.ptp(expected) > 1e-2 and len(pairs) < NUM_VIDEOS * len(data.texts)

  recompute = evaluator(graphdef, token_cache="recompute")
  data = corpus()
  embedded = recompute.embed(params, data)
  assert embedded.video_tokens is None   # nothing of the tokens kept after stage 1
  np.testing.assert_array_equal(embedded.video_emb, video_emb)
  got = recompute.score_candidates_recomputed(params, pairs, embedded.text_hidden,
                                              data.attention_mask, data, embedded.video_emb)
  np.testing.assert_array_equal(got, expected)
  # Stage 1 and the rerank pass: every video read and encoded exactly twice in all.
  assert data.videos.readings.tolist() == [2] * NUM_VIDEOS
  assert recompute.reread_stats == dict(videos_encoded=NUM_VIDEOS, max_embedding_diff=0.0,
                                        videos_changed=0)
  assert recompute.transfer_stats["pairs"] == len(pairs)

  # The whole evaluation: the same metrics from all three token caches.
  results = {}
  for cache in ("memory", "disk", "recompute"):
    ev = evaluator(graphdef, token_cache=cache,
                   token_cache_dir=str(tmp_path / cache) if cache == "disk" else None)
    results[cache] = ev.evaluate(params, corpus())
  assert results["memory"] == results["disk"] == results["recompute"]
  assert os.listdir(tmp_path) == ["disk"]   # only 'disk' wrote a file


def test_a_video_read_differently_for_the_rerank_is_caught(model, capsys):
  graphdef, params = model
  ev = evaluator(graphdef, token_cache="recompute")
  data = corpus(change_on_reading={3: 2})   # video 3 gives other frames when read again
  embedded = ev.embed(params, data)
  sim = similarity(embedded.video_emb, embedded.text_emb)
  pairs, _, _ = metrics_lib.candidate_pairs(sim, K)
  got = ev.score_candidates_recomputed(params, pairs, embedded.text_hidden,
                                       data.attention_mask, data, embedded.video_emb)
  assert ev.reread_stats["videos_changed"] == 1
  assert ev.reread_stats["max_embedding_diff"] > retrieval.REREAD_TOLERANCE
  assert "1 video(s) gave other embeddings" in capsys.readouterr().out
  # Its pairs were scored with the new tokens (the others' scores are untouched).
  stored = evaluator(graphdef, token_cache="memory")
  _, tokens = stored.embed_videos(params, corpus())
  reference = stored.score_candidates(params, pairs, embedded.text_hidden,
                                      data.attention_mask, tokens)
  changed = pairs[:, 0] == 3
  np.testing.assert_array_equal(got[~changed], reference[~changed])
  assert np.all(got[changed] != reference[changed])


def test_auto_token_cache_by_size():
  config = common.base_config()   # B/16 at 224 px: 197 tokens of 768 a frame
  config.eval.token_cache = "auto"
  per_frame = 197 * 768 * 2
  assert evaluate_lib.token_bytes(config.model, 4917, 32) == 4917 * 32 * per_frame
  # ActivityNet val1 at 32 frames, 44.3 GiB: too large to keep; MSR-VTT 1k-A at 12, 3.4 GiB.
  assert evaluate_lib.token_cache_for(config, 4917, 32) == "recompute"
  assert evaluate_lib.token_cache_for(config, 1000, 12) == "memory"
  config.eval.token_memory_gib = 3.0
  assert evaluate_lib.token_cache_for(config, 1000, 12) == "recompute"
  config.eval.token_cache = "disk"   # an explicit choice is kept
  assert evaluate_lib.token_cache_for(config, 4917, 32) == "disk"
  config.eval.token_cache = "ram"
  with pytest.raises(ValueError, match="eval.token_cache"):
    evaluate_lib.token_cache_for(config, 10, 4)
  with pytest.raises(ValueError, match="token_cache_dir"):
    retrieval.RetrievalEvaluator(None, sharding.make_mesh({"data": -1, "fsdp": 1}),
                                 token_cache="disk")


def test_evaluated_rows_equal_the_one_pair_reference(model):
  """The recompute path against an independent one-pair-at-a-time fusion of each pair's
  video encoded alone (float tolerance: a video encoded in a batch of 4 versus alone
  runs other matrix shapes)."""
  graphdef, params = model
  ev = evaluator(graphdef, token_cache="recompute")
  data = corpus()
  embedded = ev.embed(params, data)
  pairs = np.array([[0, 0], [3, 4], [3, 11], [8, 2], [8, 10]])
  got = ev.score_candidates_recomputed(params, pairs, embedded.text_hidden,
                                       data.attention_mask, data)

  @jax.jit
  def one_pair(params, frames, hidden, mask):
    m = nnx.merge(graphdef, params)
    _, tok = m.encode_video(frames[None])
    fused, _ = m.fuse(hidden[None], mask[None], tok.astype(np.float16).astype(np.float32))
    return m.itm_logits(fused)[0, 1]

  expected = [one_pair(params, data.videos.frames[v], embedded.text_hidden[t], data.attention_mask[t])
              for v, t in pairs]
  np.testing.assert_allclose(got, np.array(expected), atol=2e-3, rtol=0)
