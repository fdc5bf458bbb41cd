"""The embedded videos of a search, cached so that a second query only embeds its text.

`workdir/search_cache/<key>/` holds `video_emb.npy`, `video_tokens.npy` (float16, read
back memory-mapped) and `index.json`; the key is a hash of the video list (absolute
paths, sizes, modification times), the parameters (checkpoint path, step, modification
time) and the reading settings. A cache folder is written under a temporary name and
renamed when complete, so a search that stops half-way leaves no half cache. The cache
is never pruned: delete `workdir/search_cache/` to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any

import jax
import numpy as np

from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator
from t2v2t_jax.evaluation.search_videos import VideoList, video_batches

CACHE_VERSION = 1


@dataclasses.dataclass
class VideoIndex:
  """Embedded videos: what the cache holds."""
  video_emb: np.ndarray           # float32 [Nv, T, E], L2-normalised per frame
  video_tokens: Any               # float16 [Nv, T, N, D] (a memory map when cached)
  paths: list[str]
  failures: dict[str, str]        # path -> why it could not be read (embedded as black)
  cache_dir: str | None
  from_cache: bool


def checkpoint_source(config, workdir: str, step: int) -> dict:
  """What identifies the parameters: the checkpoint folder (or init_from) and its mtime."""
  step_dir = os.path.join(os.path.abspath(workdir), "checkpoints", str(step))
  if os.path.isdir(step_dir):
    return {"checkpoint": step_dir, "step": int(step), "mtime_ns": os.stat(step_dir).st_mtime_ns}
  src = os.path.abspath(config.init_from) if config.init_from else ""
  mtime = os.stat(src).st_mtime_ns if src and os.path.exists(src) else 0
  return {"init_from": src, "step": int(step), "mtime_ns": mtime}


def cache_key(videos: VideoList, config, params_source: dict) -> str:
  """Hash of everything the cached embeddings depend on."""
  listing = []
  for path in videos.paths:
    try:
      st = os.stat(path)
      listing.append([path, st.st_size, st.st_mtime_ns])
    except OSError:
      listing.append([path, -1, -1])
  num_frames = 1 if videos.kind == "image" else int(config.eval.num_frames)
  desc = {"version": CACHE_VERSION, "videos": listing, "params": params_source,
          "num_frames": num_frames, "image_size": int(config.model.vision.image_size),
          "kind": videos.kind, "max_seconds": videos.max_seconds,
          "model": json.loads(config.model.to_json_best_effort())}
  blob = json.dumps(desc, sort_keys=True, default=str).encode()
  return hashlib.sha256(blob).hexdigest()[:20]


def _load_cache(cache_dir: str, paths: list[str]) -> VideoIndex | None:
  try:
    with open(os.path.join(cache_dir, "index.json")) as f:
      index = json.load(f)
    if index.get("paths") != paths:
      return None
    video_emb = np.load(os.path.join(cache_dir, "video_emb.npy"))
    tokens = np.load(os.path.join(cache_dir, "video_tokens.npy"), mmap_mode="r")
  except (OSError, ValueError):
    return None
  if video_emb.shape[0] != len(paths) or tokens.shape[0] != len(paths):
    return None
  return VideoIndex(video_emb=video_emb, video_tokens=tokens, paths=paths,
                    failures=dict(index.get("failures", {})), cache_dir=cache_dir, from_cache=True)


def embed_videos(config, params, graphdef, mesh, videos: VideoList, workdir: str,
                 params_source: dict, *, progress: bool = True) -> VideoIndex:
  """Embeddings and fusion tokens of `videos`, from the cache when it has them."""
  is_main = jax.process_index() == 0
  cache_root = os.path.join(workdir, "search_cache")
  cache_dir = os.path.join(cache_root, cache_key(videos, config, params_source))
  cached = _load_cache(cache_dir, videos.paths)
  if jax.process_count() > 1:
    # Embedding is a collective: every process uses the cache, or none does.
    from jax.experimental import multihost_utils  # noqa: PLC0415
    hits = multihost_utils.process_allgather(np.int32(cached is not None))
    if not np.all(hits):
      cached = None
  if cached is not None:
    if is_main:
      print(f"Using the cached embeddings of {len(videos.paths)} videos ({cache_dir})", flush=True)
    return cached

  if is_main:
    print(f"Embedding {len(videos.paths)} videos from {videos.source} ...", flush=True)
  tmp_dir = None
  if is_main:
    os.makedirs(cache_root, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=".tmp_", dir=cache_root)
    os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private
  # The tokens go straight into a memory-mapped file in the new cache folder.
  evaluator = RetrievalEvaluator(graphdef, mesh, k=config.eval.k,
                                 rerank_batch_size=config.eval.rerank_batch_size,
                                 text_batch_size=config.eval.text_batch_size,
                                 alpha=config.eval.alpha, token_cache_dir=tmp_dir,
                                 progress=progress and is_main)
  failures: dict[str, str] = {}
  try:
    video_emb, tokens = evaluator.embed_videos(params, video_batches(videos, config, failures))
    if failures and is_main:
      sys.stderr.write(f"WARNING: {len(failures)} of {len(videos.paths)} videos could not be "
                       f"read; they are left out of the search:\n"
                       + "".join(f"  {p}: {e}\n" for p, e in sorted(failures.items())))
    if not is_main:
      return VideoIndex(video_emb, tokens, videos.paths, failures, None, False)
    if isinstance(tokens, np.memmap):
      tokens.flush()
    del tokens
    np.save(os.path.join(tmp_dir, "video_emb.npy"), video_emb)
    with open(os.path.join(tmp_dir, "index.json"), "w") as f:
      json.dump({"paths": videos.paths, "failures": failures, "params": params_source,
                 "source": videos.source}, f, indent=1)
    if os.path.isdir(cache_dir):  # written meanwhile by another search: replace it
      shutil.rmtree(cache_dir, ignore_errors=True)
    os.replace(tmp_dir, cache_dir)
    tmp_dir = None
  finally:
    if tmp_dir is not None:
      shutil.rmtree(tmp_dir, ignore_errors=True)
  loaded = _load_cache(cache_dir, videos.paths)
  loaded.from_cache = False
  return loaded
