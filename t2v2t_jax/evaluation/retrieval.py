"""Two-stage text-video retrieval (SPEC 5), for a model given as (graphdef, params).

Stage 1 embeds every video (per-frame projected features) and every text, and scores
pairs by the mean over frames of cosine similarities (`models.t2v2t.similarity`). Stage 2
reranks each query's top-k candidates with the matching head on the fusion encoder's
output, in both directions (the host-side bookkeeping is `metrics.candidate_pairs` and
`metrics.rerank_matrices`).

Reranking is organised by video: the union of the text->video and video->text top-k
pairs is sorted by video; each video's pairs fill slots of `texts_per_slot` texts, and
the slots are cut into batches of `rerank_batch_size` texts with at most
`videos_per_batch` distinct videos. Each batch sends its distinct videos' tokens to the
device once (replicated) with, per slot, an index into them; the slots' videos are
gathered on the device. With k candidates per query a video has about 2k pairs, so a
batch needs one to a few videos' tokens instead of one copy per pair (the host->device
traffic per pair drops by about the number of pairs per video). A pair wanted by both
directions is scored once.

In `v2t` a slot's texts share the video's cross-attention keys and values, computed once
(the fusion encoder's k texts a video): they do not depend on the text and are 88% of a
pair's FLOPs at 12 frames. A slot holds up to 32 texts, so a video's last slot is partly
padding. In `t2v2t` the T2V block changes the video with each text, so every pair is a
slot of its own (no padding) and the fusion is computed for every pair.
Where the video tokens come from at stage 2 (`token_cache`):
- 'memory' / 'disk': stage 1 keeps every video's tokens on the host in float16, in RAM or
  in a memory-mapped file (every process holds all of them: N x T x 197 x 768 x 2 bytes,
  44 GiB for ActivityNet at 32 frames).
- 'recompute': stage 1 keeps only the per-frame embeddings; the rerank reads the videos
  again, in the same batches, through the same jitted encoder (so the tokens are the ones
  stage 1 computed, bit for bit), scores all the candidate pairs of each batch's videos
  and drops the batch's tokens: each video is encoded once more and the host holds one
  batch of tokens. The price is a second pass of the video encoder and the loader (every
  video has candidates: its own top-k texts).
Tokens are never all on the device at once.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from input_pipeline.pipeline import close_iterator, release_shared_memory
from t2v2t_jax import sharding as sharding_lib
from t2v2t_jax.evaluation import metrics as metrics_lib
from t2v2t_jax.models.t2v2t import similarity


def to_host(x) -> np.ndarray:
  """A (possibly multi-host) global array as one numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # noqa: PLC0415
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pad_to(x: np.ndarray, n: int, fill=0) -> np.ndarray:
  if x.shape[0] == n:
    return x
  pad = np.full((n - x.shape[0],) + x.shape[1:], fill, x.dtype)
  return np.concatenate([x, pad], axis=0)


# Texts a 'v2t' rerank slot shares a video's keys and values with: fewer means more
# projections (16.7 GFLOPs a video at 12 frames, against 2.3 a text), more means more
# padding in each video's last slot (~134 pairs a video at k = 128): 32 and 64 cost about
# the same; 32 keeps the padding of short candidate lists small.
MAX_TEXTS_PER_SLOT = 32


def _slots(videos: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Slots of k pairs of one video each, for pairs sorted by video (`videos` their videos):
  (the slots' videos [S], the slots' pair rows [S, k], -1 where a slot is not full)."""
  n = len(videos)
  run_starts = np.flatnonzero(np.r_[True, videos[1:] != videos[:-1]]) if n else np.zeros(0, int)
  run_ends = np.r_[run_starts[1:], n].astype(int)
  per_run = -(-(run_ends - run_starts) // k)                 # slots of each video's run
  run = np.repeat(np.arange(len(run_starts)), per_run)       # each slot's run
  nth = np.arange(len(run)) - np.repeat(np.cumsum(per_run) - per_run, per_run)
  starts = run_starts[run] + nth * k
  ends = np.minimum(starts + k, run_ends[run])
  rows = starts[:, None] + np.arange(k)[None]
  return videos[starts], np.where(rows < ends[:, None], rows, -1)


TOKEN_CACHES = ("memory", "disk", "recompute")

# A video whose stage-1 and rerank-pass embeddings differ by more than this (they are
# L2-normalised, so float noise is ~1e-6) was read differently the second time: the
# rerank scored it with tokens stage 1 did not rank with ('recompute' warns).
REREAD_TOLERANCE = 1e-3


class Embedded(NamedTuple):
  """One corpus through both encoders (host arrays, as `embed_videos` / `embed_texts` give)."""
  video_emb: np.ndarray     # [Nv, F, E] per-frame video embeddings
  video_tokens: object      # the video tokens the matching head reranks with; None with
                            # token_cache='recompute' (the rerank encodes them again)
  text_emb: np.ndarray      # [Nt, E]
  text_hidden: object       # the text encoder's hidden states for the fusion layers


class RetrievalEvaluator:
  """Embeds, scores and reranks a corpus with a model given as (graphdef, params)."""

  def __init__(self, graphdef, mesh, *, k: int = 128, rerank_batch_size: int = 128,
               text_batch_size: int = 256, alpha: float = 0.0, token_cache_dir: str | None = None,
               progress: bool = True, videos_per_batch: int | None = None,
               token_cache: str | None = None):
    """`token_cache`: one of TOKEN_CACHES (module docstring); None: 'disk' when
    `token_cache_dir` is given, else 'memory'. 'disk' memory-maps under `token_cache_dir`."""
    self.graphdef, self.mesh = graphdef, mesh
    self.k, self.alpha = int(k), float(alpha)
    n_dev = mesh.size
    # Every batch sent to the device is a multiple of the device count.
    self.rerank_batch_size = max(n_dev, (int(rerank_batch_size) // n_dev) * n_dev)
    self.text_batch_size = max(n_dev, (int(text_batch_size) // n_dev) * n_dev)
    # Most distinct videos in a rerank batch. A quarter of the batch keeps batches full when
    # videos have >= 4 candidate pairs each (the usual case: about 2k); with fewer pairs
    # per video batches run part-full rather than send more. The videos sent are padded
    # to a power of two, so the scorer compiles for at most log2(videos_per_batch) + 1
    # shapes.
    self.videos_per_batch = int(videos_per_batch or max(1, self.rerank_batch_size // 4))
    # Bytes sent to the device by the last `score_candidates` (benchmarks report them).
    self.transfer_stats: dict = {}
    self.token_cache_dir = token_cache_dir
    self.token_cache = token_cache or ("disk" if token_cache_dir else "memory")
    if self.token_cache not in TOKEN_CACHES:
      raise ValueError(f"token_cache must be one of {TOKEN_CACHES}, got {self.token_cache!r}")
    if self.token_cache == "disk" and not token_cache_dir:
      raise ValueError("token_cache='disk' needs a token_cache_dir")
    # What the last 'recompute' rerank pass did (videos encoded, largest difference from
    # the stage-1 embeddings); benchmarks and tests read it.
    self.reread_stats: dict = {}
    self.progress = progress
    self.batch_sharding = sharding_lib.batch_sharding(mesh)
    model = lambda params: nnx.merge(graphdef, params)

    def encode_video(params, frames):
      m = model(params)
      pooled, tokens = m.encode_video(frames)
      return m.video_embedding(pooled), tokens.astype(jnp.float16)

    def encode_text(params, ids, mask):
      m = model(params)
      hidden, _ = m.encode_text(ids, mask)
      return m.text_embedding(hidden), hidden

    def score_pairs(params, text_hidden, text_mask, videos, slot_video):
      # text_hidden [P, L, D] (P = slots x texts_per_slot, sharded); videos [U, T, N, D]
      # replicated; slot_video [P / texts_per_slot], sharded like the texts: the gather
      # happens on the device, so each distinct video crossed the host link once.
      m = model(params)
      slot_tokens = jnp.take(videos, slot_video, axis=0).astype(m.dtype or jnp.float32)
      fused, _ = m.fuse(text_hidden, text_mask, slot_tokens)   # k texts a slot's video
      return m.itm_logits(fused)[:, 1]

    self._encode_video = jax.jit(encode_video)
    self._encode_text = jax.jit(encode_text)
    self._score_pairs = jax.jit(score_pairs)

  def texts_per_slot(self, mode: str) -> int:
    """Texts fused with one copy of a video in a rerank batch. 'v2t': up to
    `MAX_TEXTS_PER_SLOT`, dividing each device's share of the batch, so that every device
    holds whole slots. Other modes: 1 (the video changes with each text)."""
    if mode != "v2t":
      return 1
    per_device = self.rerank_batch_size // self.mesh.size
    return max(d for d in range(1, min(per_device, MAX_TEXTS_PER_SLOT) + 1) if per_device % d == 0)

  def videos_sent(self, num_videos: int) -> int:
    """Videos a rerank batch with `num_videos` distinct ones sends: padded to a power of
    two (at most videos_per_batch), so the scorer compiles for log2 many shapes and a
    batch of one video's pairs sends one video."""
    return min(self.videos_per_batch, 1 << (num_videos - 1).bit_length())

  def _put(self, *arrays):
    """Host arrays that are identical on every process -> global arrays split over devices."""
    return [jax.make_array_from_callback(a.shape, self.batch_sharding, lambda idx, a=a: a[idx])
            for a in arrays]

  def _put_replicated(self, array):
    """A host array identical on every process -> one copy on every device."""
    sharding = sharding_lib.replicated(self.mesh)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])

  def _put_local(self, *arrays):
    """Each process's own rows -> one global array (multi-host evaluation of videos)."""
    return [jax.make_array_from_process_local_data(self.batch_sharding, a) for a in arrays]

  # -- stage 1 --------------------------------------------------------------------------
  def _encoded_batches(self, params, data, desc: str):
    """Each global batch of `data.videos` through the video encoder: (video indices [B],
    valid [B] bool, per-frame embeddings [B,T,E] on the host, tokens [B,T,N,D] float16
    still on the device), the same on every process.

    `data.videos` yields batches of this process's videos (`frames`, `video_idx`, `valid`);
    each process's batch size must be a multiple of its local device count. The same
    batches through the same jitted program give the same numbers, which the
    'recompute' rerank relies on.
    """
    batches = iter(data.videos)
    try:
      with tqdm.tqdm(total=data.num_videos, desc=desc, disable=not self.progress) as bar:
        for batch in batches:
          frames = np.asarray(batch["frames"])
          # Copies: JAX may keep the array it is given alive, which would keep the
          # loader's shared-memory block alive past the end of the process.
          index, valid = (np.array(batch[k]) for k in ("video_idx", "valid"))
          emb, tok = self._encode_video(params, *self._put_local(frames))
          index, valid = to_host(self._put_local(index)[0]), to_host(self._put_local(valid)[0])
          keep = valid.astype(bool)
          batch = frames = None  # the loader's shared-memory arrays (see the finally)
          yield index, keep, to_host(emb), tok
          bar.update(int(keep.sum()))
    finally:
      # Workers stopped, batches unlinked: nothing left in shared memory at exit.
      close_iterator(batches)
      batches = batch = frames = None
      release_shared_memory()

  def embed_videos(self, params, data):
    """Per-frame embeddings [Nv,T,E] and fusion tokens [Nv,T,N,D] (float16) of every video;
    the tokens are None with token_cache='recompute' (they never leave the device).

    `data.videos` yields batches of this process's videos (`frames`, `video_idx`, `valid`);
    each process's batch size must be a multiple of its local device count.
    """
    keep_tokens = self.token_cache != "recompute"
    video_emb, tokens = None, None
    for index, keep, emb, tok in self._encoded_batches(params, data, "embed videos"):
      if video_emb is None:
        video_emb = np.zeros((data.num_videos,) + emb.shape[1:], np.float32)
        if keep_tokens:
          tokens = self._token_store((data.num_videos,) + tok.shape[1:])
      video_emb[index[keep]] = emb[keep]
      if keep_tokens:
        tokens[index[keep]] = to_host(tok)[keep]
    return video_emb, tokens

  def _token_store(self, shape):
    if self.token_cache_dir:
      os.makedirs(self.token_cache_dir, exist_ok=True)
      # Every process holds all the tokens (they are gathered) and the folder may be shared
      # by all hosts, so the processes other than 0 write files of their own.
      p = jax.process_index()
      name = "video_tokens.npy" if p == 0 else f"video_tokens.process{p}.npy"
      path = os.path.join(self.token_cache_dir, name)
      return np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    return np.zeros(shape, np.float16)

  def embed_texts(self, params, data):
    n = data.input_ids.shape[0]
    bs = self.text_batch_size
    embs, hiddens = [], []
    with tqdm.tqdm(total=n, desc="embed texts", disable=not self.progress) as bar:
      for start in range(0, n, bs):
        ids = data.input_ids[start:start + bs]
        mask = data.attention_mask[start:start + bs]
        b = ids.shape[0]
        padded = -(-b // self.mesh.size) * self.mesh.size
        emb, hidden = self._encode_text(params, *self._put(_pad_to(ids, padded), _pad_to(mask, padded)))
        embs.append(to_host(emb)[:b])
        hiddens.append(to_host(hidden)[:b])
        bar.update(b)
    return np.concatenate(embs), np.concatenate(hiddens)

  # -- stage 2 --------------------------------------------------------------------------
  def rerank_batches(self, slot_videos, slots_per_batch: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of the slots (their videos `slot_videos`, sorted): at most
    `slots_per_batch` slots and `videos_per_batch` distinct videos each."""
    bounds, start, n = [], 0, len(slot_videos)
    vids = np.asarray(slot_videos)
    while start < n:
      stop = min(start + slots_per_batch, n)
      # Distinct videos in [start, stop): pairs are sorted, so count changes of video.
      changes = np.flatnonzero(vids[start + 1:stop] != vids[start:stop - 1])
      if len(changes) >= self.videos_per_batch:  # cut before the (cap+1)-th video
        stop = start + 1 + int(changes[self.videos_per_batch - 1])
      bounds.append((start, stop))
      start = stop
    return bounds

  def score_candidates(self, params, pairs, text_hidden, text_mask, video_tokens, *,
                       progress: bool | None = None):
    """Matching-head logit for each (video, text) row of `pairs`, in the order given.

    The pairs are scored grouped by video (`metrics.candidate_pairs` already sorts them so).
    `video_tokens[v]`: video v's tokens [T, N, D] (any array-like indexed by a list)."""
    given = np.asarray(pairs)
    order = np.argsort(given[:, 0], kind="stable") if len(given) else np.zeros(0, np.int64)
    pairs = given[order]
    scores = np.zeros(len(pairs), np.float32)
    k = self.texts_per_slot(nnx.merge(self.graphdef, params).fusion_encoder.mode)
    slot_video, slot_rows = _slots(pairs[:, 0], k)
    bs = self.rerank_batch_size
    video_bytes = text_bytes = 0
    batches = self.rerank_batches(slot_video, bs // k)
    show = self.progress if progress is None else progress
    with tqdm.tqdm(total=len(pairs), desc="rerank pairs", disable=not show) as bar:
      for start, stop in batches:
        uniq, index = np.unique(slot_video[start:stop], return_inverse=True)
        padded = self.videos_sent(len(uniq))
        videos = np.asarray(video_tokens[_pad_to(uniq, padded)])  # padding rows: unused
        rows = _pad_to(slot_rows[start:stop], bs // k, fill=-1).reshape(-1)   # [bs] pair or -1
        real = rows >= 0
        txts = np.where(real, pairs[rows, 1], 0)   # padding rows score text 0, unused
        hidden, mask = text_hidden[txts], text_mask[txts]
        out = self._score_pairs(params, *self._put(hidden, mask), self._put_replicated(videos),
                                *self._put(_pad_to(index.reshape(-1), bs // k).astype(np.int32)))
        scores[rows[real]] = to_host(out)[real]
        video_bytes += videos.nbytes
        text_bytes += hidden.nbytes + mask.nbytes
        bar.update(int(real.sum()))
    self.transfer_stats = dict(pairs=len(pairs), batches=len(batches), video_bytes=video_bytes,
                               text_bytes=text_bytes, texts_per_slot=k,
                               padded_texts=len(batches) * bs - len(pairs))
    out = np.empty_like(scores)
    out[order] = scores
    return out

  def score_candidates_recomputed(self, params, pairs, text_hidden, text_mask, data,
                                  video_emb: np.ndarray | None = None) -> np.ndarray:
    """`score_candidates` without a token store: the videos of `data` are read and encoded
    again, batch by batch as stage 1 did, and each batch's videos' pairs are scored with
    its tokens before the next batch is read. Each video is encoded once; the host holds
    one batch of tokens. `video_emb`: stage 1's embeddings, compared with this pass's to
    catch a video that reads differently the second time (warned about, not fatal: a
    flaky file gives a black clip once and frames the other time)."""
    given = np.asarray(pairs).reshape(-1, 2)
    scores = np.zeros(len(given), np.float32)
    order = np.argsort(given[:, 0], kind="stable")
    sorted_videos = given[order, 0]
    totals = dict(pairs=0, batches=0, video_bytes=0, text_bytes=0, padded_texts=0)
    encoded, worst, changed = 0, 0.0, 0
    if len(given):
      for index, keep, emb, tok in self._encoded_batches(params, data, "rerank videos"):
        videos = index[keep]
        encoded += len(videos)
        if video_emb is not None and len(videos):
          diff = np.abs(emb[keep] - video_emb[videos]).reshape(len(videos), -1).max(axis=1)
          worst = max(worst, float(diff.max()))
          changed += int((diff > REREAD_TOLERANCE).sum())
        lo = np.searchsorted(sorted_videos, videos, side="left")
        hi = np.searchsorted(sorted_videos, videos, side="right")
        spans = [np.arange(a, b) for a, b in zip(lo, hi)]
        rows = order[np.concatenate(spans)] if spans else np.zeros(0, int)
        if not len(rows):
          continue
        # The batch's kept rows are its token store; pairs name videos by row in it.
        by_id = np.argsort(videos)
        local = np.stack([by_id[np.searchsorted(videos[by_id], given[rows, 0])], given[rows, 1]], 1)
        scores[rows] = self.score_candidates(params, local, text_hidden, text_mask,
                                             to_host(tok)[keep], progress=False)
        for key in totals:
          totals[key] += self.transfer_stats[key]
    if changed and jax.process_index() == 0:
      print(f"token_cache='recompute': {changed} video(s) gave other embeddings when read for "
            f"the rerank than in stage 1 (largest difference {worst:.3g}); their pairs were "
            f"scored with the tokens of the second reading", flush=True)
    self.reread_stats = dict(videos_encoded=encoded, max_embedding_diff=worst,
                             videos_changed=changed)
    self.transfer_stats = dict(totals, texts_per_slot=self.transfer_stats.get("texts_per_slot"))
    return scores

  def embed(self, params, data) -> Embedded:
    """Stage-1 inputs of `data`: both encoders run once over every video and text."""
    video_emb, video_tokens = self.embed_videos(params, data)
    text_emb, text_hidden = self.embed_texts(params, data)
    return Embedded(video_emb, video_tokens, text_emb, text_hidden)

  def evaluate(self, params, data, *, num_frames: int | None = None,
               embedded: Embedded | None = None) -> dict:
    """Two-stage retrieval metrics of `data` (`embedded`: reuse an earlier `embed`)."""
    video_emb, video_tokens, text_emb, text_hidden = embedded or self.embed(params, data)
    sim_v2t = similarity(video_emb, text_emb)  # [Nv, Nt]
    pairs, top_v_for_t, top_t_for_v = metrics_lib.candidate_pairs(sim_v2t, self.k)
    if video_tokens is None:   # token_cache='recompute': read and encode the videos again
      pair_scores = self.score_candidates_recomputed(params, pairs, text_hidden,
                                                     data.attention_mask, data, video_emb)
    else:
      pair_scores = self.score_candidates(params, pairs, text_hidden, data.attention_mask,
                                          video_tokens)
    t2v, v2t = metrics_lib.rerank_matrices(sim_v2t, pairs, pair_scores, top_v_for_t,
                                           top_t_for_v, alpha=self.alpha)
    nv, nt = sim_v2t.shape
    results = metrics_lib.retrieval_metrics(sim_v2t.T, sim_v2t, data.txt2vid, data.vid2txt,
                                            prefix="emb_")
    results.update(metrics_lib.retrieval_metrics(t2v, v2t, data.txt2vid, data.vid2txt))
    if num_frames is not None:
      results["num_frames"] = int(num_frames)
    results["num_videos"], results["num_texts"], results["k"] = int(nv), int(nt), self.k
    return results
