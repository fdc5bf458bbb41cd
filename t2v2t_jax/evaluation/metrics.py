"""Retrieval on the host (NumPy): the two-stage score matrices, ranks, recall@k, median and
mean rank, tables.

Two stages (SPEC 5): `candidate_pairs` takes each query's top k by the stage-1 score, in
both directions; the matching head scores those pairs on the device
(`retrieval.RetrievalEvaluator`); `rerank_matrices` puts the scores back into full
[queries, candidates] matrices, -100 outside the top k (VindLU's fill, below any raw ITM
logit), so that a ground truth outside the top k ranks behind every candidate inside it.

Naming (VindLU's, kept so numbers compare line by line with its logs):
- `txt_*` = TEXT retrieval = video -> text (a video queries the texts), VindLU `tr`.
- `vid_*` = VIDEO retrieval = text -> video (a text queries the videos), VindLU `ir`.
Because the two are easy to mix up, every number is also given under an unambiguous
alias: `v2t_*` (= `txt_*`) and `t2v_*` (= `vid_*`). The paper's headline is text->video
R@1, i.e. `t2v_r1` = `vid_r1`.

Ranks are 0-based internally (`retrieval_ranks`); the reported median and mean ranks are
1-based (a perfect retrieval has MdR = MnR = 1). Recalls are percentages (0-100).

Ties: candidates are ordered by a STABLE descending sort of the scores, so among equal
scores the candidate with the lower index ranks first. The rank of a ground truth is
therefore (#candidates with a strictly higher score) + (#candidates with an equal score
and a lower index). This is deterministic and machine independent. VindLU uses
`np.argsort(score)[::-1]` (numpy's default, unstable quicksort, reversed), whose order
among ties is unspecified; the two agree whenever scores are distinct, as they are for
real float similarities. `ties="pessimistic"` (every tie counted against the ground
truth) and `ties="optimistic"` are available for analysis. NaN scores count as -inf.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

TIE_RULES = ("index", "pessimistic", "optimistic")
RECALL_KS = (1, 5, 10)


def _as_gt_lists(gt: Sequence, num_queries: int) -> list[list[int]]:
  if len(gt) != num_queries:
    raise ValueError(f"{len(gt)} ground-truth entries for {num_queries} queries")
  lists = []
  for i, g in enumerate(gt):
    g = [int(x) for x in np.atleast_1d(np.asarray(g))]
    if not g:
      raise ValueError(f"query {i} has no ground truth")
    lists.append(g)
  return lists


def retrieval_ranks(scores: np.ndarray, gt: Sequence, *, ties: str = "index") -> np.ndarray:
  """0-based rank of the best-ranked ground truth of each query.

  Args:
    scores: [Nq, Nc] higher = better.
    gt: per query, one candidate index (list[int]) or several (list[list[int]]); with
      several the best (smallest) rank counts.
    ties: "index" (default, stable descending sort: lower candidate index first, see the
      module docstring), "pessimistic" or "optimistic".

  Returns:
    int64 [Nq].
  """
  if ties not in TIE_RULES:
    raise ValueError(f"ties must be one of {TIE_RULES}, got {ties!r}")
  scores = np.asarray(scores, dtype=np.float64)
  if scores.ndim != 2:
    raise ValueError(f"scores must be [Nq, Nc], got shape {scores.shape}")
  scores = np.where(np.isnan(scores), -np.inf, scores)
  num_queries, num_candidates = scores.shape
  gt_lists = _as_gt_lists(gt, num_queries)
  columns = np.arange(num_candidates)
  ranks = np.empty(num_queries, dtype=np.int64)
  for q, targets in enumerate(gt_lists):
    row = scores[q]
    best = num_candidates
    for c in targets:
      if not 0 <= c < num_candidates:
        raise ValueError(f"query {q}: ground truth {c} outside [0, {num_candidates})")
      higher = int(np.count_nonzero(row > row[c]))
      equal = row == row[c]
      if ties == "index":
        tied_ahead = int(np.count_nonzero(equal & (columns < c)))
      elif ties == "pessimistic":
        tied_ahead = int(np.count_nonzero(equal)) - 1
      else:
        tied_ahead = 0
      best = min(best, higher + tied_ahead)
    ranks[q] = best
  return ranks


def _rank_summary(ranks: np.ndarray, name: str) -> dict[str, float]:
  out = {f"{name}_r{k}": 100.0 * float(np.mean(ranks < k)) for k in RECALL_KS}
  out[f"{name}_r_mean"] = float(np.mean([out[f"{name}_r{k}"] for k in RECALL_KS]))
  out[f"{name}_medr"] = float(np.median(ranks + 1))
  out[f"{name}_meanr"] = float(np.mean(ranks + 1))
  return out


def retrieval_metrics(scores_t2v: np.ndarray, scores_v2t: np.ndarray,
                      txt2vid: Sequence[int], vid2txt: Sequence[Sequence[int]],
                      prefix: str = "", *, ties: str = "index") -> dict[str, float]:
  """R@1/5/10, their mean, median and mean rank, both directions.

  Args:
    scores_t2v: [Nt, Nv], text queries over videos.
    scores_v2t: [Nv, Nt], video queries over texts.
    txt2vid: [Nt] the video of each text.
    vid2txt: [Nv] the texts of each video (several: best rank counts).
    prefix: put before every key (evaluation: "emb_" for the stage-1 numbers).
    ties: tie rule, see `retrieval_ranks`.

  Returns:
    dict with, for d in (txt, vid, v2t, t2v): `{d}_r1`, `{d}_r5`, `{d}_r10`,
    `{d}_r_mean` (mean of the three), `{d}_medr`, `{d}_meanr` (1-based ranks); and
    `r_mean` = (txt_r_mean + vid_r_mean) / 2. `txt` = v2t, `vid` = t2v (VindLU naming).
  """
  v2t = _rank_summary(retrieval_ranks(scores_v2t, vid2txt, ties=ties), "txt")
  t2v = _rank_summary(retrieval_ranks(scores_t2v, txt2vid, ties=ties), "vid")
  raw = {**v2t, **t2v}
  raw["r_mean"] = (raw["txt_r_mean"] + raw["vid_r_mean"]) / 2
  for key, value in list(raw.items()):
    if key.startswith("txt_"):
      raw["v2t_" + key[4:]] = value
    elif key.startswith("vid_"):
      raw["t2v_" + key[4:]] = value
  return {f"{prefix}{k}": v for k, v in raw.items()}


def candidate_pairs(sim_v2t: np.ndarray, k: int):
  """Stage 1 -> the pairs the matching head scores.

  Args:
    sim_v2t: [Nv, Nt] stage-1 scores (`models.t2v2t.similarity`).
    k: candidates per query, in both directions; clipped to the corpus (any k works).

  Returns:
    (pairs [P, 2] of (video, text), the union of both directions' top-k pairs, each
    pair once, sorted by video then text; top_v_for_t [Nt, k'] the top videos of each
    text, best first; top_t_for_v [Nv, k''] the top texts of each video). Stable sorts
    on the negated scores: ties keep index order, as the ranks do.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  sim_v2t = np.where(np.isnan(sim_v2t), -np.inf, np.asarray(sim_v2t))
  nv, nt = sim_v2t.shape
  k_t2v, k_v2t = min(int(k), nv), min(int(k), nt)
  top_v_for_t = np.argsort(-sim_v2t.T, axis=1, kind="stable")[:, :k_t2v]
  top_t_for_v = np.argsort(-sim_v2t, axis=1, kind="stable")[:, :k_v2t]
  pairs = np.concatenate([
      np.stack([top_v_for_t.reshape(-1), np.repeat(np.arange(nt), k_t2v)], 1),
      np.stack([np.repeat(np.arange(nv), k_v2t), top_t_for_v.reshape(-1)], 1)])
  return np.unique(pairs, axis=0), top_v_for_t, top_t_for_v


def rerank_matrices(sim_v2t: np.ndarray, pairs: np.ndarray, pair_scores: np.ndarray,
                    top_v_for_t: np.ndarray, top_t_for_v: np.ndarray, *, alpha: float = 0.0,
                    fill_value: float = -100.0) -> tuple[np.ndarray, np.ndarray]:
  """Stage 2 -> full score matrices `(t2v [Nt, Nv], v2t [Nv, Nt])`.

  final = stage-2 score of the pair + `alpha` x its stage-1 score for each query's top k
  (`candidate_pairs`), `fill_value` elsewhere. `pair_scores[i]` scores `pairs[i]`, and
  `pairs` is sorted by (video, text) as `candidate_pairs` returns it (a pair's score is
  found by binary search).
  """
  nv, nt = sim_v2t.shape
  pair_keys = pairs[:, 0] * nt + pairs[:, 1]

  def lookup(videos, texts):
    return pair_scores[np.searchsorted(pair_keys, videos * nt + texts)]

  t2v = np.full((nt, nv), fill_value, np.float32)
  rows = np.repeat(np.arange(nt), top_v_for_t.shape[1])
  cols = top_v_for_t.reshape(-1)
  t2v[rows, cols] = lookup(cols, rows) + alpha * sim_v2t[cols, rows]
  v2t = np.full((nv, nt), fill_value, np.float32)
  rows = np.repeat(np.arange(nv), top_t_for_v.shape[1])
  cols = top_t_for_v.reshape(-1)
  v2t[rows, cols] = lookup(rows, cols) + alpha * sim_v2t[rows, cols]
  return t2v, v2t


def format_table(metrics: dict, num_frames: int, *, prefix: str = "") -> str:
  """A console table: stage-1 (`emb_*` keys) and reranked rows, both directions.

  Rows are printed for whichever of the key sets `{prefix}emb_{t2v|v2t}_*` (stage 1) and
  `{prefix}{t2v|v2t}_*` (reranked) are present. The number of inference frames is part of
  the header, so no result is ever read without it (SPEC 9).
  """
  columns = (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("MdR", "medr"),
             ("MnR", "meanr"))
  layouts = (("stage 1 (emb)", "emb_"), ("reranked", ""))
  rows, r_means = [], []
  for stage, stage_prefix in layouts:
    for direction, label in (("t2v", "text->video"), ("v2t", "video->text")):
      keys = [f"{prefix}{stage_prefix}{direction}_{name}" for _, name in columns]
      if all(key in metrics for key in keys):
        rows.append((stage, label, [float(metrics[key]) for key in keys]))
    r_mean_key = f"{prefix}{stage_prefix}r_mean"
    if r_mean_key in metrics:
      r_means.append((stage, float(metrics[r_mean_key])))
  header = f"Retrieval, {num_frames} inference frames"
  if not rows:
    return header + "\n(no retrieval metrics found)"
  head = f"{'stage':<14} {'direction':<12}" + "".join(f"{name:>8}" for name, _ in columns)
  lines = [header, head, "-" * len(head)]
  for stage, label, values in rows:
    lines.append(f"{stage:<14} {label:<12}" + "".join(f"{v:8.2f}" for v in values))
  for stage, value in r_means:
    lines.append(f"mean of R@1/5/10 over both directions, {stage}: {value:.2f}")
  return "\n".join(lines)
