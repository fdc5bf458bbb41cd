"""VindLU annotation files: video indices, pairs, paragraphs, eval maps, validation errors."""

import json
import os

import numpy as np
import pytest

from input_pipeline import annotation_index, annotations
from input_pipeline.annotations import AnnotationError, load_corpus, load_corpus_from_config
from input_pipeline.config import corpus_config, data_config


def write(tmp_path, entries, name="anno.json"):
  path = tmp_path / name
  path.write_text(json.dumps(entries))
  return str(path)


def test_video_index_and_training_pairs(tmp_path):
  anno = write(tmp_path, [
      {"video": "b.mp4", "caption": "b one"},
      {"video": "a.mp4", "caption": "a one"},
      {"video": "b.mp4", "caption": "b two"},
      {"video": "c.mp4", "caption": ["c one", "c two"]},
  ])
  corpus = load_corpus(anno, str(tmp_path))
  assert corpus.media == ["b.mp4", "a.mp4", "c.mp4"]  # order of first appearance
  assert corpus.pair_caption == ["b one", "a one", "b two", "c one", "c two"]
  np.testing.assert_array_equal(corpus.pair_video, [0, 1, 0, 2, 2])
  assert corpus.pair_video.dtype == np.int32
  assert corpus.pair_path(3) == str(tmp_path / "c.mp4")
  assert corpus.kind == "video" and corpus.name == "anno"


def test_eval_maps(tmp_path):
  anno = write(tmp_path, [
      {"video": "v0.mp4", "caption": ["x", "y"]},
      {"video": "v1.mp4", "caption": "z"},
      {"video": "v2.mp4", "caption": ["u", "v", "w"]},
  ])
  corpus = load_corpus(anno, str(tmp_path))
  assert corpus.num_videos == 3
  assert corpus.texts == ["x", "y", "z", "u", "v", "w"]
  np.testing.assert_array_equal(corpus.txt2vid, [0, 0, 1, 2, 2, 2])
  assert corpus.vid2txt == [[0, 1], [2], [3, 4, 5]]


def test_paragraph_mode_joins_captions(tmp_path):
  anno = write(tmp_path, [
      {"video": "v0.mp4", "caption": ["A man walks.", " He sits down. "]},
      {"video": "v1.mp4", "caption": "Only one."},
  ])
  corpus = load_corpus(anno, str(tmp_path), paragraph=True)
  assert corpus.texts == ["A man walks. He sits down.", "Only one."]
  assert corpus.vid2txt == [[0], [1]]


def test_image_corpus(tmp_path):
  anno = write(tmp_path, [{"image": "i0.jpg", "caption": "one"},
                          {"image": "i1.jpg", "caption": "two"}])
  corpus = load_corpus_from_config(corpus_config("cc", anno, str(tmp_path), kind="image"))
  assert corpus.kind == "image" and corpus.name == "cc"
  assert corpus.media == ["i0.jpg", "i1.jpg"]


@pytest.mark.parametrize("entries, index, words", [
    ([{"video": "a.mp4", "caption": "x"}, {"caption": "y"}], 1, "missing key 'video'"),
    ([{"video": "a.mp4"}], 0, "missing key 'caption'"),
    ([{"video": "a.mp4", "caption": "x"}, {"video": "b.mp4", "caption": 3}], 1, "'caption'"),
    ([{"video": "a.mp4", "caption": ["x", None]}], 0, "'caption'"),
    ([{"video": "a.mp4", "caption": []}], 0, "'caption'"),
    ([{"video": 7, "caption": "x"}], 0, "'video' must be"),
    ([{"video": "a.mp4", "caption": "x"}, "just a string"], 1, "JSON object"),
    ([{"video": "a.mp4", "caption": "x"}, {"image": "b.jpg", "caption": "y"}], 1,
     "image corpus"),
])
def test_malformed_entry_names_file_and_index(tmp_path, entries, index, words):
  anno = write(tmp_path, entries)
  with pytest.raises(AnnotationError) as err:
    load_corpus(anno, str(tmp_path))
  assert anno in str(err.value) and f"entry {index}" in str(err.value)
  assert words in str(err.value)


def test_missing_media_root(tmp_path):
  anno = write(tmp_path, [{"video": "a.mp4", "caption": "x"}])
  with pytest.raises(AnnotationError, match="media root") as err:
    load_corpus(anno, str(tmp_path / "nowhere"))
  assert anno in str(err.value) and "entry 0" in str(err.value)


def test_bad_files(tmp_path):
  with pytest.raises(AnnotationError, match="not found"):
    load_corpus(str(tmp_path / "none.json"), str(tmp_path))
  bad = tmp_path / "bad.json"
  bad.write_text("[{")
  with pytest.raises(AnnotationError, match="not valid JSON"):
    load_corpus(str(bad), str(tmp_path))
  with pytest.raises(AnnotationError, match="JSON list"):
    load_corpus(write(tmp_path, {"video": "a"}), str(tmp_path))


def test_data_config_defaults():
  c = data_config()
  assert c.max_len == 32 and not c.add_sep and c.tokenizer == "bert-base-uncased"
  assert c.failure_fraction == 0.01 and c.num_epochs is None
  c.train_corpora = [corpus_config("didemo", "a.json", "v", paragraph=True, max_seconds=30.0,
                                   max_len=64)]
  assert c.train_corpora[0].max_seconds == 30.0 and c.train_corpora[0].max_len == 64
  with pytest.raises(ValueError, match="kind"):
    corpus_config("x", "a.json", "v", kind="audio")


def test_unchanged_file_is_read_once_per_process(tmp_path, monkeypatch):
  monkeypatch.setenv(annotation_index.CACHE_ENV, str(tmp_path / "cache"))
  anno = write(tmp_path, [{"video": "a.mp4", "caption": "one"}, {"video": "b.mp4", "caption": "two"}])
  first = load_corpus(anno, str(tmp_path))
  assert load_corpus(anno, str(tmp_path)) is first
  assert first.pair_video.flags.writeable is False  # shared, so read-only
  built = first.index.info["build_id"]
  # Other arguments index the file differently: an index of their own.
  para = load_corpus(anno, str(tmp_path), paragraph=True)
  assert para is not first and para.index.directory != first.index.directory
  # Another process (here: this one with its memory cache emptied) opens the same index.
  annotations._cache.clear()  # pylint: disable=protected-access
  assert load_corpus(anno, str(tmp_path)).index.info["build_id"] == built
  # A changed file (new size and time) is read again and indexed afresh.
  write(tmp_path, [{"video": "c.mp4", "caption": "three"}])
  os.utime(anno, ns=(10 ** 18, 10 ** 18))
  again = load_corpus(anno, str(tmp_path))
  assert again.media == ["c.mp4"] and again.index.info["build_id"] != built
  # Errors are never cached: a file made bad fails on every load.
  (tmp_path / "anno.json").write_text("[{")
  for _ in range(2):
    with pytest.raises(AnnotationError, match="not valid JSON"):
      load_corpus(anno, str(tmp_path))
