"""Text-to-video search from the command line (`python main.py --mode search`).

  python main.py --mode search --config configs/demo.py --workdir runs/demo \
      --query "a red circle moves left, then a blue square appears" [--videos DIR] \
      [--top 5] [--explain]

Steps (the two-stage scoring of `retrieval.RetrievalEvaluator`, for one query):
  1. the parameters alone: the latest checkpoint of the workdir, else `config.init_from`
     (`checkpoints/restore.py`);
  2. the videos: every video file of `--videos`, or the config's first eval corpus, read
     as at evaluation (`search_videos.py`), embedded: per-frame embeddings and fusion
     tokens;
  3. those are cached in `workdir/search_cache/<key>/` (`search_cache.py`), so a second
     query only embeds its text;
  4. stage 1: the mean over frames of the cosine between frame and query embeddings, for
     every video; stage 2: the matching head's logit for class 1 on the fusion encoder's
     output (plus `config.eval.alpha` x stage 1, as in evaluation) for the stage-1 top
     `config.eval.k`, which are ranked by it; the other videos follow in stage-1 order.
     Files that cannot be read are embedded as black clips (as in evaluation), reported,
     and left out of the ranking.
  5. `--explain` (t2v2t, t2v2t_naive): a PNG per shown result in `workdir/search/`,
     `<rank>_<video name>.png`: the frames the model saw and, under each, how its T2V
     attention split between the text and its own tokens (`search_explain.py`).

`Searcher` holds the loaded model and the embedded videos and answers any number of
queries (the compiled functions are reused); `search()` is one `Searcher` and one query.
"""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import numpy as np

from input_pipeline import text as text_lib
from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.checkpoints import restore
from t2v2t_jax.evaluation import search_explain
from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator
from t2v2t_jax.evaluation.search_cache import checkpoint_source, embed_videos
from t2v2t_jax.evaluation.search_videos import list_videos
from t2v2t_jax.models.t2v2t import similarity


@dataclasses.dataclass
class SearchResult:
  rank: int                       # 1-based
  path: str
  video_index: int                # index in the searched list
  stage1: float                   # mean over frames of the cosine similarity
  rerank: float | None            # ITM logit (+ alpha * stage1); None beyond the top k
  picture: str | None = None      # the --explain PNG


@dataclasses.dataclass
class _Texts:
  input_ids: np.ndarray
  attention_mask: np.ndarray


def rank_videos(stage1: np.ndarray, rerank_scores: np.ndarray, k: int) -> np.ndarray:
  """The final order: the stage-1 top `k` by rerank score, then the rest by stage 1.

  `stage1` [Nv]; `rerank_scores` [k], for the stage-1 top k in stage-1 order. Ties keep
  stage-1 order (stable sorts), as the evaluation's metrics do."""
  order = np.argsort(-stage1, kind="stable")
  top = order[:k]
  top = top[np.argsort(-np.asarray(rerank_scores), kind="stable")]
  return np.concatenate([top, order[k:]])


class Searcher:
  """A loaded model and an embedded set of videos, ready for queries.

  `search()` builds one per command; keep one to run several queries in a process (the
  compiled functions are reused).
  """

  def __init__(self, config, workdir: str, *, videos: str | None = None, progress: bool = True):
    self.config, self.workdir = config, workdir
    self.video_list = list_videos(config, videos)
    tokenizer = text_lib.load_tokenizer(config.data.tokenizer)
    text_lib.special_token_ids(tokenizer, config.model.text.vocab_size)  # raises if too many
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.params, self.graphdef, self.step = restore.load_params(
        config, workdir, self.mesh, purpose="Searching with")
    self.index = embed_videos(config, self.params, self.graphdef, self.mesh, self.video_list,
                              workdir, checkpoint_source(config, workdir, self.step),
                              progress=progress)
    self.evaluator = RetrievalEvaluator(
        self.graphdef, self.mesh, k=config.eval.k, rerank_batch_size=config.eval.rerank_batch_size,
        text_batch_size=config.eval.text_batch_size, alpha=config.eval.alpha, progress=False)
    max_len = self.video_list.max_len or config.data.max_len
    self.encoder = text_lib.CaptionEncoder(tokenizer, max_len, config.data.add_sep)
    # Unreadable files were embedded as black clips (as in evaluation); search leaves them out.
    self.searchable = np.asarray([p not in self.index.failures for p in self.index.paths], bool)
    self.k = max(1, min(int(config.eval.k), int(self.searchable.sum())))
    self._attention_fn = None

  def embed_query(self, query: str):
    """(text_emb [1, E], text_hidden [1, L, D], attention_mask [1, L]) of the query."""
    if not query or not query.strip():
      raise ValueError("empty query")
    ids, mask = self.encoder.encode_batch([query])
    text_emb, text_hidden = self.evaluator.embed_texts(self.params, _Texts(ids, mask))
    return text_emb, text_hidden, mask

  def search(self, query: str, *, top: int = 5, explain: bool = False) -> list[SearchResult]:
    """The `top` best videos for `query` (with `explain`: and their pictures)."""
    text_emb, text_hidden, mask = self.embed_query(query)
    videos = np.flatnonzero(self.searchable)
    if videos.size == 0:
      return []
    # Stage 1, every video; stage 2: the matching head on the fused pair, for the top k.
    stage1 = similarity(self.index.video_emb, text_emb)[:, 0]
    candidates = videos[np.argsort(-stage1[videos], kind="stable")[:self.k]]
    pairs = np.stack([candidates, np.zeros_like(candidates)], axis=1)
    itm = self.evaluator.score_candidates(self.params, pairs, text_hidden, mask,
                                          self.index.video_tokens)
    rerank = itm + self.evaluator.alpha * stage1[candidates]
    order = videos[rank_videos(stage1[videos], rerank, self.k)]
    rerank_of = dict(zip(candidates.tolist(), rerank.tolist()))
    results = [SearchResult(rank=r + 1, path=self.index.paths[v], video_index=int(v),
                            stage1=float(stage1[v]), rerank=rerank_of.get(int(v)))
               for r, v in enumerate(order[:max(0, int(top))])]
    if explain and results:
      why_not = search_explain.explain_unavailable(self.config)
      if why_not:
        if jax.process_index() == 0:
          print(f"--explain: {why_not}; no pictures written.", flush=True)
      else:
        self._explain(query, results, text_hidden, mask)
    return results

  def text_shares(self, text_hidden, text_mask, video_tokens) -> tuple[np.ndarray, np.ndarray]:
    """`search_explain.text_shares` of this model (its jitted function kept for reuse)."""
    if self._attention_fn is None:
      self._attention_fn = search_explain.attention_fn(self.graphdef)
    return search_explain.text_shares(self._attention_fn, self.params, self.mesh, text_hidden,
                                      text_mask, video_tokens)

  def _explain(self, query, results, text_hidden, mask) -> None:
    ids = np.asarray([r.video_index for r in results])
    shares, _ = self.text_shares(text_hidden, mask, np.asarray(self.index.video_tokens[ids]))
    if jax.process_index() != 0:
      return
    search_explain.write_pictures(
        results, shares, query, os.path.join(self.workdir, "search"),
        num_frames=self.index.video_emb.shape[1], image_size=int(self.config.model.vision.image_size),
        kind=self.video_list.kind, max_seconds=self.video_list.max_seconds)

  def print_results(self, query: str, results: list[SearchResult]) -> None:
    if jax.process_index() != 0:
      return
    config, index = self.config, self.index
    frames = index.video_emb.shape[1]
    searched = int(self.searchable.sum())
    print(f'\nTop {len(results)} of {searched} videos for "{query}" (checkpoint step '
          f"{self.step}; stage 1: mean cosine over {frames} frames; rerank: ITM logit"
          + (f" + {config.eval.alpha:g} x stage 1" if config.eval.alpha else "")
          + f", for the stage-1 top {self.k}):")
    width = max([4] + [len(r.path) for r in results])
    print(f"{'rank':>4}  {'path':<{width}}  {'stage-1':>8}  {'rerank':>8}")
    for r in results:
      rerank = f"{r.rerank:8.4f}" if r.rerank is not None else f"{'-':>8}"
      print(f"{r.rank:>4}  {r.path:<{width}}  {r.stage1:8.4f}  {rerank}")
    if index.failures:
      print(f"({len(index.failures)} unreadable video(s) left out: "
            + ", ".join(sorted(index.failures)[:5]) + (", ..." if len(index.failures) > 5 else "")
            + ")")
    pictures = [r.picture for r in results if r.picture]
    if pictures:
      print(f"Pictures of the T2V attention: {os.path.dirname(pictures[0])}/")
    sys.stdout.flush()


def search(config, workdir: str, query: str, *, videos: str | None = None, top: int = 5,
           explain: bool = False, progress: bool = True) -> list[SearchResult]:
  """`--mode search`: ranks the videos for `query`, prints the `top` first and returns them
  (module docstring)."""
  if not query or not query.strip():
    raise ValueError("empty query")
  searcher = Searcher(config, workdir, videos=videos, progress=progress)
  results = searcher.search(query, top=top, explain=explain)
  searcher.print_results(query, results)
  return results
