"""Retrieval metrics on hand-made score matrices; every expected rank written out by hand."""

import numpy as np
import pytest

from t2v2t_jax.evaluation import metrics

# text -> video: 5 texts over 3 videos, one ground truth each.
SCORES_T2V = np.array([
    [0.9, 0.5, 0.1],   # gt 0: best                              -> rank 0
    [0.7, 0.7, 0.2],   # gt 1: tied with video 0 (lower index)   -> rank 1
    [0.3, 0.3, 0.3],   # gt 2: three-way tie, highest index      -> rank 2
    [0.8, 0.1, 0.2],   # gt 1: below 0.8 and 0.2                 -> rank 2
    [0.5, 0.5, 0.9],   # gt 0: below 0.9, ahead of its tie (1)   -> rank 1
])
TXT2VID = [0, 1, 2, 1, 0]
# video -> text: 3 videos over the 5 texts, several ground truths (best counts).
SCORES_V2T = np.array([
    [0.1, 0.9, 0.8, 0.7, 0.6],   # gt {0, 4}: text 4 rank 3, text 0 rank 4   -> 3
    [0.2, 0.5, 0.9, 0.5, 0.1],   # gt {1, 3}: text 1 rank 1, text 3 rank 2   -> 1
    [0.3, 0.2, 0.1, 0.4, 0.5],   # gt {2}: lowest                            -> 4
])
VID2TXT = [[0, 4], [1, 3], [2]]


def test_ranks_by_hand_with_ties_and_several_ground_truths():
  assert metrics.retrieval_ranks(SCORES_T2V, TXT2VID).tolist() == [0, 1, 2, 2, 1]
  assert metrics.retrieval_ranks(SCORES_V2T, VID2TXT).tolist() == [3, 1, 4]
  # Other tie rules: every tie against (pessimistic) or for (optimistic) the ground truth.
  assert metrics.retrieval_ranks(SCORES_T2V, TXT2VID, ties="pessimistic").tolist() == [0, 1, 2, 2, 2]
  assert metrics.retrieval_ranks(SCORES_T2V, TXT2VID, ties="optimistic").tolist() == [0, 0, 0, 2, 1]
  assert metrics.retrieval_ranks(SCORES_V2T, VID2TXT, ties="pessimistic").tolist() == [3, 2, 4]
  # NaN counts as -inf.
  assert metrics.retrieval_ranks(np.array([[np.nan, 0.1, 0.2]]), [0]).tolist() == [2]
  with pytest.raises(ValueError):
    metrics.retrieval_ranks(SCORES_T2V, [0, 1, 2, 1, 3])   # ground truth out of range


def test_retrieval_metrics_by_hand():
  m = metrics.retrieval_metrics(SCORES_T2V, SCORES_V2T, TXT2VID, VID2TXT)
  # text->video ranks [0, 1, 2, 2, 1] -> 1-based [1, 2, 3, 3, 2]
  assert m["vid_r1"] == pytest.approx(20.0)
  assert m["vid_r5"] == pytest.approx(100.0) and m["vid_r10"] == pytest.approx(100.0)
  assert m["vid_r_mean"] == pytest.approx(220.0 / 3)
  assert m["vid_medr"] == pytest.approx(2.0)
  assert m["vid_meanr"] == pytest.approx(11 / 5)
  # video->text ranks [3, 1, 4] -> 1-based [4, 2, 5]
  assert m["txt_r1"] == pytest.approx(0.0)
  assert m["txt_r5"] == pytest.approx(100.0)
  assert m["txt_medr"] == pytest.approx(4.0)
  assert m["txt_meanr"] == pytest.approx(11 / 3)
  assert m["r_mean"] == pytest.approx((220.0 / 3 + 200.0 / 3) / 2)
  # Unambiguous aliases: vid = text->video, txt = video->text.
  for name in ("r1", "r5", "r10", "r_mean", "medr", "meanr"):
    assert m[f"t2v_{name}"] == m[f"vid_{name}"]
    assert m[f"v2t_{name}"] == m[f"txt_{name}"]
  emb = metrics.retrieval_metrics(SCORES_T2V, SCORES_V2T, TXT2VID, VID2TXT, prefix="emb_")
  assert emb["emb_t2v_r1"] == m["t2v_r1"] and "t2v_r1" not in emb
  pre = metrics.retrieval_metrics(SCORES_T2V, SCORES_V2T, TXT2VID, VID2TXT, prefix="msrvtt/")
  assert pre["msrvtt/t2v_r1"] == m["t2v_r1"]


def test_recall_at_5_and_10_by_hand():
  # Candidate c scores 11 - c, so its rank is c; ground truths at ranks 0, 4, 5, 9, 10.
  scores = np.tile(np.arange(12)[::-1].astype(float), (5, 1))
  gt = [0, 4, 5, 9, 10]
  assert metrics.retrieval_ranks(scores, gt).tolist() == [0, 4, 5, 9, 10]
  m = metrics.retrieval_metrics(scores, scores, gt, [[g] for g in gt])
  assert m["t2v_r1"] == pytest.approx(20.0)    # rank 0
  assert m["t2v_r5"] == pytest.approx(40.0)    # ranks 0, 4
  assert m["t2v_r10"] == pytest.approx(80.0)   # ranks 0, 4, 5, 9
  assert m["t2v_medr"] == pytest.approx(6.0)   # 1-based [1, 5, 6, 10, 11]
  assert m["t2v_meanr"] == pytest.approx(33 / 5)


# Stage 1 of 3 text queries over 5 videos, as [texts, videos]; the evaluation's matrix is
# its transpose, sim_v2t [videos, texts].
STAGE1 = np.array([
    [0.1, 0.9, 0.5, 0.9, 0.2],   # top 2: candidates 1, 3 (tie, index order)
    [0.3, 0.2, 0.1, 0.0, 0.4],   # top 2: 4, 0
    [0.5, 0.5, 0.5, 0.5, 0.5],   # top 2: 0, 1 (all tied)
])


def _rerank(query, candidates):
  return 10.0 * query + candidates    # stage-2 score, easy to read


def _text_to_video(k, alpha=0.0):
  """The evaluation's two stages on STAGE1 with `_rerank` as the matching head:
  (t2v matrix [texts, videos], each text's top-k videos)."""
  sim_v2t = STAGE1.T
  pairs, top_v_for_t, top_t_for_v = metrics.candidate_pairs(sim_v2t, k)
  assert np.array_equal(pairs, np.unique(pairs, axis=0))  # sorted by (video, text), once each
  scores = _rerank(pairs[:, 1], pairs[:, 0])                # query = text, candidate = video
  t2v, _ = metrics.rerank_matrices(sim_v2t, pairs, scores, top_v_for_t, top_t_for_v, alpha=alpha)
  return t2v, top_v_for_t


def test_topk_rerank_by_hand():
  got, candidates = _text_to_video(2)
  expected = np.array([
      [-100, 1, -100, 3, -100],
      [10, -100, -100, -100, 14],
      [20, 21, -100, -100, -100],
  ], dtype=float)
  np.testing.assert_array_equal(got, expected)
  assert candidates.tolist() == [[1, 3], [4, 0], [0, 1]]  # each query's top 2, best first
  # Ground truth outside the top k ranks behind every candidate inside it.
  assert metrics.retrieval_ranks(got, [2, 0, 1]).tolist() == [3, 1, 0]

  weighted, _ = _text_to_video(2, alpha=0.5)
  expected_weighted = np.array([
      [-100, 1.45, -100, 3.45, -100],
      [10.15, -100, -100, -100, 14.2],
      [20.25, 21.25, -100, -100, -100],
  ])
  np.testing.assert_allclose(weighted, expected_weighted, rtol=1e-6)


def test_topk_larger_than_corpus_is_clipped():
  got, _ = _text_to_video(128)
  expected = 10.0 * np.arange(3)[:, None] + np.arange(5)[None, :]
  np.testing.assert_array_equal(got, expected)
  assert _text_to_video(7)[1].shape == (3, 5)
  assert _text_to_video(3)[1].tolist() == [[1, 3, 2], [4, 0, 1], [0, 1, 2]]


def test_video_to_text_direction_by_hand():
  # The same pairs seen from the videos: each video's top 1 text (ties: lower index).
  sim_v2t = STAGE1.T
  pairs, top_v_for_t, top_t_for_v = metrics.candidate_pairs(sim_v2t, 1)
  assert top_t_for_v[:, 0].tolist() == [2, 0, 0, 0, 2]
  assert top_v_for_t[:, 0].tolist() == [1, 4, 0]
  # The union of both directions, once each: (0, 2) and (1, 0) are wanted by both.
  assert pairs.tolist() == [[0, 2], [1, 0], [2, 0], [3, 0], [4, 1], [4, 2]]
  scores = _rerank(pairs[:, 1], pairs[:, 0])
  _, v2t = metrics.rerank_matrices(sim_v2t, pairs, scores, top_v_for_t, top_t_for_v)
  expected = np.full((5, 3), -100.0)
  for v, t in enumerate([2, 0, 0, 0, 2]):
    expected[v, t] = 10 * t + v
  np.testing.assert_array_equal(v2t, expected)
  with pytest.raises(ValueError):
    metrics.candidate_pairs(sim_v2t, 0)


def test_format_table_shows_frames_and_rows():
  m = metrics.retrieval_metrics(SCORES_T2V, SCORES_V2T, TXT2VID, VID2TXT)
  m.update(metrics.retrieval_metrics(SCORES_T2V, SCORES_V2T, TXT2VID, VID2TXT, prefix="emb_"))
  table = metrics.format_table(m, num_frames=12)
  assert "12 inference frames" in table
  lines = table.splitlines()
  assert sum("text->video" in line for line in lines) == 2
  assert sum("video->text" in line for line in lines) == 2
  assert any("stage 1" in line and "text->video" in line and "20.00" in line for line in lines)
  assert "no retrieval metrics" in metrics.format_table({}, num_frames=4)
  # Stage-1 keys alone ("emb_t2v_r1"): two stage-1 rows.
  m2 = metrics.retrieval_metrics(SCORES_T2V, SCORES_V2T, TXT2VID, VID2TXT, prefix="emb_")
  table2 = metrics.format_table(m2, num_frames=32)
  assert "32 inference frames" in table2
  assert sum("stage 1" in line and "->" in line for line in table2.splitlines()) == 2
