"""The prepared-frame path: `input_pipeline.prepare` writes JPEG frame shards that the
pipelines read instead of the videos.

- Read through the real pipelines, prepared frames equal the raw decode (same indices,
  crops and flips) within the JPEG tolerance of docs/data.md, in training and in
  evaluation; reduced frame rate and size keep the frames the prepare step says.
- A video that fails at prepare time is listed and reads as a failed decode.
- An interrupted prepare (a worker killed, or an error in-process) resumes without losing
  or duplicating a record: the shards end up byte-identical to an uninterrupted run's.
- Selecting 'prepared' without (a finished, matching) prepare fails at once, naming the path.
"""

import json
import os
import shutil

import grain
import numpy as np
import pytest

from input_pipeline import bad_data, pipeline, prepare, prepared_source, transforms, video_decode
from input_pipeline.annotations import load_corpus
from input_pipeline.config import corpus_config, data_config
from input_pipeline.synthetic import generate_dataset, write_video
from pipeline_helpers import take_batches

T, SIZE = 4, 48
# JPEG tolerance (quality 90, 4:2:0), in uint8 levels: the mean absolute difference and
# its 99th percentile. Measured on 40 synthetic videos: mean 1.7, p99 17-19 (sharp,
# saturated colour edges are JPEG's worst case; docs/data.md, "Preparing a corpus"). A
# wrong frame would differ by >= 10 levels everywhere (the fixture's brightness ramp).
MEAN_TOL, P99_TOL = 2.5, 24


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """The synthetic set (64x64, 16 frames at 8 fps): 6 train videos (18 pairs), 4 test
  videos, plus `bad.json` naming a good, an undecodable and a missing video.

  Each video is re-encoded with its frame t brightened by 10 t levels, so that a wrong
  frame would be off by 10 levels everywhere, far beyond the JPEG tolerance (the shapes
  alone move too little from one frame to the next to tell)."""
  root = tmp_path_factory.mktemp("syn")
  paths = generate_dataset(root, num_train=6, num_val=0, num_test=4, seed=0)
  for name in os.listdir(root / "videos"):
    path = str(root / "videos" / name)
    frames = video_decode.decode_frames(path, range(16)).astype(np.int16)
    write_video(path, np.clip(frames + 10 * np.arange(16)[:, None, None, None], 0, 255)
                .astype(np.uint8), fps=8)
  (root / "videos" / "garbage.mp4").write_bytes(b"\x00not a video" * 200)
  (root / "bad.json").write_text(json.dumps([
      {"video": "videos/test_00000.mp4", "caption": "a good one"},
      {"video": "videos/garbage.mp4", "caption": "an undecodable one"},
      {"video": "videos/nowhere.mp4", "caption": "a missing one"}]))
  paths["bad"] = str(root / "bad.json")
  return paths


def _settings(**kw):
  return prepare.Settings(**{"fps": 0.0, "short_side": 0, **kw})


def _prepare(paths, split, out, name=None, workers=1, shard_size=3, **kw):
  corpus = load_corpus(paths[split], paths["root"], name=name or split)
  return prepare.prepare_corpus(corpus, str(out), _settings(**kw), shard_size=shard_size,
                                workers=workers, progress=False)


def _data_cfg(paths, source, prepared_dir):
  cfg = data_config()
  cfg.tokenizer = paths["vocab"]
  cfg.max_len = 16
  cfg.num_workers = 0
  cfg.worker_threads = 1
  cfg.prepare_fps = 0.0
  cfg.prepare_short_side = 0
  cfg.train_corpora = [corpus_config("train", paths["train"], paths["root"])]
  cfg.source, cfg.prepared_dir = source, str(prepared_dir)
  return cfg


def _batches(cfg, n=3, batch_size=6):
  return take_batches(pipeline.make_train_dataset(
      cfg, tokenizer=None, global_batch_size=batch_size, num_frames=T, image_size=SIZE, seed=3,
      process_index=0, process_count=1), n)


def _assert_close(raw, prepared):
  assert raw.shape == prepared.shape and prepared.dtype == np.uint8
  diff = np.abs(raw.astype(np.int16) - prepared.astype(np.int16))
  assert diff.mean() <= MEAN_TOL and np.percentile(diff, 99) <= P99_TOL, (
      diff.mean(), np.percentile(diff, 99), diff.max())


def test_prepared_train_batches_match_raw(data, tmp_path):
  summary = _prepare(data, "train", tmp_path)
  assert summary["num_videos"] == 6 and summary["num_failures"] == 0
  raw = _batches(_data_cfg(data, "raw", tmp_path))
  prepared = _batches(_data_cfg(data, "prepared", tmp_path))
  for a, b in zip(raw, prepared):
    assert a.keys() == b.keys()
    for key in a:
      if key != "frames":
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    _assert_close(a["frames"], b["frames"])


@pytest.mark.parametrize("max_seconds", [None, 1.0])
def test_prepared_eval_items_match_raw(data, tmp_path, max_seconds):
  _prepare(data, "test", tmp_path, max_seconds=max_seconds)
  corpus = corpus_config("test", data["test"], data["root"], max_seconds=max_seconds)
  kw = dict(tokenizer=data["vocab"], num_frames=T, image_size=SIZE, max_len=16,
            process_index=0, process_count=1)
  raw = pipeline.make_eval_data(corpus, **kw)
  prepared = pipeline.make_eval_data(corpus, source="prepared", prepared_dir=str(tmp_path), **kw)
  assert len(raw.videos) == len(prepared.videos) == 4
  for i in range(4):
    a, b = raw.videos[i], prepared.videos[i]
    assert int(b["decode_failures"]) == 0 and int(a["video_idx"]) == int(b["video_idx"]) == i
    _assert_close(a["frames"], b["frames"])


def test_reduced_rate_and_size_keep_the_frames_they_say(data, tmp_path):
  _prepare(data, "test", tmp_path, name="small", fps=2.0, short_side=48)
  corpus = load_corpus(data["test"], data["root"], name="small")
  frames = prepared_source.PreparedFrames(corpus, str(tmp_path))
  record = frames.record(1)
  # 16 frames at 8 fps, 2 fps kept: the frames at 0, 0.5, 1 and 1.5 s.
  np.testing.assert_array_equal(record["frame_index"], [0, 4, 8, 12])
  np.testing.assert_allclose(record["timestamp"], [0, 0.5, 1.0, 1.5])
  assert (int(record["height"]), int(record["width"])) == (48, 48)
  stored = np.stack([prepared_source.decode_jpeg(f) for f in record["frames"]])
  source = video_decode.decode_frames(corpus.media_path(1), [0, 4, 8, 12])
  _assert_close(transforms.resize_frames(source, 48), stored)
  # The 4 stored frames are the video: an eval clip of 4 takes each once.
  clip, positions = frames.read_clip(1, 4, "middle", None)
  assert positions == [0, 1, 2, 3]
  np.testing.assert_array_equal(clip, stored)

  # A tfds dataset readable without TensorFlow, and plain ArrayRecord files for Grain.
  tfds = prepared_source.import_tfds()
  source_tfds = tfds.data_source("small", data_dir=str(tmp_path), split="videos")
  assert len(source_tfds) == 4 and int(source_tfds[3]["video_idx"]) == 3
  directory = prepared_source.corpus_dir(str(tmp_path), "small")
  shards = sorted(os.path.join(directory, f) for f in os.listdir(directory) if ".array_record-" in f)
  assert len(grain.sources.ArrayRecordDataSource(shards)) == 4
  assert "tensorflow" not in __import__("sys").modules


def test_failed_videos_are_listed_and_read_as_failed_decodes(data, tmp_path):
  summary = _prepare(data, "bad", tmp_path, name="bad", fps=2.0)
  assert [(f["video_idx"], f["reason"]) for f in summary["failures"]] == [
      (1, "undecodable"), (2, "missing")]
  directory = prepared_source.corpus_dir(str(tmp_path), "bad")
  listed = json.load(open(os.path.join(directory, "prepare_shards", "00000.json")))["failures"]
  assert [f["video"] for f in listed] == ["videos/garbage.mp4", "videos/nowhere.mp4"]

  corpus = corpus_config("bad", data["bad"], data["root"])
  kw = dict(tokenizer=data["vocab"], num_frames=T, image_size=SIZE, max_len=16,
            process_index=0, process_count=1)
  raw = pipeline.make_eval_data(corpus, **kw)
  prepared = pipeline.make_eval_data(corpus, source="prepared", prepared_dir=str(tmp_path), **kw)
  for i, reason in ((1, "undecodable"), (2, "missing")):
    for items in (raw.videos, prepared.videos):
      (failure,) = bad_data.decode_failure_log(items[i]["failure_log"])
      assert failure.reason == reason
      assert failure.path.endswith(("garbage.mp4", "nowhere.mp4")[i - 1])
      assert not items[i]["frames"].any()  # a black clip, as for a failed decode
  assert int(prepared.videos[0]["decode_failures"]) == 0

  # Training replaces them with another entry, from the record's seed, as for raw files.
  cfg = _data_cfg(data, "prepared", tmp_path)
  cfg.train_corpora = [corpus]
  cfg.max_attempts = 50  # 2 of the 3 entries fail
  (batch,) = _batches(cfg, 1, batch_size=3)
  assert int(batch["decode_failures"].sum()) > 0
  reasons = {f.reason for log in batch["failure_log"] for f in bad_data.decode_failure_log(log)}
  assert reasons <= {"undecodable", "missing"} and set(batch["video_idx"]) == {0}


def _shard_files(directory):
  return {f: open(os.path.join(directory, f), "rb").read()
          for f in sorted(os.listdir(directory)) if ".array_record-" in f}


@pytest.mark.parametrize("workers", [2, 1])
def test_interrupted_prepare_resumes_without_loss_or_duplicates(data, tmp_path, workers):
  # 18 train pairs -> 6 videos; 6 shards of 1 video. The run dies at video 4 (a worker
  # process exits, or the in-process writer raises).
  clean = _prepare(data, "train", tmp_path / "clean", shard_size=1)
  with pytest.raises(prepare.PrepareInterrupted):
    corpus = load_corpus(data["train"], data["root"], name="train")
    prepare.prepare_corpus(corpus, str(tmp_path / "cut"), _settings(), shard_size=1,
                           workers=workers, progress=False, _fail_at_video=4)
  directory = prepared_source.corpus_dir(str(tmp_path / "cut"), "train")
  # Finished shards: a worker killed while writing its record leaves a `.json.tmp-<pid>`.
  done = sorted(f for f in os.listdir(os.path.join(directory, "prepare_shards"))
                if f.endswith(".json"))
  assert 2 <= len(done) < 6 and "00004.json" not in done
  cfg = _data_cfg(data, "prepared", tmp_path / "cut")
  with pytest.raises(ValueError, match="unfinished"):
    _batches(cfg, 1)

  resumed = _prepare(data, "train", tmp_path / "cut", shard_size=1)
  assert resumed["shards_skipped"] == len(done) and resumed["shards_written"] == 6 - len(done)
  assert _shard_files(directory) == _shard_files(
      prepared_source.corpus_dir(str(tmp_path / "clean"), "train"))
  assert resumed["shard_lengths"] == clean["shard_lengths"] == [1] * 6
  assert not os.path.exists(os.path.join(directory, prepare.TMP_DIR))
  source = prepared_source.import_tfds().data_source("train", data_dir=str(tmp_path / "cut"),
                                                     split="videos")
  assert [int(source[i]["video_idx"]) for i in range(len(source))] == list(range(6))
  # A rerun finds it finished.
  assert _prepare(data, "train", tmp_path / "cut", shard_size=1)["shards_written"] == 0


def test_prepared_source_errors_name_the_path(data, tmp_path):
  missing = tmp_path / "not_there"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    _batches(_data_cfg(data, "prepared", missing), 1)
  corpus = corpus_config("test", data["test"], data["root"])
  with pytest.raises(FileNotFoundError, match=str(missing)):
    pipeline.make_eval_data(corpus, tokenizer=data["vocab"], num_frames=T, image_size=SIZE,
                            process_index=0, process_count=1, source="prepared",
                            prepared_dir=str(missing))
  os.makedirs(missing)  # the folder exists, the corpus is not in it
  with pytest.raises(FileNotFoundError, match=os.path.join(str(missing), "train", "1.0.0")):
    prepared_source.check_sources(_data_cfg(data, "prepared", missing),
                                  _data_cfg(data, "prepared", missing).train_corpora)
  with pytest.raises(ValueError, match="data.source='frames'"):
    _batches(_data_cfg(data, "frames", missing), 1)

  # Prepared from another annotation file under the same name: stale, refused.
  _prepare(data, "test", tmp_path / "p", name="train")
  with pytest.raises(ValueError, match="another video list"):
    _batches(_data_cfg(data, "prepared", tmp_path / "p"), 1)
  # ... and the prepare step will not mix settings in one folder.
  with pytest.raises(ValueError, match="fps 0.0 there, 2.0 now"):
    _prepare(data, "test", tmp_path / "p", name="train", fps=2.0)
  shutil.rmtree(tmp_path / "p")
