"""Text-to-video search from the command line (`python main.py --mode search`).

  python main.py --mode search --config configs/demo.py --workdir runs/demo \
      --query "a red circle moves left, then a blue square appears" [--videos DIR] \
      [--top 5] [--explain]

Steps (the two-stage scoring of `retrieval.RetrievalEvaluator`, for one query):
  1. the parameters: the latest checkpoint of the workdir, else `config.init_from`
     (`evaluate.load_params`);
  2. the videos: every *.mp4/*.webm/*.mkv/*.avi of `--videos` (sorted by name), or, by
     default, the videos of the config's first eval corpus; each is read as at evaluation
     ('middle' frames, `config.eval.num_frames` of them, bicubic resize to the model's
     image size) and embedded: per-frame embeddings and fusion tokens;
  3. those are cached in `workdir/search_cache/<key>/` (`video_emb.npy`,
     `video_tokens.npy` float16, `index.json`), the key a hash of the video list (absolute
     paths, sizes, modification times), the checkpoint (path, step, modification time) and
     the reading settings, so a second query only embeds its text;
  4. stage 1: the mean over frames of the cosine between frame and query embeddings, for
     every video; stage 2: the matching head's logit for class 1 on the fusion encoder's
     output (plus `config.eval.alpha` x stage 1, as in evaluation) for the stage-1 top
     `config.eval.k`, which are ranked by it; the other videos follow in stage-1 order.
     Files that cannot be read are embedded as black clips (as in evaluation), reported,
     and left out of the ranking.
  5. `--explain` (t2v2t, t2v2t_naive): a PNG per shown result in `workdir/search/`,
     `<rank>_<video name>.png`: the frames the model saw and, under each, how its T2V
     attention split between the text and its own tokens (`explain.py`).

`Searcher` holds the loaded model and the embedded videos and answers any number of
queries (the compiled functions are reused); `search()` is one `Searcher` and one query.
The cache is never pruned: delete `workdir/search_cache/` to reclaim the space.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from typing import Any, Iterable

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from input_pipeline import transforms
from input_pipeline import video_decode
from input_pipeline.annotations import load_corpus_from_config
from input_pipeline.config import corpus_field
from input_pipeline.text import CaptionEncoder
from t2v2t_jax.evaluation import evaluate as evaluate_lib
from t2v2t_jax.evaluation import explain as explain_lib
from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator
from t2v2t_jax.models.fusion import T2V_MODES
from t2v2t_jax.training import run_setup
from t2v2t_jax.training import sharding as sharding_lib

VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi")
CACHE_VERSION = 1
# Frames in the pictures are enlarged (nearest neighbour, by a whole factor) to at least
# this height, so that 32 or 64 px model inputs stay visible.
PICTURE_MIN_FRAME_SIZE = 128
_PICTURE_NAME = re.compile(r"^\d+_.*\.png$")


@dataclasses.dataclass
class VideoList:
  """The videos searched: absolute paths, how each is read, and where they came from."""
  paths: list[str]
  kind: str = "video"             # 'video' or 'image' (an image corpus: 1-frame clips)
  max_seconds: float | None = None
  max_len: int | None = None      # text length of the corpus (None: config.data.max_len)
  source: str = ""


@dataclasses.dataclass
class SearchResult:
  rank: int                       # 1-based
  path: str
  video_index: int                # index in the searched list
  stage1: float                   # mean over frames of the cosine similarity
  rerank: float | None            # ITM logit (+ alpha * stage1); None beyond the top k
  picture: str | None = None      # the --explain PNG


@dataclasses.dataclass
class VideoIndex:
  """Embedded videos: what the cache holds."""
  video_emb: np.ndarray           # float32 [Nv, T, E], L2-normalised per frame
  video_tokens: Any               # float16 [Nv, T, N, D] (a memory map when cached)
  paths: list[str]
  failures: dict[str, str]        # path -> why it could not be read (embedded as black)
  cache_dir: str | None
  from_cache: bool


# ---------------------------------------------------------------------------------------
# Which videos


def list_videos(config, videos: str | None = None) -> VideoList:
  """`videos` (a folder: its video files, sorted) or the config's first eval corpus."""
  if videos:
    if not os.path.isdir(videos):
      raise FileNotFoundError(f"--videos {videos}: no such folder")
    paths = sorted(os.path.abspath(os.path.join(videos, name)) for name in os.listdir(videos)
                   if name.lower().endswith(VIDEO_EXTENSIONS)
                   and os.path.isfile(os.path.join(videos, name)))
    if not paths:
      raise FileNotFoundError(f"--videos {videos}: no {'/'.join(VIDEO_EXTENSIONS)} files in it")
    return VideoList(paths=paths, source=os.path.abspath(videos))
  corpora = list(config.data.eval_corpora)
  if not corpora:
    raise ValueError("config.data.eval_corpora is empty: pass --videos FOLDER")
  corpus_cfg = corpora[0]
  corpus = load_corpus_from_config(corpus_cfg)
  paths = [os.path.abspath(corpus.media_path(i)) for i in range(corpus.num_videos)]
  return VideoList(paths=paths, kind=corpus.kind,
                   max_seconds=corpus_field(corpus_cfg, "max_seconds"),
                   max_len=corpus_field(corpus_cfg, "max_len"),
                   source=f"eval corpus {corpus.name!r} ({corpus.anno_file})")


def read_frames(path: str, num_frames: int, image_size: int, *, kind: str = "video",
                max_seconds: float | None = None) -> np.ndarray:
  """The clip the model sees at evaluation: uint8 [T, S, S, 3] ('middle' frames, resize)."""
  if kind == "image":
    frames = video_decode.read_image(path)
  else:
    frames, _ = video_decode.read_clip(path, num_frames, "middle", None, max_seconds=max_seconds)
  return transforms.eval_transform(frames, image_size)


class _ReadClip:
  """Grain `map`: (video index, valid) -> clip; an unreadable file gives a black clip."""

  def __init__(self, videos: VideoList, num_frames: int, image_size: int):
    self.videos = videos
    self.num_frames = 1 if videos.kind == "image" else int(num_frames)
    self.image_size = int(image_size)

  def __call__(self, item) -> dict:
    index, valid = int(item[0]), int(item[1])
    path = self.videos.paths[index]
    error = ""
    try:
      frames = read_frames(path, self.num_frames, self.image_size, kind=self.videos.kind,
                           max_seconds=self.videos.max_seconds)
      if frames.shape[0] != self.num_frames:
        raise ValueError(f"decoded {frames.shape[0]} of {self.num_frames} frames")
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {e}"
      frames = np.zeros((self.num_frames, self.image_size, self.image_size, 3), np.uint8)
    return {"frames": np.ascontiguousarray(frames, np.uint8), "video_idx": np.int32(index),
            "valid": np.int32(valid), "error": error}


@dataclasses.dataclass
class _VideoBatches:
  """What `RetrievalEvaluator.embed_videos` reads: batches of this process's videos."""
  videos: Iterable
  num_videos: int


def _video_batches(videos: VideoList, config, failures: dict) -> _VideoBatches:
  n = len(videos.paths)
  count, index = jax.process_count(), jax.process_index()
  local_devices = jax.local_device_count()
  batch = max(1, config.eval.video_batch_size // count)
  batch = min(batch, -(-n // count))  # no batch larger than the videos need
  batch = -(-batch // local_devices) * local_devices
  chunk = count * batch
  padded = -(-n // chunk) * chunk
  ids = np.concatenate([np.arange(n), np.full(padded - n, n - 1)]).astype(np.int32)
  valid = (np.arange(padded) < n).astype(np.int32)
  items = np.stack([ids, valid], axis=1)[index::count]
  ds = grain.MapDataset.source([tuple(x) for x in items.tolist()])
  ds = ds.map(_ReadClip(videos, config.eval.num_frames, config.model.vision.image_size))
  threads = max(1, int(config.data.worker_threads))
  it = ds.batch(batch).to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                         prefetch_buffer_size=2))

  def batches():
    for b in it:
      for i, v, err in zip(b["video_idx"], b["valid"], b["error"]):
        if v and str(err):
          failures[videos.paths[int(i)]] = str(err)
      yield b

  return _VideoBatches(videos=batches(), num_videos=n)


# ---------------------------------------------------------------------------------------
# The cache


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
    video_emb, tokens = evaluator.embed_videos(params, _video_batches(videos, config, failures))
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


# ---------------------------------------------------------------------------------------
# Scoring


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


def _replicated(mesh, *arrays):
  sharding = sharding_lib.replicated(mesh)
  return [jax.device_put(np.asarray(a), sharding) for a in arrays]


class Searcher:
  """A loaded model and an embedded set of videos, ready for queries.

  `search()` builds one per command; keep one to run several queries in a process (the
  compiled functions are reused).
  """

  def __init__(self, config, workdir: str, *, videos: str | None = None, progress: bool = True):
    self.config, self.workdir = config, workdir
    self.video_list = list_videos(config, videos)
    tokenizer = run_setup.load_tokenizer(config)
    run_setup.special_token_ids(tokenizer, config.model.text.vocab_size)
    self.params, self.graphdef, self.mesh, self.step = evaluate_lib.load_params(
        config, workdir, purpose="Searching with")
    self.index = embed_videos(config, self.params, self.graphdef, self.mesh, self.video_list,
                              workdir, checkpoint_source(config, workdir, self.step),
                              progress=progress)
    self.evaluator = RetrievalEvaluator(
        self.graphdef, self.mesh, k=config.eval.k, rerank_batch_size=config.eval.rerank_batch_size,
        text_batch_size=config.eval.text_batch_size, alpha=config.eval.alpha, progress=False)
    max_len = self.video_list.max_len or config.data.max_len
    self.encoder = CaptionEncoder(tokenizer, max_len, config.data.add_sep)
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
    # Stage 1: mean over frames of per-frame cosine similarity, every video.
    video_emb = self.index.video_emb
    stage1 = np.einsum("vfe,e->v", video_emb, text_emb[0]) / video_emb.shape[1]
    candidates = videos[np.argsort(-stage1[videos], kind="stable")[:self.k]]
    # Stage 2: the matching head on the fused pair, for the top k.
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
      why_not = explain_unavailable(self.config)
      if why_not:
        if jax.process_index() == 0:
          print(f"--explain: {why_not}; no pictures written.", flush=True)
      else:
        self._explain(query, results, text_hidden, mask)
    return results

  def text_shares(self, text_hidden, text_mask, video_tokens) -> tuple[np.ndarray, np.ndarray]:
    """Text share per frame [B, T] (the mean over the T2V blocks of `attention_shares`)
    and the ITM logit [B] of the query (`text_hidden` [1, L, D], `text_mask` [1, L]) with
    each of `video_tokens` [B, T, N, D]."""
    if self._attention_fn is None:
      self._attention_fn = _attention_fn(self.graphdef)
    return _text_shares(self._attention_fn, self.params, self.mesh, text_hidden, text_mask,
                        video_tokens)

  def _explain(self, query, results, text_hidden, mask) -> None:
    ids = np.asarray([r.video_index for r in results])
    shares, _ = self.text_shares(text_hidden, mask, np.asarray(self.index.video_tokens[ids]))
    if jax.process_index() != 0:
      return
    out_dir = os.path.join(self.workdir, "search")
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):  # the pictures of an earlier search
      if _PICTURE_NAME.match(name):
        os.remove(os.path.join(out_dir, name))
    num_frames = self.index.video_emb.shape[1]
    size = int(self.config.model.vision.image_size)
    for r, share in zip(results, shares):
      try:
        frames = read_frames(r.path, num_frames, size, kind=self.video_list.kind,
                             max_seconds=self.video_list.max_seconds)
      except Exception:  # pylint: disable=broad-except (it was scored as a black clip)
        frames = np.zeros((num_frames, size, size, 3), np.uint8)
      stem = os.path.splitext(os.path.basename(r.path))[0]
      path = os.path.join(out_dir, f"{r.rank}_{stem}.png")
      rerank = f"{r.rerank:.3f}" if r.rerank is not None else "-"
      subtitle = f"#{r.rank} {os.path.basename(r.path)}  stage-1 {r.stage1:.3f}  rerank {rerank}"
      explain_lib.draw_explanation(_display_frames(frames), share, query, path, subtitle=subtitle)
      r.picture = path

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


def explain_unavailable(config) -> str | None:
  """Why --explain cannot draw this model's T2V attention, or None when it can."""
  mode = config.model.fusion.mode
  if mode in T2V_MODES:
    return None
  return (f"fusion mode {mode!r} has no T2V block, so there is no text/own-token attention "
          f"split to draw (only {' and '.join(T2V_MODES)} have one)")


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


# ---------------------------------------------------------------------------------------
# --explain


def _attention_fn(graphdef):
  @jax.jit
  def attention(params, hidden, mask, tokens):
    m = nnx.merge(graphdef, params)
    fused, aux = m.fuse(hidden, mask, tokens.astype(m.dtype or jnp.float32), return_aux=True)
    return aux["t2v_attention"], m.itm_logits(fused)[:, 1]
  return attention


def _text_shares(attention_fn, params, mesh, text_hidden, text_mask, video_tokens):
  b = video_tokens.shape[0]
  hidden = np.repeat(np.asarray(text_hidden), b, axis=0)
  mask = np.repeat(np.asarray(text_mask), b, axis=0)
  weights, itm = attention_fn(params, *_replicated(mesh, hidden, mask, np.asarray(video_tokens)))
  num_text_keys = hidden.shape[1]
  shares = np.mean([explain_lib.attention_shares(np.asarray(w), num_text_keys) for w in weights],
                   axis=0)
  return shares, np.asarray(itm)


def t2v_text_shares(params, graphdef, mesh, text_hidden, text_mask, video_tokens
                    ) -> tuple[np.ndarray, np.ndarray]:
  """`Searcher.text_shares` for a model given as (graphdef, params) (t2v modes only)."""
  return _text_shares(_attention_fn(graphdef), params, mesh, text_hidden, text_mask, video_tokens)


def _display_frames(frames: np.ndarray) -> np.ndarray:
  h = frames.shape[1]
  factor = max(1, -(-PICTURE_MIN_FRAME_SIZE // h))
  if factor == 1:
    return frames
  return frames.repeat(factor, axis=1).repeat(factor, axis=2)


