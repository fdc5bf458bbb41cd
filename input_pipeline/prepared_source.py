"""Prepared corpora: where `--mode prepare` puts a corpus's frames, and reading them back.

A prepared corpus is a TensorFlow Datasets (tfds) dataset of ArrayRecord files, readable
without TensorFlow (`tfds.builder_from_directory(dir).as_data_source("videos")`,
`tfds.data_source(name, data_dir=prepared_dir, split="videos")`, or Grain's
`ArrayRecordDataSource` over the shard files):

  {prepared_dir}/{name}/1.0.0/
    {name}-videos.array_record-00000-of-000NN   videos [0, S) of the corpus, S = shard size
    {name}-videos.array_record-00001-of-000NN   videos [S, 2S), ...
    prepare_plan.json       settings, corpus fingerprint and shard layout (written first)
    prepare_shards/00000.json  one per finished shard: record count and failures
    dataset_info.json, features.json   tfds metadata (written once every shard is done)
    prepare_info.json       summary and every failure; written last: the corpus is complete

`name` is the corpus name with every character other than letters, digits and `_` made
`_` (a tfds dataset name). Record i is video i of the corpus (`Corpus.media`, the order of
first appearance in the annotation file), a `tf.train.Example` with the features of
`features()`:

  video_idx      int64, the video index (= the record index)
  video          the media path as the annotation file writes it
  frames         the kept frames, JPEG bytes each, in presentation order
  frame_index    int32 [n], each kept frame's presentation index in the source video
  timestamp      float32 [n], its time in seconds from the source's first frame
  height, width  int32, size of the stored frames
  source_num_frames, source_fps   the source video's frame count and average frame rate
  error_reason, error_message     '' for a good video; else why it could not be prepared
                 (a reason of `bad_data.REASONS`): the record has no frames

Reading (`PreparedFrames.read_clip`) treats the stored frames as the video: the clip's
frames are sampled from them with `frame_sampling.sample_frame_indices` (random in
training, the segment middles in evaluation), exactly as the raw path samples from all
the frames of a (2 fps) video file, then JPEG-decoded. A record with an error raises
`bad_data.MediaError` with the stored reason, so a video that failed at prepare time is
counted and replaced in training (a black clip in evaluation) like a failed decode.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Any

import numpy as np
from PIL import Image

from input_pipeline import bad_data
from input_pipeline.frame_sampling import sample_frame_indices
from t2v2t_jax.errors import Refusal
from t2v2t_jax.json_input import read_json

VERSION = "1.0.0"
SPLIT = "videos"
PLAN_FILE = "prepare_plan.json"
INFO_FILE = "prepare_info.json"
SHARD_INFO_DIR = "prepare_shards"
FORMAT = 1  # bump when the record layout changes
PREPARE_HELP = ("run `python main.py --mode prepare --config <recipe>` with the same data "
                "settings first (docs/data.md, \"Preparing a corpus\")")


def import_tfds():
  """tensorflow_datasets, or an ImportError that says how to install it."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("prepared corpora need tensorflow-datasets and array-record (no "
                      "TensorFlow): pip install -e '.[prepare]'") from e
  return tfds


def tfds_name(corpus_name: str) -> str:
  """The corpus name as a tfds dataset name: `[A-Za-z]\\w*`."""
  name = re.sub(r"\W", "_", str(corpus_name))
  return name if re.match(r"[A-Za-z]", name) else "c_" + name


def corpus_dir(prepared_dir: str, corpus_name: str) -> str:
  """The folder holding one prepared corpus (the tfds dataset's version folder)."""
  return os.path.join(os.fspath(prepared_dir), tfds_name(corpus_name), VERSION)


def shard_path(directory: str, name: str, shard: int, num_shards: int) -> str:
  """The file of one shard, named as tfds names ArrayRecord shards."""
  return os.path.join(directory, f"{name}-{SPLIT}.array_record-{shard:05d}-of-{num_shards:05d}")


def media_fingerprint(media: list[str]) -> str:
  """A hash of the corpus's distinct media paths in video-index order: records are
  addressed by video index, so a prepared corpus fits an annotation file only if its
  video list is the same."""
  digest = hashlib.sha256()
  for path in media:
    digest.update(path.encode("utf-8") + b"\n")
  return digest.hexdigest()


def features():
  """The tfds features of one record (module docstring)."""
  tfds = import_tfds()
  f = tfds.features
  return f.FeaturesDict({
      "video_idx": f.Scalar(dtype=np.int64),
      "video": f.Text(),
      "frames": f.Sequence(f.Tensor(shape=(), dtype=np.object_)),
      "frame_index": f.Tensor(shape=(None,), dtype=np.int32),
      "timestamp": f.Tensor(shape=(None,), dtype=np.float32),
      "height": f.Scalar(dtype=np.int32),
      "width": f.Scalar(dtype=np.int32),
      "source_num_frames": f.Scalar(dtype=np.int32),
      "source_fps": f.Scalar(dtype=np.float32),
      "error_reason": f.Text(),
      "error_message": f.Text(),
  })


def record_serializer():
  """`record dict -> bytes`: the `tf.train.Example` of `features()`, serialized
  deterministically (map entries in key order: the same record gives the same bytes in
  every process, so a resumed prepare writes the very bytes an uninterrupted one would)."""
  tfds = import_tfds()
  feats = features()
  serializer = tfds.core.example_serializer.ExampleSerializer(feats.get_serialized_info())

  def serialize(record: dict) -> bytes:
    example = serializer.get_tf_example(feats.encode_example(record))
    return example.SerializeToString(deterministic=True)
  return serialize


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes `obj` as JSON to `path` through a temporary file and a rename: a reader sees
  the old file or the whole new one, never a partial one."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def decode_jpeg(data: bytes) -> np.ndarray:
  """uint8 [H, W, 3] RGB of one stored frame."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def check_prepared(corpus, prepared_dir: str, max_seconds: float | None = None) -> dict:
  """Checks that `corpus` (an `annotations.Corpus`) is fully prepared under `prepared_dir`
  for reading with `max_seconds`; returns its `prepare_info.json`.

  Raises FileNotFoundError naming the missing folder, or ValueError when the folder
  holds an unfinished prepare, another video list, another media kind, or frames trimmed
  shorter than `max_seconds`.
  """
  if not prepared_dir:
    raise FileNotFoundError(f"data.source='prepared' but data.prepared_dir is not set "
                            f"(corpus {corpus.name!r}); {PREPARE_HELP}")
  directory = corpus_dir(prepared_dir, corpus.name)
  if not os.path.isdir(prepared_dir):
    raise FileNotFoundError(f"data.source='prepared' but data.prepared_dir {prepared_dir} "
                            f"does not exist (corpus {corpus.name!r} expected in {directory}); "
                            f"{PREPARE_HELP}")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"data.source='prepared' but corpus {corpus.name!r} is not "
                            f"prepared: {directory} does not exist; {PREPARE_HELP}")
  info_path = os.path.join(directory, INFO_FILE)
  if not os.path.isfile(info_path):
    plan_path = os.path.join(directory, PLAN_FILE)
    # Finished shards only: a worker killed mid-write leaves a `.json.tmp-<pid>` behind.
    shard_dir = os.path.join(directory, SHARD_INFO_DIR)
    done = (sum(name.endswith(".json") for name in os.listdir(shard_dir))
            if os.path.isdir(shard_dir) else 0)
    total = read_json(plan_path)["num_shards"] if os.path.isfile(plan_path) else "?"
    raise Refusal(f"the prepare of corpus {corpus.name!r} in {directory} is unfinished "
                  f"({done} of {total} shards): rerun the prepare command to finish it")
  info = read_json(info_path)
  problems = []
  if info.get("format") != FORMAT:
    problems.append(f"record format {info.get('format')} (this code reads {FORMAT})")
  if info["num_videos"] != corpus.num_videos or info["media_fingerprint"] != media_fingerprint(corpus.media):
    problems.append(f"another video list ({info['num_videos']} videos from "
                    f"{info.get('anno_file')}; the annotation file {corpus.anno_file} names "
                    f"{corpus.num_videos})")
  settings = info["settings"]
  if settings["kind"] != corpus.kind:
    problems.append(f"kind {settings['kind']!r}, the corpus is {corpus.kind!r}")
  stored_max = settings.get("max_seconds")
  if stored_max is not None and (max_seconds is None or max_seconds > stored_max + 1e-9):
    problems.append(f"frames trimmed to the first {stored_max} s, the corpus reads "
                    f"{'all' if max_seconds is None else f'the first {max_seconds} s'}")
  if problems:
    raise Refusal(f"the prepared corpus {directory} does not fit corpus {corpus.name!r}: "
                  + "; ".join(problems) + f". Prepare it again ({PREPARE_HELP}).")
  return info


class PreparedFrames:
  """Random access to the prepared frames of one corpus (picklable: each process opens
  the files on first use).

  Args:
    corpus: the `annotations.Corpus` read from the annotation file.
    prepared_dir: `data.prepared_dir`.
    max_seconds: only sample from stored frames before this time (None: all).
  """

  def __init__(self, corpus, prepared_dir: str, max_seconds: float | None = None):
    self.info = check_prepared(corpus, prepared_dir, max_seconds)
    self.directory = corpus_dir(prepared_dir, corpus.name)
    self.media_root = corpus.media_root
    self.media = corpus.media  # the index reads each path on demand: no copy per worker
    self.max_seconds = max_seconds
    self._source = None

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_source"] = None
    return state

  def _records(self):
    if self._source is None:
      tfds = import_tfds()
      self._source = tfds.builder_from_directory(self.directory).as_data_source(split=SPLIT)
    return self._source

  def __len__(self) -> int:
    return len(self.media)

  def record(self, video_idx: int) -> dict:
    """The stored record of a video (tfds-decoded: Text fields as bytes)."""
    return self._records()[int(video_idx)]

  def read_clip(self, video_idx: int, num_frames: int, mode: str,
                rng: np.random.Generator | None) -> tuple[np.ndarray, list[int]]:
    """`num_frames` frames sampled from the stored frames of video `video_idx` ('rand' or
    'middle', as `video_decode.read_clip` samples a video file): `(uint8 [T, H, W, 3],
    positions among the stored frames)`. Raises `bad_data.MediaError`."""
    video_idx = int(video_idx)
    path = os.path.join(self.media_root, self.media[video_idx])
    try:
      rec = self.record(video_idx)
    except Exception as e:  # pylint: disable=broad-except
      raise bad_data.MediaError("undecodable", path, f"prepared record {video_idx} in "
                                f"{self.directory} unreadable ({type(e).__name__}: {e})") from e
    if int(rec["video_idx"]) != video_idx or _text(rec["video"]) != self.media[video_idx]:
      raise bad_data.MediaError("undecodable", path, f"prepared record {video_idx} in "
                                f"{self.directory} holds {_text(rec['video'])!r}")
    reason = _text(rec["error_reason"])
    if reason:
      raise bad_data.MediaError(reason if reason in bad_data.REASONS else "undecodable", path,
                                f"failed at prepare: {_text(rec['error_message'])}")
    frames = rec["frames"]
    count = len(frames)
    if self.max_seconds is not None:
      count = max(1, int(np.sum(np.asarray(rec["timestamp"]) < self.max_seconds - 1e-6)))
    if count == 0:
      raise bad_data.MediaError("too_few_frames", path, "prepared record holds no frames")
    positions = sample_frame_indices(count, num_frames, mode, rng)
    decoded: dict[int, np.ndarray] = {}
    try:
      for p in positions:
        if p not in decoded:
          decoded[p] = decode_jpeg(frames[p])
    except Exception as e:  # pylint: disable=broad-except
      raise bad_data.MediaError("undecodable", path, f"prepared frame of record {video_idx} "
                                f"does not decode ({type(e).__name__}: {e})") from e
    return np.stack([decoded[p] for p in positions]), positions


def check_sources(data_cfg, corpus_cfgs, corpora=None) -> None:
  """A run-level check before any work: `data.source` is valid and, when it is
  'prepared', every corpus of `corpus_cfgs` is prepared under `data.prepared_dir` (raises
  as `check_prepared`). `corpora`: the corpora already loaded from `corpus_cfgs`, if the
  caller has them (saves reading each annotation file again)."""
  from input_pipeline.annotations import load_corpus_from_config  # pylint: disable=g-import-not-at-top
  from input_pipeline.config import check_source, corpus_field  # pylint: disable=g-import-not-at-top
  if check_source(data_cfg.get("source", "raw")) == "raw":
    return
  if corpora is None:
    corpora = [load_corpus_from_config(c) for c in corpus_cfgs]
  for corpus_cfg, corpus in zip(corpus_cfgs, corpora):
    check_prepared(corpus, data_cfg.get("prepared_dir", ""), corpus_field(corpus_cfg, "max_seconds"))
