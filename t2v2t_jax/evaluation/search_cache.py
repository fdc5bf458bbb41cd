"""The embedded videos of a search, kept in a library index so that a search embeds only
the videos it has not seen (`library_index.py` describes the files).

`embed_videos` lists the library against the index (new, changed and removed files; only
new contents are embedded), embeds what is missing in chunks that are committed as they
finish (a stopped search resumes after the last committed chunk: nothing is deleted on
failure), and reads back what a search needs: the stage-1 vector of every video and,
with token storage 'float16', the rerank's video tokens (`TOKEN_STORAGE`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time

import jax
import numpy as np

from t2v2t_jax.evaluation.library_index import LIBRARY_VERSION, ChunkTokens, LibraryIndex
from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator, to_host
from t2v2t_jax.evaluation.search_videos import VideoList, video_batches

# Where the rerank's video tokens come from:
# - 'recompute': not stored; the stage-1 top k are read and encoded again per query (the
#   same reading and encoder as at indexing, so the same tokens up to float rounding).
# - 'float16': stored at indexing, T x N x D float16 per video (what the encoder hands
#   over; float32 would store the same numbers in twice the space). The frame count is
#   the reading setting (`config.eval.num_frames`), part of the index key.
TOKEN_STORAGE = ("recompute", "float16")
DEFAULT_TOKEN_STORAGE = "recompute"
# A chunk is committed after this many videos or this many seconds, whichever comes first:
# an interrupted search loses at most that much work.
CHUNK_VIDEOS = 256
CHUNK_SECONDS = 60.0


@dataclasses.dataclass
class VideoIndex:
  """What a search reads: the stage-1 vector of every listed video (and its tokens)."""
  video_mean: np.ndarray          # float32 [Nv, E]: mean over frames of the frame embeddings
  video_tokens: ChunkTokens | None  # float16 tokens[ids] -> [n, T, N, D]; None: 'recompute'
  paths: list[str]                # absolute, listing order
  failures: dict[str, str]        # path -> why it could not be read (not searchable)
  num_frames: int
  cache_dir: str
  stats: dict                     # listed, embedded (this run), reused, hashed, removed, ...

  @property
  def searchable(self) -> np.ndarray:
    return np.asarray([p not in self.failures for p in self.paths], bool)


def checkpoint_source(config, workdir: str, step: int) -> dict:
  """What identifies the parameters: the checkpoint folder (or init_from) and its mtime."""
  step_dir = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  if os.path.isdir(step_dir):
    return {"checkpoint": step_dir, "step": int(step), "mtime_ns": os.stat(step_dir).st_mtime_ns}
  src = os.path.abspath(config.init_from) if config.init_from else ""
  mtime = os.stat(src).st_mtime_ns if src and os.path.exists(src) else 0
  return {"init_from": src, "step": int(step), "mtime_ns": mtime}


def library_description(videos: VideoList, config, params_source: dict, tokens: str) -> dict:
  """Everything an embedding depends on, but not which files there are."""
  num_frames = 1 if videos.kind == "image" else int(config.eval.num_frames)
  return {"version": LIBRARY_VERSION, "params": params_source, "num_frames": num_frames,
          "image_size": int(config.model.vision.image_size), "kind": videos.kind,
          "max_seconds": videos.max_seconds, "tokens": tokens,
          "model": json.loads(config.model.to_json_best_effort())}


def library_key(description: dict) -> str:
  blob = json.dumps(description, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:20]


def _barrier(name: str) -> None:
  """All processes here before any goes on (the index is written by process 0 only)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # noqa: PLC0415
    multihost_utils.sync_global_devices(name)


def embed_videos(config, params, graphdef, mesh, videos: VideoList, workdir: str,
                 params_source: dict, *, tokens: str = DEFAULT_TOKEN_STORAGE,
                 progress: bool = True, chunk_videos: int = CHUNK_VIDEOS,
                 chunk_seconds: float = CHUNK_SECONDS,
                 evaluator: RetrievalEvaluator | None = None) -> VideoIndex:
  """The stage-1 vectors (and tokens) of `videos`, embedding only what the index lacks.

  `evaluator`: one to reuse (a `Searcher`'s: its jitted video encoder is compiled once for
  every refresh and for the rerank); by default a new one."""
  if tokens not in TOKEN_STORAGE:
    raise ValueError(f"token storage must be one of {TOKEN_STORAGE}, got {tokens!r}")
  is_main = jax.process_index() == 0
  description = library_description(videos, config, params_source, tokens)
  folder = os.path.join(workdir, "search_library", library_key(description))
  # Process 0 creates the tables before any other process reads them.
  library = LibraryIndex(folder, description, writer=True) if is_main else None
  _barrier("search: library opened")
  if library is None:
    library = LibraryIndex(folder, description, writer=False)
  try:
    root = videos.root or os.path.commonpath([os.path.dirname(p) for p in videos.paths])
    plan = library.plan(root, videos.paths)
    _barrier("search: library planned")  # every process has read the same index state
    embedded = 0
    if plan.todo:
      embedded = _embed_missing(config, params, graphdef, mesh, videos, plan, library,
                                store_tokens=tokens != "recompute", progress=progress and is_main,
                                chunk_videos=chunk_videos, chunk_seconds=chunk_seconds,
                                evaluator=evaluator)
    _barrier("search: library embedded")
    means, token_store, errors, missing = library.load(plan.hashes, tokens=tokens != "recompute")
  finally:
    library.close()
  if missing:  # another search changed the index under us; should not happen
    raise RuntimeError(f"{missing} videos are missing from the library index {folder}")
  failures = dict(plan.hash_errors)
  failures.update({videos.paths[i]: e for i, e in errors.items()})
  stats = dict(listed=len(videos.paths), embedded=embedded,
               reused=len(videos.paths) - len(plan.todo) - len(plan.hash_errors),
               hashed=plan.hashed, removed=plan.removed, unreadable=len(failures))
  if is_main and progress:
    print(f"Library {root}: {len(videos.paths)} videos ({embedded} embedded now, "
          f"{stats['reused']} from the index {folder}"
          + (f", {plan.removed} gone since the last search" if plan.removed else "") + ")",
          flush=True)
  if is_main and failures:
    sys.stderr.write(f"WARNING: {len(failures)} of {len(videos.paths)} videos could not be "
                     "read; they are left out of the search (they are tried again only "
                     "once they change):\n"
                     + "".join(f"  {p}: {e}\n" for p, e in sorted(failures.items())[:20])
                     + (f"  ... and {len(failures) - 20} more\n" if len(failures) > 20 else ""))
  num_frames = description["num_frames"]
  return VideoIndex(video_mean=means, video_tokens=token_store, paths=list(videos.paths),
                    failures=failures, num_frames=num_frames, cache_dir=folder, stats=stats)


def _embed_missing(config, params, graphdef, mesh, videos: VideoList, plan, library,
                   *, store_tokens: bool, progress: bool, chunk_videos: int,
                   chunk_seconds: float, evaluator: RetrievalEvaluator | None) -> int:
  """Embeds the videos `plan.todo`, committing chunks as they fill; returns how many."""
  todo = VideoList(paths=[videos.paths[i] for i in plan.todo], kind=videos.kind,
                   max_seconds=videos.max_seconds, max_len=videos.max_len, source=videos.source,
                   root=videos.root)
  hashes = [plan.hashes[i] for i in plan.todo]
  if progress:
    print(f"Embedding {len(todo.paths)} new or changed videos (committed every "
          f"{chunk_videos} videos or {chunk_seconds:g} s) ...", flush=True)
  if evaluator is None:
    evaluator = RetrievalEvaluator(graphdef, mesh, k=config.eval.k,
                                   rerank_batch_size=config.eval.rerank_batch_size,
                                   text_batch_size=config.eval.text_batch_size,
                                   alpha=config.eval.alpha, progress=progress)
  failures: dict[str, str] = {}
  pending: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
  committed = 0
  started = time.monotonic()

  def commit():
    nonlocal committed, started
    if not pending:
      return
    ids = np.concatenate([p[0] for p in pending])
    means = np.concatenate([p[1] for p in pending])
    toks = np.concatenate([p[2] for p in pending]) if store_tokens else None
    # The reader records a file's error before it yields the batch holding it.
    bad = np.asarray([todo.paths[i] in failures for i in ids.tolist()], bool)
    errors = {hashes[i]: failures[todo.paths[i]] for i in ids[bad].tolist()}
    library.commit_chunk([hashes[i] for i in ids[~bad].tolist()], means[~bad],
                         toks[~bad] if toks is not None else None, errors)
    committed += len(ids)
    pending.clear()
    started = time.monotonic()

  data = video_batches(todo, config, failures)
  shown, evaluator.progress = evaluator.progress, progress  # its bar, for this pass only
  try:
    # pylint: disable-next=protected-access (the evaluation's own batches and encoder)
    for index, keep, emb, tok in evaluator._encoded_batches(params, data, "embed videos"):
      # Exactly what `similarity` computes from the per-frame embeddings before its dot
      # product, so stage 1 scores as the evaluation does.
      mean = emb[keep].astype(np.float32).mean(axis=1)
      pending.append((index[keep], mean, to_host(tok)[keep] if store_tokens else None))
      if (sum(len(p[0]) for p in pending) >= chunk_videos
          or time.monotonic() - started >= chunk_seconds):
        commit()
    commit()
  except BaseException:
    if jax.process_index() == 0:
      sys.stderr.write(f"Embedding stopped: {committed} of {len(todo.paths)} videos were "
                       f"committed to the index ({library.folder}); the next search resumes "
                       "from there.\n")
    raise
  finally:
    evaluator.progress = shown
  return committed
