"""Grain pipelines: training batches and retrieval eval sets, as uint8 numpy on the host.

Training (`make_train_dataset`), per corpus::

  range(num_pairs) -> shuffle (per epoch) -> random_map(read, decode, augment)
    -> [:steps * global_batch] -> batch(per-process batch) -> [process_index::process_count]

then the corpora's batches are concatenated and shuffled as whole batches (so a step is
all-image or all-video, in a seeded order, and an epoch covers every corpus), repeated,
and read by Grain worker processes (`mp_prefetch`); the captions of each batch are
tokenized as it arrives in the main process.

Clips come from the media files (`data.source = 'raw'`: PyAV decoding, `video_decode`)
or from the frames `--mode prepare` stored for the corpus (`'prepared'`, under
`data.prepared_dir`: `prepared_source`), with the same frame sampling, augmentation and
bad-file accounting; the prepared folder is checked when the dataset is built.

Determinism: every random choice (shuffles, frame sampling, crop, flip, substitutes for
bad files) comes from Grain's seeded transforms; `random_map` hands each record a
generator seeded by its position in the globally shuffled epoch. Worker processes each
produce whole batches and Grain interleaves them in order, so the same seed gives the
same batches with any number of workers. At each step process p holds the p-th contiguous
block of the global batch, so the processes' batches concatenated in process order (the
layout `jax.make_array_from_process_local_data` gives) are exactly the single-process
global batch, rows in the same order: a run gives the same losses on any number of hosts.

Batches (numpy, per process, b = global_batch_size / process_count):
  frames uint8 [b, T, S, S, 3] (T = 1 for image corpora), input_ids int32 [b, L],
  attention_mask int32 [b, L], video_idx int32 [b], and the host-only failure record
  decode_failures int32 [b], failure_log str [b] (see bad_data.py). `MODEL_KEYS` names
  the fields the train step reads; `t2v2t_jax.sharding.global_batch` puts those on the
  devices.

The iterator state (`it.get_state()`, or Orbax with `grain.checkpoint.CheckpointSave(it)`
/ `CheckpointRestore(it)`) restores the exact next batch; restore with the same config,
seed, worker count and process layout.

Closing: with workers, each batch reaches the main process in shared memory, unlinked
only when the iterator is closed or the array is collected. An iterator left open at exit
leaves its prefetched blocks behind (Python's resource tracker then reports "leaked
shared_memory objects"), so whoever iterates closes the iterator when done, drops its
batches and calls `release_shared_memory` (the train loop and
`RetrievalEvaluator.embed_videos` do).
"""

from __future__ import annotations

import dataclasses
import gc
from typing import Any

import grain
import numpy as np

from input_pipeline import bad_data
from input_pipeline import transforms
from input_pipeline import video_decode
from input_pipeline.annotations import Corpus, load_corpus_from_config
from input_pipeline.config import check_source, corpus_field
from input_pipeline.prepared_source import PreparedFrames
from input_pipeline.text import CaptionEncoder, load_tokenizer

MODEL_KEYS = ("frames", "input_ids", "attention_mask", "video_idx")


def derive_seed(seed: int, *keys: int) -> int:
  """A seed in [0, 2**32) for one transformation, the same on every machine."""
  return int(np.random.SeedSequence([int(seed), *keys]).generate_state(1)[0])


def _process_layout(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  return int(process_index), int(process_count)


def _as_tokenizer(tokenizer):
  return load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


class _MediaReader:
  """Reads one clip (or image) of a corpus, raising `bad_data.MediaError` or the decoder's
  error when the file cannot give it: from the media file (`prepared` None), or from the
  corpus's prepared frames (`prepared_source.PreparedFrames`), sampled the same way."""

  def __init__(self, corpus: Corpus, num_frames: int, mode: str, max_seconds: float | None,
               prepared: PreparedFrames | None = None):
    self.corpus = corpus
    self.num_frames = 1 if corpus.kind == "image" else int(num_frames)
    self.mode = mode
    self.max_seconds = max_seconds
    self.prepared = prepared

  def read(self, video_idx: int, rng: np.random.Generator | None) -> np.ndarray:
    path = self.corpus.media_path(video_idx)
    if self.prepared is not None:
      frames, _ = self.prepared.read_clip(video_idx, self.num_frames, self.mode, rng)
    else:
      bad_data.check_file(path)
      if self.corpus.kind == "image":
        return video_decode.read_image(path)
      frames, _ = video_decode.read_clip(path, self.num_frames, self.mode, rng,
                                         max_seconds=self.max_seconds)
    if frames.shape[0] != self.num_frames:
      raise bad_data.MediaError("too_few_frames", path,
                                f"decoded {frames.shape[0]} of {self.num_frames} frames")
    return frames


def _prepared_frames(corpus: Corpus, corpus_cfg, source: str, prepared_dir: str | None
                     ) -> PreparedFrames | None:
  """The prepared frames of a corpus when `source` is 'prepared' (checked now: a missing,
  unfinished or stale folder fails here, naming its path), else None."""
  if check_source(source) == "raw":
    return None
  return PreparedFrames(corpus, prepared_dir or "", corpus_field(corpus_cfg, "max_seconds"))


class _TrainExample(_MediaReader):
  """`random_map` transform: training-pair index -> augmented clip and its caption."""

  def __init__(self, corpus: Corpus, *, num_frames: int, image_size: int,
               max_seconds: float | None, max_attempts: int,
               prepared: PreparedFrames | None = None):
    super().__init__(corpus, num_frames, "rand", max_seconds, prepared)
    self.image_size = int(image_size)
    self.max_attempts = int(max_attempts)

  def __call__(self, pair_index, rng: np.random.Generator) -> dict[str, Any]:
    corpus = self.corpus
    # Per-pair lookups (`video_of_pair`, one caption): a worker reads those bytes of the
    # corpus's index, never whole arrays (annotation_index.AnnotationIndex).
    frames, pair_index, failures = bad_data.load_with_substitutes(
        lambda i: self.read(corpus.video_of_pair(i), rng), int(pair_index), corpus.num_pairs,
        rng, self.max_attempts, corpus.pair_path)
    frames = transforms.train_transform(frames, self.image_size, rng)
    return {"frames": np.ascontiguousarray(frames, np.uint8),
            "caption": corpus.pair_caption[pair_index],
            "video_idx": np.int32(corpus.video_of_pair(pair_index)),
            "decode_failures": np.int32(len(failures)),
            "failure_log": bad_data.encode_failure_log(failures)}


class _TokenizeBatch:
  """`map` after the workers: batch `caption` strings -> `input_ids`, `attention_mask`.
  Tokenizing a batch costs about a millisecond; doing it here keeps transformers out of
  the worker processes (whose start-up it would slow down by seconds)."""

  def __init__(self, encoder: CaptionEncoder):
    self.encoder = encoder

  def __call__(self, batch: dict) -> dict:
    batch = dict(batch)
    input_ids, attention_mask = self.encoder.encode_batch(
        [str(c) for c in batch.pop("caption")])
    batch["input_ids"], batch["attention_mask"] = input_ids, attention_mask
    return batch


def _load_train_corpora(data_cfg) -> list[tuple[Any, Corpus]]:
  corpora = list(data_cfg.train_corpora)
  if not corpora:
    raise ValueError("data.train_corpora is empty: name at least one annotation file")
  return [(c, load_corpus_from_config(c)) for c in corpora]  # validates every file first


def train_steps_per_epoch(data_cfg, global_batch_size: int) -> int:
  """Batches per epoch of `make_train_dataset` (each corpus drops its last partial batch)."""
  return sum(corpus.num_pairs // global_batch_size for _, corpus in _load_train_corpora(data_cfg))


def make_train_dataset(data_cfg, *, tokenizer, global_batch_size: int, num_frames: int,
                       image_size: int, seed: int, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
  """The training batches of this process (see the module docstring).

  Args:
    data_cfg: `config.data_config()` with `train_corpora` filled in.
    tokenizer: a BertTokenizer, or a name/path for `text.load_tokenizer`; None: the
      config's `tokenizer`.
    global_batch_size: examples per step over all processes.
    num_frames: frames per video clip (image corpora give 1).
    image_size: output side S of the square frames.
    seed: the data seed; the same seed gives the same batches.
    process_index, process_count: this process's shard; default jax.process_index() /
      jax.process_count().
  """
  process_index, process_count = _process_layout(process_index, process_count)
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}")
  local_batch = global_batch_size // process_count
  source = check_source(data_cfg.get("source", "raw"))
  corpora = _load_train_corpora(data_cfg)
  tokenizer = _as_tokenizer(tokenizer if tokenizer is not None else data_cfg.tokenizer)

  parts = []
  for corpus_id, (cfg, corpus) in enumerate(corpora):
    steps = corpus.num_pairs // global_batch_size
    if steps == 0:
      raise ValueError(f"corpus {corpus.name!r} ({corpus.anno_file}) has {corpus.num_pairs} "
                       f"pairs, fewer than one global batch of {global_batch_size}")
    if corpus_field(cfg, "max_len", data_cfg.max_len) != data_cfg.max_len:
      raise ValueError(f"train corpus {corpus.name!r} sets max_len="
                       f"{corpus_field(cfg, 'max_len')}: training uses one text length, "
                       f"set data.max_len instead")
    example = _TrainExample(corpus, num_frames=num_frames, image_size=image_size,
                            max_seconds=corpus_field(cfg, "max_seconds"),
                            max_attempts=data_cfg.max_attempts,
                            prepared=_prepared_frames(corpus, cfg, source,
                                                      data_cfg.get("prepared_dir")))
    ds = grain.MapDataset.range(corpus.num_pairs)
    ds = ds.shuffle(seed=derive_seed(seed, corpus_id, 0))
    # Before sharding: a record's RNG depends on its place in the global epoch only.
    ds = ds.random_map(example, seed=derive_seed(seed, corpus_id, 1))
    ds = ds[:steps * global_batch_size]
    # Batch, then take every process_count-th batch: process p gets rows
    # [p * local_batch, (p + 1) * local_batch) of each global batch. (Batching is lazy:
    # a process reads and decodes only its own examples.)
    ds = ds.batch(local_batch, drop_remainder=True)
    parts.append(ds[process_index::process_count])

  if len(parts) == 1:
    ds = parts[0]
  else:
    # Whole batches of one corpus, in a seeded order that is the same on every process.
    ds = grain.MapDataset.concatenate(parts).shuffle(seed=derive_seed(seed, len(parts), 2))
  ds = ds.repeat(data_cfg.num_epochs)
  batches = _read(ds, num_workers=data_cfg.num_workers, threads=data_cfg.worker_threads,
                  prefetch=data_cfg.prefetch)
  return batches.map(_TokenizeBatch(CaptionEncoder(tokenizer, data_cfg.max_len, data_cfg.add_sep)))


def close_iterator(it) -> None:
  """Stops an iterator's worker processes and unlinks the blocks still queued for it."""
  close = getattr(it, "close", None)
  if close is not None:
    close()


def release_shared_memory() -> None:
  """Frees, before returning, the shared-memory blocks of batches no longer referenced.

  Call it after closing the iterator and dropping every reference to it and its batches.
  A block already handed to this process is unlinked when its array is collected, by
  Grain's deletion thread: so collect (the iterator's buffers hold cycles), then wait for
  that thread, which runs its queue in order: a no-op queued last has run once everything
  before it has."""
  gc.collect()
  # grain._src is not public, hence looked up defensively (absent: nothing to wait for).
  try:
    from grain._src.python.ipc import shared_memory_array  # noqa: PLC0415
  except ImportError:
    return
  pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
  if pool is not None:
    pool.apply(int)


def _read(ds: grain.MapDataset, *, num_workers: int, threads: int, prefetch: int
          ) -> grain.IterDataset:
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(int(threads), 1),
                                            prefetch_buffer_size=max(int(prefetch), 1)))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(num_workers), per_worker_buffer_size=max(int(prefetch), 1)))
  return it


# ---------------------------------------------------------------------------------------
# Evaluation: one item per video, 'middle' frames, plain resize.


class _EvalExample(_MediaReader):
  """`map` transform: (video index, valid) -> eval clip. A bad file gives a black clip
  (a substitute would break the ground truth) and its failure record, which the
  evaluation collects, prints and saves (`evaluation/broken_videos.py`)."""

  def __init__(self, corpus: Corpus, *, num_frames: int, image_size: int,
               max_seconds: float | None, prepared: PreparedFrames | None = None):
    super().__init__(corpus, num_frames, "middle", max_seconds, prepared)
    self.image_size = int(image_size)

  def __call__(self, item) -> dict[str, Any]:
    video_idx, valid = int(item[0]), int(item[1])
    path = self.corpus.media_path(video_idx)
    failures = []
    try:
      frames = transforms.eval_transform(self.read(video_idx, None), self.image_size)
    except Exception as e:  # pylint: disable=broad-except
      failures.append(bad_data.classify(path, e))
      frames = np.zeros((self.num_frames, self.image_size, self.image_size, 3), np.uint8)
    return {"frames": np.ascontiguousarray(frames, np.uint8),
            "video_idx": np.int32(video_idx), "valid": np.int32(valid),
            "decode_failures": np.int32(len(failures)),
            "failure_log": bad_data.encode_failure_log(failures)}


@dataclasses.dataclass
class EvalData:
  """A retrieval eval set.

  Attributes:
    name: corpus name.
    num_frames: frames per clip actually used (1 for images); print it with the results.
    videos: the videos of this process, one item per video (`frames`, `video_idx`,
      `valid` = 0 on padding, failure fields): a `grain.MapDataset` of items, or, with a
      batch size, a `grain.IterDataset` of batches.
    num_videos: videos in the corpus (all processes).
    texts: the raw texts; `input_ids`, `attention_mask` int32 [num_texts, L] their tokens.
    txt2vid: int32 [num_texts], the video of each text.
    vid2txt: for each video, the indices of its texts.
    video_paths: the media file of each video (names the broken ones).
  """
  name: str
  num_frames: int
  videos: Any
  num_videos: int
  texts: list[str]
  input_ids: np.ndarray
  attention_mask: np.ndarray
  txt2vid: np.ndarray
  vid2txt: list[list[int]]
  video_paths: list[str] = dataclasses.field(default_factory=list)


def make_eval_data(corpus_cfg, *, tokenizer, num_frames: int, image_size: int,
                   max_len: int = 32, add_sep: bool = False, batch_size: int | None = None,
                   num_workers: int = 0, worker_threads: int = 1, prefetch: int = 2,
                   process_index: int | None = None, process_count: int | None = None,
                   source: str = "raw", prepared_dir: str | None = None) -> EvalData:
  """The eval set of one corpus (`config.corpus_config`; its `max_len` overrides `max_len`).

  `source`, `prepared_dir`: `data.source` and `data.prepared_dir` ('raw': decode the
  videos; 'prepared': read the corpus's prepared frames under `prepared_dir`).

  With several processes (or a batch size), the video list is padded by repeating the
  last video (`valid` = 0) so that every process gets the same number of full batches;
  process p reads videos p, p + process_count, ...
  """
  corpus = load_corpus_from_config(corpus_cfg)
  process_index, process_count = _process_layout(process_index, process_count)
  encoder = CaptionEncoder(_as_tokenizer(tokenizer), corpus_field(corpus_cfg, "max_len", max_len),
                           add_sep)
  input_ids, attention_mask = encoder.encode_batch(corpus.texts)

  n = corpus.num_videos
  chunk = process_count * (batch_size or 1)
  padded = -(-n // chunk) * chunk
  ids = np.concatenate([np.arange(n), np.full(padded - n, n - 1)]).astype(np.int32)
  valid = (np.arange(padded) < n).astype(np.int32)
  items = np.stack([ids, valid], axis=1)[process_index::process_count]
  example = _EvalExample(corpus, num_frames=num_frames, image_size=image_size,
                         max_seconds=corpus_field(corpus_cfg, "max_seconds"),
                         prepared=_prepared_frames(corpus, corpus_cfg, source, prepared_dir))
  videos = grain.MapDataset.source(list(map(tuple, items.tolist()))).map(example)
  if batch_size:
    videos = _read(videos.batch(batch_size), num_workers=num_workers, threads=worker_threads,
                   prefetch=prefetch)
  return EvalData(name=corpus.name, num_frames=example.num_frames, videos=videos,
                  num_videos=n, texts=list(corpus.texts), input_ids=input_ids,
                  attention_mask=attention_mask, txt2vid=corpus.txt2vid.copy(),
                  vid2txt=[list(v) for v in corpus.vid2txt],
                  video_paths=[corpus.media_path(i) for i in range(n)])
