"""Text-to-video search from the command line (`python main.py --mode search`).

  python main.py --mode search --config configs/demo.py --workdir runs/demo \
      --query "a red circle moves left, then a blue square appears" [--videos DIR] \
      [--top 5] [--explain]
  python main.py --mode search ... --queries FILE     # one query a line, one model load

Steps (the two-stage scoring of `retrieval.RetrievalEvaluator`, for one query):
  1. the parameters alone: the latest checkpoint of the workdir, else `config.init_from`
     (`checkpoints/restore.py`); on a CPU the model computes in float32 (`cpu_float32`);
  2. the videos: every video file under `--videos` (recursive), or the config's first
     eval corpus, read as at evaluation (`search_videos.py`);
  3. the library index `workdir/search_library/<key>/` (`library_index.py`,
     `search_cache.py`) holds each content's stage-1 vector (and, with token storage
     'float16', its rerank tokens): only new or changed files are embedded, in chunks
     committed as they finish, so an interrupted search resumes;
  4. stage 1: the mean over frames of the cosine between frame and query embeddings, for
     every video; stage 2: the matching head's logit for class 1 on the fusion encoder's
     output (plus `config.eval.alpha` x stage 1, as in evaluation) for the stage-1 top
     `config.eval.k`, which are ranked by it; the other videos follow in stage-1 order.
     The candidates' tokens are read from the index or (default, 'recompute') their
     videos are read and encoded again. Files that cannot be read are recorded in the
     index, reported, and left out of the ranking.
  5. `--explain` (t2v2t, t2v2t_naive): a PNG per shown result in `workdir/search/`,
     `<rank>_<video name>.png`: the frames the model saw and, under each, how its T2V
     attention split between the text and its own tokens (`search_explain.py`).

`Searcher` holds the loaded model and the indexed library and answers any number of
queries (the compiled programs are reused); `search()` is one `Searcher` and one query,
`search_queries()` one `Searcher` and a list of them.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import sys

import jax
import numpy as np

from input_pipeline import text as text_lib
from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.checkpoints import restore
from t2v2t_jax.evaluation import search_explain
from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator, to_host
from t2v2t_jax.evaluation.search_cache import (CHUNK_SECONDS, CHUNK_VIDEOS,
                                               DEFAULT_TOKEN_STORAGE, TOKEN_STORAGE,
                                               checkpoint_source, embed_videos)
from t2v2t_jax.evaluation.search_videos import list_videos, read_frames


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


def cpu_float32(config):
  """`config` with the model computing in float32 when JAX runs on a CPU (a copy; the
  parameters are float32 in every recipe, so the checkpoint restores as it is)."""
  if jax.default_backend() != "cpu" or config.model.dtype == "float32":
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model.dtype = "float32"
  return config


def rank_videos(stage1: np.ndarray, rerank_scores: np.ndarray, k: int) -> np.ndarray:
  """The final order: the stage-1 top `k` by rerank score, then the rest by stage 1.

  `stage1` [Nv]; `rerank_scores` [k], for the stage-1 top k in stage-1 order. Ties keep
  stage-1 order (stable sorts), as the evaluation's metrics do."""
  order = np.argsort(-stage1, kind="stable")
  top = order[:k]
  top = top[np.argsort(-np.asarray(rerank_scores), kind="stable")]
  return np.concatenate([top, order[k:]])


class Searcher:
  """A loaded model and an indexed library, ready for queries.

  `search()` builds one per command; keep one to run several queries in a process: the
  compiled programs (text encoder, video encoder for the rerank, matching-head scorer)
  run at fixed shapes, so only the first query compiles them.

  `tokens`: where the rerank's video tokens come from (`search_cache.TOKEN_STORAGE`);
  `chunk_videos` / `chunk_seconds`: how often embedding commits to the index.
  On a CPU the model computes in float32 whatever `config.model.dtype` says (a CPU
  without bfloat16 arithmetic converts around every operation); the index key records it.
  """

  def __init__(self, config, workdir: str, *, videos: str | None = None, progress: bool = True,
               tokens: str = DEFAULT_TOKEN_STORAGE, chunk_videos: int = CHUNK_VIDEOS,
               chunk_seconds: float = CHUNK_SECONDS):
    if tokens not in TOKEN_STORAGE:  # before minutes of model loading
      raise ValueError(f"tokens must be one of {TOKEN_STORAGE}, got {tokens!r}")
    self.config, self.workdir = cpu_float32(config), workdir
    if self.config is not config and progress and jax.process_index() == 0:
      print(f"Searching on the CPU in float32 (the recipe's model dtype is "
            f"{config.model.dtype})", flush=True)
    self.videos_arg, self.progress, self.tokens = videos, progress, tokens
    self._chunking = dict(chunk_videos=chunk_videos, chunk_seconds=chunk_seconds)
    config = self.config
    tokenizer = text_lib.load_tokenizer(config.data.tokenizer)
    text_lib.special_token_ids(tokenizer, config.model.text.vocab_size)  # raises if too many
    self.mesh = sharding_lib.make_mesh(config.mesh)
    self.params, self.graphdef, self.step = restore.load_params(
        config, workdir, self.mesh, purpose="Searching with")
    self.evaluator = RetrievalEvaluator(
        self.graphdef, self.mesh, k=config.eval.k, rerank_batch_size=config.eval.rerank_batch_size,
        text_batch_size=config.eval.text_batch_size, alpha=config.eval.alpha, progress=False)
    self._attention_fn = None
    self.refresh()
    max_len = self.video_list.max_len or config.data.max_len
    self.encoder = text_lib.CaptionEncoder(tokenizer, max_len, config.data.add_sep)

  def refresh(self) -> dict:
    """Lists the library again and embeds what is new or changed (the index's stats)."""
    self.video_list = list_videos(self.config, self.videos_arg)
    self.index = embed_videos(self.config, self.params, self.graphdef, self.mesh,
                              self.video_list, self.workdir,
                              checkpoint_source(self.config, self.workdir, self.step),
                              tokens=self.tokens, progress=self.progress,
                              evaluator=self.evaluator, **self._chunking)
    self.searchable = self.index.searchable
    self.k = max(1, min(int(self.config.eval.k), int(self.searchable.sum())))
    # The rerank encodes its candidates in batches of this many (a multiple of the
    # devices), so every query runs the video encoder at one shape.
    n_dev = self.mesh.size
    self._encode_batch = -(-self.k // n_dev) * n_dev
    return self.index.stats

  def embed_query(self, query: str):
    """(text_emb [1, E], text_hidden [1, L, D], attention_mask [1, L]) of the query."""
    if not query or not query.strip():
      raise ValueError("empty query")
    ids, mask = self.encoder.encode_batch([query])   # padded to max_len: one shape
    text_emb, text_hidden = self.evaluator.embed_texts(self.params, _Texts(ids, mask))
    return text_emb, text_hidden, mask

  def stage1(self, text_emb: np.ndarray) -> np.ndarray:
    """Stage-1 scores [Nv] of every listed video: the query's dot product with the mean
    of the frame embeddings, which is the mean of the per-frame cosines
    (`models.t2v2t.similarity`); a host matrix-vector product, nothing to compile."""
    return (self.index.video_mean @ np.asarray(text_emb, np.float32).T)[:, 0]

  def video_tokens(self, video_indices) -> np.ndarray:
    """float16 [n, T, N, D]: the rerank's tokens of the given videos: stored ones, or
    read and encoded again (token storage 'recompute')."""
    ids = np.asarray(video_indices, np.int64).reshape(-1)
    if self.index.video_tokens is not None:
      return self.index.video_tokens[ids]
    num_frames = self.index.num_frames
    size = int(self.config.model.vision.image_size)
    kind, max_seconds = self.video_list.kind, self.video_list.max_seconds

    def read(i):
      return read_frames(self.index.paths[i], num_frames, size, kind=kind, max_seconds=max_seconds)

    out = []
    threads = max(1, int(self.config.data.worker_threads))
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # PyAV decodes off the GIL
      frames = list(pool.map(read, ids.tolist()))
    b = self._encode_batch
    for start in range(0, len(frames), b):
      part = np.stack(frames[start:start + b])
      n = part.shape[0]
      part = np.concatenate([part, np.zeros((b - n,) + part.shape[1:], part.dtype)])
      # pylint: disable-next=protected-access (the evaluation's jitted encoder, reused)
      _, tok = self.evaluator._encode_video(self.params, *self.evaluator._put(part))
      out.append(to_host(tok)[:n])
    return np.concatenate(out)

  def search(self, query: str, *, top: int = 5, explain: bool = False,
             picture_dir: str | None = None) -> list[SearchResult]:
    """The `top` best videos for `query` (with `explain`: and their pictures, written to
    `picture_dir`, by default `workdir/search`)."""
    text_emb, text_hidden, mask = self.embed_query(query)
    videos = np.flatnonzero(self.searchable)
    if videos.size == 0:
      return []
    # Stage 1, every video; stage 2: the matching head on the fused pair, for the top k.
    stage1 = self.stage1(text_emb)
    candidates = videos[np.argsort(-stage1[videos], kind="stable")[:self.k]]
    # The candidates' tokens, indexed 0..k-1 by the pairs (the store is [k, T, N, D]).
    pairs = np.stack([np.arange(len(candidates)), np.zeros_like(candidates)], axis=1)
    itm = self.evaluator.score_candidates(self.params, pairs, text_hidden, mask,
                                          self.video_tokens(candidates), progress=False)
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
        self._explain(query, results, text_hidden, mask,
                      picture_dir or os.path.join(self.workdir, "search"))
    return results

  def text_shares(self, text_hidden, text_mask, video_tokens) -> tuple[np.ndarray, np.ndarray]:
    """`search_explain.text_shares` of this model (its jitted function kept for reuse)."""
    if self._attention_fn is None:
      self._attention_fn = search_explain.attention_fn(self.graphdef)
    return search_explain.text_shares(self._attention_fn, self.params, self.mesh, text_hidden,
                                      text_mask, video_tokens)

  def _explain(self, query, results, text_hidden, mask, out_dir) -> None:
    ids = np.asarray([r.video_index for r in results])
    shares, _ = self.text_shares(text_hidden, mask, self.video_tokens(ids))
    if jax.process_index() != 0:
      return
    search_explain.write_pictures(
        results, shares, query, out_dir, num_frames=self.index.num_frames,
        image_size=int(self.config.model.vision.image_size),
        kind=self.video_list.kind, max_seconds=self.video_list.max_seconds)

  def print_results(self, query: str, results: list[SearchResult]) -> None:
    if jax.process_index() != 0:
      return
    config, index = self.config, self.index
    frames = index.num_frames
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
           explain: bool = False, progress: bool = True,
           tokens: str = DEFAULT_TOKEN_STORAGE) -> list[SearchResult]:
  """`--mode search --query`: ranks the videos for `query`, prints the `top` first and
  returns them (module docstring)."""
  if not query or not query.strip():
    raise ValueError("empty query")
  searcher = Searcher(config, workdir, videos=videos, progress=progress, tokens=tokens)
  results = searcher.search(query, top=top, explain=explain)
  searcher.print_results(query, results)
  return results


def read_queries(path: str) -> list[str]:
  """The queries of a `--queries` file: one per line; blank lines are skipped."""
  with open(path, encoding="utf-8") as f:
    queries = [line.strip() for line in f]
  queries = [q for q in queries if q]
  if not queries:
    raise ValueError(f"--queries {path}: no queries in it (one per line)")
  return queries


def search_queries(config, workdir: str, queries: list[str], *, videos: str | None = None,
                   top: int = 5, explain: bool = False, progress: bool = True,
                   tokens: str = DEFAULT_TOKEN_STORAGE) -> list[list[SearchResult]]:
  """`--mode search --queries FILE`: one model load and one library index for every
  query; each query's table is printed as it is answered. With `explain`, query i's
  pictures go to `workdir/search/<i>/` (i from 1), so one query's do not replace
  another's."""
  searcher = Searcher(config, workdir, videos=videos, progress=progress, tokens=tokens)
  answers = []
  for i, query in enumerate(queries, start=1):
    results = searcher.search(query, top=top, explain=explain,
                              picture_dir=os.path.join(workdir, "search", str(i)))
    if jax.process_index() == 0:
      print(f"\n[query {i} of {len(queries)}]", end="")
    searcher.print_results(query, results)
    answers.append(results)
  return answers
