"""The data part of the run config, with SPEC defaults that recipes extend.

A recipe does::

  config.data = data_config()
  config.data.train_corpora = [
      corpus_config("msrvtt_9k", "anno/msrvtt_train9k.json", "videos/msrvtt"),
  ]
  config.data.eval_corpora = [corpus_config("msrvtt_1k", "anno/msrvtt_test1k.json", "videos/msrvtt")]

Fields of `data_config()`:

  train_corpora      list of corpus configs (see `corpus_config`) mixed for training. With
                     more than one corpus each batch holds one corpus only; the order of the
                     batches is random but fixed by the seed, and an epoch covers all of them.
  eval_corpora       list of corpus configs for retrieval evaluation (one item per video).
  tokenizer          Hugging Face hub name, a local folder holding `vocab.txt`, or the path
                     of a WordPiece vocab file.
  max_len            token sequence length, [CLS] included (SPEC: 32 pretrain and MSR-VTT,
                     64 DiDeMo and ActivityNet). Training uses this one length; an eval
                     corpus config may set its own.
  add_sep            append [SEP] after the caption tokens (VindLU does not).
  num_workers        Grain worker processes that read, decode and augment (0: in the main
                     process). Decoding is the bottleneck at scale (SPEC 9): use many.
  worker_threads     threads per worker reading records of a batch concurrently.
  prefetch           batches each worker keeps ready.
  max_attempts       attempts per sample before giving up: a bad file is replaced by another
                     entry of its corpus chosen from the record's seed, up to this many times.
  failure_fraction   stop the run when more than this fraction of samples failed ...
  failure_min_samples  ... once at least this many samples were read.
  failures_listed    how many failures the stop message lists.
  num_epochs         None: repeat forever (the train loop counts steps); else that many epochs.
  source             where clips come from: 'raw' (decode the videos named by the annotation
                     files) or 'prepared' (read the JPEG frame shards that `--mode prepare`
                     wrote under `prepared_dir`; docs/data.md, "Preparing a corpus").
  prepared_dir       folder of the prepared shards, one sub-folder per corpus name (recipes:
                     `{data_root}/prepared`).
  prepare_fps        frame rate the prepare step keeps (SPEC 6: 2); 0 keeps every frame. A
                     corpus config may set its own.
  prepare_short_side  the prepare step resizes frames whose short side is longer to this
                     many pixels (SPEC 6: 224 WebVid, MSR-VTT; 360 DiDeMo, ActivityNet); 0
                     keeps the size. A corpus config may set its own.
  prepare_jpeg_quality  JPEG quality (1-95) of the prepared frames (4:2:0 chroma).
  prepare_shard_size  videos per prepared shard (the unit of work and of resumption).
  prepare_workers    processes that decode and write shards in `--mode prepare` (0: one per
                     core).

Frame counts and image size are not here: they are part of the recipe (train and
inference frames differ, SPEC 7) and are passed to the pipeline functions explicitly.
"""

from __future__ import annotations

import ml_collections

from t2v2t_jax.errors import Refusal

CORPUS_KINDS = ("video", "image")
DATA_SOURCES = ("raw", "prepared")


def corpus_config(name: str, anno_file: str, media_root: str, *, kind: str = "video",
                  paragraph: bool = False, max_seconds: float | None = None,
                  max_len: int | None = None, prepare_fps: float | None = None,
                  prepare_short_side: int | None = None) -> ml_collections.ConfigDict:
  """One annotation file and the folder its media paths are relative to.

  Args:
    name: short name used in logs and error messages.
    anno_file: VindLU-format JSON list (`{"video" | "image": path, "caption": str | [str]}`).
    media_root: folder the media paths of the file are relative to; must exist.
    kind: 'video' (entries have `video`) or 'image' (entries have `image`; 1-frame clips).
    paragraph: join the captions of an entry with a space into one text (DiDeMo,
      ActivityNet paragraph retrieval); otherwise each caption of a list is its own pair.
    max_seconds: only sample frames from the first `max_seconds` of each video (DiDeMo's
      first 30 s); None: the whole video.
    max_len: text length for this eval corpus; None: the data config's `max_len`.
      (Training uses `data.max_len` for every corpus.)
    prepare_fps: frame rate `--mode prepare` keeps for this corpus; None: the data config's
      `prepare_fps`.
    prepare_short_side: short side `--mode prepare` resizes this corpus's frames to (360 for
      DiDeMo and ActivityNet in SPEC 6); None: the data config's `prepare_short_side`.
  """
  if kind not in CORPUS_KINDS:
    raise Refusal(f"corpus {name!r}: kind={kind!r} is not one of {CORPUS_KINDS}")
  c = ml_collections.ConfigDict()
  c.name = name
  c.anno_file = anno_file
  c.media_root = media_root
  c.kind = kind
  c.paragraph = paragraph
  c.max_seconds = ml_collections.FieldReference(max_seconds, field_type=float)
  c.max_len = ml_collections.FieldReference(max_len, field_type=int)
  c.prepare_fps = ml_collections.FieldReference(prepare_fps, field_type=float)
  c.prepare_short_side = ml_collections.FieldReference(prepare_short_side, field_type=int)
  return c


def data_config() -> ml_collections.ConfigDict:
  """The data config with SPEC defaults (pretraining text length, BERT tokenizer)."""
  c = ml_collections.ConfigDict()
  c.train_corpora = []
  c.eval_corpora = []
  c.tokenizer = "bert-base-uncased"
  c.max_len = 32
  c.add_sep = False
  c.num_workers = 8
  c.worker_threads = 2
  c.prefetch = 2
  c.max_attempts = 10
  c.failure_fraction = 0.01
  c.failure_min_samples = 1000
  c.failures_listed = 10
  c.num_epochs = ml_collections.FieldReference(None, field_type=int)
  c.source = "raw"
  c.prepared_dir = ""
  c.prepare_fps = 2.0
  c.prepare_short_side = 224
  c.prepare_jpeg_quality = 90
  c.prepare_shard_size = 128
  c.prepare_workers = 0
  return c


def check_source(source: str) -> str:
  """`source` if it is one of `DATA_SOURCES`, else a ValueError naming the choices."""
  if source not in DATA_SOURCES:
    raise Refusal(f"data.source={source!r} is not one of {DATA_SOURCES}")
  return source


def corpus_field(corpus, key: str, default=None):
  """Reads a corpus config given as a ConfigDict or a plain dict (lists of dicts in a
  ConfigDict stay plain dicts)."""
  value = corpus.get(key, default)
  return default if value is None else value
