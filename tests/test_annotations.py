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


def test_one_video_named_two_ways_is_warned_about_once(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(annotation_index.CACHE_ENV, str(tmp_path / "cache"))
  anno = write(tmp_path, [{"video": "videos/x.mp4", "caption": "one"},
                          {"video": "videos/./x.mp4", "caption": "two"}])
  corpus = load_corpus(anno, str(tmp_path))
  assert corpus.num_videos == 1 and list(corpus.media) == ["videos/x.mp4"]
  err = capsys.readouterr().err
  assert err.startswith(f"WARNING: {anno}: 1 video is named by more than one spelling")
  assert "entry 1: 'videos/./x.mp4' is 'videos/x.mp4'" in err and len(err.splitlines()) == 1
  assert load_corpus(anno, str(tmp_path)) is corpus and capsys.readouterr().err == ""
  load_corpus(write(tmp_path, [{"video": "x.mp4", "caption": "a"}] * 2, "plain.json"),
              str(tmp_path))
  assert capsys.readouterr().err == ""  # one spelling, repeated: nothing to say


def test_shared_videos_by_file_not_by_spelling(tmp_path):
  videos = tmp_path / "videos"
  (videos / "msrvtt").mkdir(parents=True)
  (tmp_path / "other").mkdir()
  train = load_corpus(write(tmp_path, [{"video": f"msrvtt/v{i}.mp4", "caption": "c"}
                                       for i in range(6)], "train.json"), str(videos))
  same_root = load_corpus(write(tmp_path, [{"video": "msrvtt/v4.mp4", "caption": "c"},
                                           {"video": "msrvtt/./v1.mp4", "caption": "c"},
                                           {"video": "msrvtt/v9.mp4", "caption": "c"}],
                                "test.json"), str(videos))
  assert annotations.shared_videos(train, same_root) == (2, ["msrvtt/v1.mp4", "msrvtt/v4.mp4"])
  # The eval corpus's root is a folder inside the training corpus's: the same files.
  nested = load_corpus(write(tmp_path, [{"video": "v2.mp4", "caption": "c"},
                                        {"video": "v7.mp4", "caption": "c"}], "nested.json"),
                       str(videos / "msrvtt"))
  assert annotations.shared_videos(train, nested) == (1, ["v2.mp4"])
  assert annotations.shared_videos(nested, train) == (1, ["msrvtt/v2.mp4"])
  elsewhere = load_corpus(write(tmp_path, [{"video": "msrvtt/v4.mp4", "caption": "c"}],
                                "elsewhere.json"), str(tmp_path / "other"))
  assert annotations.shared_videos(train, elsewhere) == (0, [])


def test_train_eval_overlap_is_warned_with_counts(tmp_path, capsys):
  from t2v2t_jax.training import config_checks  # noqa: PLC0415
  train = load_corpus_from_config(corpus_config(
      "train9k", write(tmp_path, [{"video": f"v{i}.mp4", "caption": "c"} for i in range(5)],
                       "train.json"), str(tmp_path)))
  test = load_corpus_from_config(corpus_config(
      "test1k", write(tmp_path, [{"video": f"v{i}.mp4", "caption": "c"} for i in range(3, 9)],
                      "test.json"), str(tmp_path)))
  capsys.readouterr()
  lines = config_checks.warn_train_eval_overlap([train], [test])
  assert lines == [f"WARNING: eval corpus 'test1k' ({test.anno_file}) shares 2 of its 6 videos "
                   f"with train corpus 'train9k' ({train.anno_file}), e.g. 'v3.mp4', 'v4.mp4': "
                   "its retrieval numbers are not held-out numbers"]
  assert capsys.readouterr().err == lines[0] + "\n"
  assert config_checks.warn_train_eval_overlap([test], []) == []
