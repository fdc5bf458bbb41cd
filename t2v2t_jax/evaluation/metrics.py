"""Retrieval metrics on the host (NumPy): ranks, recall@k, median/mean rank, tables.

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

from collections.abc import Callable, Sequence

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
                      prefix: str = "", suffix: str = "", *, ties: str = "index"
                      ) -> dict[str, float]:
  """R@1/5/10, their mean, median and mean rank, both directions.

  Args:
    scores_t2v: [Nt, Nv], text queries over videos.
    scores_v2t: [Nv, Nt], video queries over texts.
    txt2vid: [Nt] the video of each text.
    vid2txt: [Nv] the texts of each video (several: best rank counts).
    prefix, suffix: put around every key (e.g. suffix="_emb" for the stage-1 numbers).
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
  return {f"{prefix}{k}{suffix}": v for k, v in raw.items()}


def topk_candidates(stage1: np.ndarray, k: int) -> np.ndarray:
  """[Nq, min(k, Nc)] candidate indices, best first, by the stable descending order."""
  stage1 = np.asarray(stage1)
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  k = min(int(k), stage1.shape[1])
  order = np.argsort(-np.where(np.isnan(stage1), -np.inf, stage1), axis=1, kind="stable")
  return order[:, :k]


def scatter_topk(stage2: np.ndarray, candidates: np.ndarray, stage1: np.ndarray, *,
                 alpha: float = 0.0, fill_value: float = -100.0) -> np.ndarray:
  """Full [Nq, Nc] score matrix from stage-2 scores of the top-k candidates.

  final[q, c] = stage2 + alpha * stage1 for c in the top k of query q, `fill_value`
  elsewhere (VindLU: -100, well below any raw itm logit).
  """
  stage1 = np.asarray(stage1, dtype=np.float64)
  stage2 = np.asarray(stage2, dtype=np.float64)
  if stage2.shape != candidates.shape:
    raise ValueError(f"stage2 {stage2.shape} and candidates {candidates.shape} differ")
  rows = np.arange(stage1.shape[0])[:, None]
  final = np.full(stage1.shape, fill_value, dtype=np.float64)
  final[rows, candidates] = stage2 + alpha * stage1[rows, candidates]
  return final


def topk_rerank_matrix(stage1: np.ndarray, k: int,
                       rerank_fn: Callable[[int, np.ndarray], np.ndarray], *,
                       alpha: float = 0.0, fill_value: float = -100.0) -> np.ndarray:
  """Two-stage retrieval scores: rerank each query's top-k stage-1 candidates.

  Args:
    stage1: [Nq, Nc] stage-1 (embedding) scores.
    k: candidates per query; k > Nc is clipped to Nc (any k and any corpus size work).
    rerank_fn: (query index, candidate indices [k']) -> stage-2 scores [k'] (e.g. the
      raw itm logit of class 1). Called once per query; evaluators that batch across
      queries can use `topk_candidates` and `scatter_topk` directly.
    alpha: weight of the stage-1 score added to the stage-2 score (default 0: pure
      stage 2, as SPEC 5 and VindLU).
    fill_value: score of candidates outside the top k.

  Returns:
    [Nq, Nc] float64.
  """
  candidates = topk_candidates(stage1, k)
  stage2 = np.stack([np.asarray(rerank_fn(q, candidates[q]), dtype=np.float64).reshape(-1)
                     for q in range(candidates.shape[0])])
  return scatter_topk(stage2, candidates, stage1, alpha=alpha, fill_value=fill_value)


def format_table(metrics: dict, num_frames: int, *, prefix: str = "") -> str:
  """A console table: stage-1 (`*_emb` keys) and reranked rows, both directions.

  Rows are printed for whichever of the key sets `{prefix}{t2v|v2t}_*_emb` or
  `{prefix}emb_{t2v|v2t}_*` (stage 1) and `{prefix}{t2v|v2t}_*` (reranked) are present. The number of inference frames is
  part of the header, so no result is ever read without it (SPEC 9).
  """
  columns = (("R@1", "r1"), ("R@5", "r5"), ("R@10", "r10"), ("MdR", "medr"),
             ("MnR", "meanr"))
  # Stage-1 keys may carry "_emb" as a suffix (VindLU) or "emb_" as a prefix.
  layouts = (("stage 1 (emb)", "", "_emb"), ("stage 1 (emb)", "emb_", ""),
             ("reranked", "", ""))
  rows, r_means = [], []
  for stage, stage_prefix, suffix in layouts:
    for direction, label in (("t2v", "text->video"), ("v2t", "video->text")):
      keys = [f"{prefix}{stage_prefix}{direction}_{name}{suffix}" for _, name in columns]
      if all(key in metrics for key in keys):
        rows.append((stage, label, [float(metrics[key]) for key in keys]))
    r_mean_key = f"{prefix}{stage_prefix}r_mean{suffix}"
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
