"""The on-disk annotation index: the same corpus as a plain reading of the file,
streamed JSON with json's own error positions, VindLU's SQLite files, pickling as a path,
and the on-disk cache (built once, rebuilt when the file changes or the folder is damaged,
safe when builders race)."""

import json
import os
import pickle
import random
import sqlite3
import threading

import numpy as np
import pytest

from input_pipeline import annotation_index, pipeline
from input_pipeline.annotation_index import AnnotationError
from input_pipeline.annotations import load_corpus
from input_pipeline.config import corpus_config, data_config
from input_pipeline.synthetic import generate_dataset
from pipeline_helpers import take_batches


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
  """Each test its own index cache, so that what it builds and finds is its own."""
  folder = tmp_path / "index_cache"
  monkeypatch.setenv(annotation_index.CACHE_ENV, str(folder))
  return folder


def reference(entries, kind="video", paragraph=False):
  """What a corpus must hold, computed the plain way: (media, pair videos, texts, vid2txt)."""
  media, video_of, pair_video, texts = [], {}, [], []
  for entry in entries:
    path = entry[kind]
    if path not in video_of:
      video_of[path] = len(media)
      media.append(path)
    captions = [entry["caption"]] if isinstance(entry["caption"], str) else entry["caption"]
    for text in ([" ".join(c.strip() for c in captions)] if paragraph else captions):
      pair_video.append(video_of[path])
      texts.append(text)
  vid2txt = [[t for t, v in enumerate(pair_video) if v == video] for video in range(len(media))]
  return media, pair_video, texts, vid2txt


def random_entries(rng, n, kind="video"):
  """Entries with repeated videos, caption lists, odd characters and spacing."""
  words = ["a", "dog", "Ünïcödé", "日本語", "tab\there", 'quote"d', "back\\slash", " padded ",
           "emoji 🎬", "", "\u2028"]
  entries = []
  for _ in range(n):
    path = f"dir {rng.randrange(n // 3 + 1)}/clip_{rng.randrange(4)}.mp4"
    if rng.random() < 0.3:
      caption = [" ".join(rng.choices(words, k=rng.randrange(1, 5)))
                 for _ in range(rng.randrange(1, 4))]
    else:
      caption = " ".join(rng.choices(words, k=rng.randrange(0, 6)))
    entries.append({kind: path, "caption": caption})
  return entries


def write_json(path, entries, **dump_args):
  path.write_text(json.dumps(entries, **dump_args), encoding="utf-8")
  return str(path)


def assert_corpus(corpus, entries, kind="video", paragraph=False):
  media, pair_video, texts, vid2txt = reference(entries, kind, paragraph)
  assert list(corpus.media) == media and corpus.media == media
  assert corpus.num_videos == len(media) and corpus.num_pairs == len(texts)
  np.testing.assert_array_equal(corpus.pair_video, pair_video)
  assert corpus.pair_video.dtype == np.int32
  assert list(corpus.pair_caption) == texts and corpus.texts == texts
  assert [corpus.pair_caption[i] for i in range(len(texts))] == texts  # random access
  assert [list(v) for v in corpus.vid2txt] == vid2txt
  assert corpus.media[-1] == media[-1] and corpus.media[1:3] == media[1:3]


@pytest.mark.parametrize("chunk", [3, 64, 1 << 22])
@pytest.mark.parametrize("dump_args", [{}, {"indent": 2}, {"ensure_ascii": False}])
def test_same_corpus_as_a_plain_reading(tmp_path, monkeypatch, chunk, dump_args):
  """Whatever the window's size (3 bytes cuts every token, multi-byte characters too) and
  the file's layout (compact, indented, raw UTF-8)."""
  monkeypatch.setattr(annotation_index, "_CHUNK", chunk)
  rng = random.Random(chunk + len(dump_args))
  entries = random_entries(rng, 60)
  anno = write_json(tmp_path / "anno.json", entries, **dump_args)
  assert_corpus(load_corpus(anno, str(tmp_path)), entries)
  assert_corpus(load_corpus(anno, str(tmp_path), paragraph=True), entries, paragraph=True)


def test_image_corpus_numbers_and_whitespace(tmp_path):
  entries = random_entries(random.Random(1), 20, kind="image")
  anno = tmp_path / "images.json"
  anno.write_text("\ufeff \n[\n" + " ,\n".join(json.dumps(e) for e in entries) + "\n]\n\t")
  assert_corpus(load_corpus(str(anno), str(tmp_path), kind="image"), entries, kind="image")


@pytest.mark.parametrize("text", [
    '[{"video": "a", "caption": "x"} {"video": "b", "caption": "y"}]',
    '[{"video": "a", "caption": "x"},\n {"video": "b", "caption": "y"}\n]\n  x',
    '[{"video": "a", "caption": "x"},\n {"video": "b", "caption": "y',
    '[{"video": "a", "caption": "x"},\n\n {"video": "b" "caption": "y"}]',
    '[{"video": "a", "caption": "x"}',
    '[{"video": "a", "caption": "x"}, ',
    '[',
    '',
    '{"video": "a", "caption": ',
    '[{"video": "a", "caption": "bad \\q escape"}]',
])
@pytest.mark.parametrize("chunk", [4, 1 << 22])
def test_invalid_json_gives_jsons_message_and_position(tmp_path, monkeypatch, text, chunk):
  monkeypatch.setattr(annotation_index, "_CHUNK", chunk)
  anno = tmp_path / "bad.json"
  anno.write_text(text)
  with pytest.raises(json.JSONDecodeError) as expected:
    json.loads(text)
  with pytest.raises(AnnotationError) as err:
    load_corpus(str(anno), str(tmp_path))
  assert str(err.value) == f"{anno}: not valid JSON ({expected.value})"
  assert not os.listdir(annotation_index.cache_root()) or all(
      n.endswith(".lock") for n in os.listdir(annotation_index.cache_root()))  # nothing kept


def test_not_utf8_and_sqlite_named_json(tmp_path):
  anno = tmp_path / "latin1.json"
  anno.write_bytes('[{"video": "a", "caption": "caf\u00e9"}]'.encode("latin-1"))
  with pytest.raises(AnnotationError, match=r"latin1\.json: not valid UTF-8"):
    load_corpus(str(anno), str(tmp_path))
  db = write_sqlite(tmp_path / "x.sqlite.db", [("a.mp4", "x")])
  renamed = tmp_path / "annos.json"
  os.rename(db, renamed)
  with pytest.raises(AnnotationError, match=r"annos\.json: not valid (JSON|UTF-8) .*SQLite database"):
    load_corpus(str(renamed), str(tmp_path))


def test_pickles_as_a_path_and_reopens(tmp_path):
  entries = [{"video": f"v{i}.mp4", "caption": f"caption number {i} " * 8} for i in range(20000)]
  corpus = load_corpus(write_json(tmp_path / "big.json", entries), str(tmp_path))
  data = pickle.dumps(corpus)
  assert len(data) < 4096  # the file paths, not 20,000 captions (~1.4 MB)
  copy = pickle.loads(data)
  assert copy.index._files is None  # pylint: disable=protected-access  (opened on use)
  assert copy.pair_caption[12345] == entries[12345]["caption"]
  assert copy.media_path(7) == os.path.join(str(tmp_path), "v7.mp4")
  assert copy.video_of_pair(19999) == 19999 and copy.pair_path(3) == copy.media_path(3)
  # What a worker looks up maps none of the index's files (a mapped page would count in
  # every worker's resident memory); only the whole-array view does.
  if os.path.exists("/proc/self/maps"):
    def mapped():
      with open("/proc/self/maps") as f:
        return {line.split()[-1] for line in f if copy.index.directory in line}
    assert not mapped()
    np.testing.assert_array_equal(copy.pair_video, np.arange(20000))
    assert mapped() == {os.path.join(copy.index.directory, "pair_video.npy")}


# ---------------------------------------------------------------------------------------
# VindLU's SQLite files


def write_sqlite(path, rows, column="video", ids=None):
  """A file in the layout of VindLU's preprocess/create_sqlite_db.py."""
  con = sqlite3.connect(str(path))
  con.execute(f"CREATE TABLE IF NOT EXISTS `annos` (`id` integer PRIMARY KEY, `{column}` text, "
              "`caption` text)")
  ids = list(range(len(rows))) if ids is None else ids
  con.executemany(f"INSERT INTO annos (id, {column}, caption) VALUES (?,?,?)",
                  [(i, m, c) for i, (m, c) in zip(ids, rows)])
  con.commit()
  con.close()
  return str(path)


def test_sqlite_file_reads_as_its_json(tmp_path):
  rows = [("b.mp4", "b one"), ("a.mp4", "a one "), ("b.mp4", "b two"), ("c.mp4", "c")]
  # Inserted out of order: entries follow `id`, as VindLU reads row id = i for sample i.
  order = [2, 0, 3, 1]
  db = write_sqlite(tmp_path / "webvid_train.sqlite.db", [rows[i] for i in order], ids=order)
  corpus = load_corpus(db, str(tmp_path))
  assert corpus.name == "webvid_train"
  assert_corpus(corpus, [{"video": m, "caption": c} for m, c in rows])
  images = write_sqlite(tmp_path / "cc3m_train.db", [("i.jpg", "x"), ("j.jpg", "y")], column="image")
  assert load_corpus(images, str(tmp_path), kind="image").media == ["i.jpg", "j.jpg"]


@pytest.mark.parametrize("make, words", [
    (lambda p: write_sqlite(p, [("a.mp4", "x"), ("b.mp4", None)]), r"entry 1 \(id 1\): 'caption'"),
    (lambda p: write_sqlite(p, [("a.mp4", "x"), ("", "y")], ids=[5, 9]), r"entry 1 \(id 9\): 'video'"),
    (lambda p: write_sqlite(p, [("a.jpg", "x")], column="image"), "is this an image corpus"),
    (lambda p: write_sqlite(p, []), "holds no entries"),
    (lambda p: sqlite3.connect(str(p)).execute("CREATE TABLE other (x text)").connection.commit(),
     r"no table 'annos'.*\['other'\]"),
    (lambda p: p.write_text('[{"video": "a.mp4", "caption": "x"}]'), "not a SQLite database"),
])
def test_bad_sqlite_file_names_file_and_entry(tmp_path, make, words):
  db = tmp_path / "anno.sqlite.db"
  make(db)
  with pytest.raises(AnnotationError, match=words) as err:
    load_corpus(str(db), str(tmp_path))
  assert str(err.value).startswith(f"{db}: ")


def test_training_from_a_sqlite_file_gives_the_json_batches(tmp_path):
  paths = generate_dataset(tmp_path / "data", num_train=8, num_val=0, num_test=0, size=32,
                           num_frames=8)
  entries = json.loads(open(paths["train"]).read())
  db = write_sqlite(tmp_path / "train.sqlite.db", [(e["video"], e["caption"]) for e in entries])

  def batches(anno_file, num_workers):
    cfg = data_config()
    cfg.tokenizer = paths["vocab"]
    cfg.num_workers = num_workers
    cfg.worker_threads = cfg.prefetch = 1
    cfg.train_corpora = [corpus_config("train", anno_file, paths["root"])]
    return take_batches(pipeline.make_train_dataset(
        cfg, tokenizer=None, global_batch_size=4, num_frames=2, image_size=16, seed=0,
        process_index=0, process_count=1), 3)

  from_json, from_sqlite = batches(paths["train"], 0), batches(db, 1)  # 1 worker: pickled
  for a, b in zip(from_json, from_sqlite):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


# ---------------------------------------------------------------------------------------
# The cache


def index_folders():
  root = annotation_index.cache_root()
  return sorted(n for n in os.listdir(root) if not n.endswith(".lock")) if os.path.isdir(root) else []


def test_built_once_rebuilt_when_changed_or_damaged(tmp_path):
  anno = write_json(tmp_path / "a.json", [{"video": "a.mp4", "caption": "one"}])
  first = annotation_index.open_index(anno)
  again = annotation_index.open_index(anno)
  assert again.directory == first.directory and again.info["build_id"] == first.info["build_id"]
  assert index_folders() == [os.path.basename(first.directory)]

  # Same size, same modification time, other bytes: the sampled hash tells them apart.
  st = os.stat(anno)
  write_json(tmp_path / "a.json", [{"video": "b.mp4", "caption": "one"}])
  os.utime(anno, ns=(st.st_atime_ns, st.st_mtime_ns))
  changed = annotation_index.open_index(anno)
  assert changed.directory != first.directory and changed.media == ["b.mp4"]
  assert index_folders() == [os.path.basename(changed.directory)]  # the old one is removed

  # A damaged folder (a file cut short) is built again.
  with open(os.path.join(changed.directory, "captions.bin"), "r+b") as f:
    f.truncate(1)
  repaired = annotation_index.open_index(anno)
  assert repaired.info["build_id"] != changed.info["build_id"] and repaired.captions == ["one"]
  # Other options of the same file are indexes of their own, kept side by side.
  annotation_index.open_index(anno, paragraph=True)
  assert len(index_folders()) == 2


def test_racing_builders_share_one_build(tmp_path):
  anno = write_json(tmp_path / "a.json", random_entries(random.Random(3), 3000))
  results, errors = [], []

  def build():
    try:
      results.append(annotation_index.open_index(anno))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=build) for _ in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and len(results) == 4
  assert len({r.info["build_id"] for r in results}) == 1
  assert len(index_folders()) == 1  # no temporary folder left behind


def test_index_of_a_deleted_file_is_pruned(tmp_path):
  gone = write_json(tmp_path / "gone.json", [{"video": "a.mp4", "caption": "x"}])
  annotation_index.open_index(gone)
  os.remove(gone)
  kept = annotation_index.open_index(write_json(tmp_path / "kept.json",
                                                [{"video": "a.mp4", "caption": "x"}]))
  assert index_folders() == [os.path.basename(kept.directory)]


# ---------------------------------------------------------------------------------------
# Refusals of crafted files (issue #25): each names the file and the entry.


@pytest.mark.parametrize("text, entry", [
    ("[" + "[" * 50_000 + "]" * 50_000 + "]", 0),  # 100 KB of brackets
    ('[{"video": "a", "caption": "x"}, {"video": "b", "caption": ' + "[" * 50_000
     + "]" * 50_000 + "}]", 1),
    ('{"a": ' * 50_000 + "1" + "}" * 50_000, 0),  # not even a list
])
@pytest.mark.parametrize("chunk", [4096, 1 << 22])  # cut mid-entry, or read whole
def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path, monkeypatch, text, entry,
                                                             chunk):
  monkeypatch.setattr(annotation_index, "_CHUNK", chunk)
  anno = tmp_path / "deep.json"
  anno.write_text(text)
  with pytest.raises(AnnotationError, match=rf"^{anno}: entry {entry}: nested too deeply"):
    load_corpus(str(anno), str(tmp_path))


def test_not_utf8_names_the_file_and_the_byte(tmp_path):
  anno = tmp_path / "bytes.json"
  anno.write_bytes(b'[{"video": "a", "caption": "ok"},\n {"video": "b", "caption": "\xff"}]')
  with pytest.raises(AnnotationError, match=rf"^{anno}: not valid UTF-8 \(near byte 62: "):
    load_corpus(str(anno), str(tmp_path))
  db = write_sqlite(tmp_path / "bytes.sqlite.db", [("a.mp4", "x"), ("b.mp4", "y")])
  with sqlite3.connect(db) as con:  # a TEXT value that is not UTF-8, as a C program may write
    con.execute("UPDATE annos SET caption = CAST(? AS TEXT) WHERE id = 1", (b"caf\xe9",))
  with pytest.raises(AnnotationError, match=rf"^{db}: entry 1: SQLite read failed .*UTF-8"):
    load_corpus(db, str(tmp_path))


@pytest.mark.parametrize("path, words", [
    ("/etc/passwd", "is an absolute path"),
    ("../secret.mp4", "leads outside the media root"),
    ("videos/../../secret.mp4", r"leads outside the media root \(it resolves to '../secret.mp4'\)"),
    ("videos/..", "names the media root itself"),
    ("a\x00b.mp4", "NUL character"),
])
def test_media_paths_must_stay_inside_the_media_root(tmp_path, path, words):
  anno = write_json(tmp_path / "escape.json", [{"video": "ok.mp4", "caption": "x"},
                                               {"video": path, "caption": "y"}])
  with pytest.raises(AnnotationError, match=rf"^{anno}: entry 1: 'video' .*{words}"):
    load_corpus(anno, str(tmp_path))
  db = write_sqlite(tmp_path / "escape.sqlite.db", [("ok.mp4", "x"), (path, "y")], ids=[3, 7])
  with pytest.raises(AnnotationError, match=rf"^{db}: entry 1 \(id 7\): 'video' .*{words}"):
    load_corpus(db, str(tmp_path))


def test_spellings_of_one_path_are_one_video_and_counted(tmp_path):
  entries = [{"video": "videos/x.mp4", "caption": "a"}, {"video": "videos/./x.mp4", "caption": "b"},
             {"video": "./y.mp4", "caption": "c"}, {"video": "./y.mp4", "caption": "d"},
             {"video": "videos//x.mp4", "caption": "e"}, {"video": "z/../z.mp4", "caption": "f"}]
  corpus = load_corpus(write_json(tmp_path / "alias.json", entries), str(tmp_path))
  assert list(corpus.media) == ["videos/x.mp4", "y.mp4", "z.mp4"]
  np.testing.assert_array_equal(corpus.pair_video, [0, 0, 1, 1, 0, 2])
  assert [list(v) for v in corpus.vid2txt] == [[0, 1, 4], [2, 3], [5]]
  info = corpus.index.info
  # x is named three ways; y only ever as './y.mp4' and z only one way: not aliases.
  assert info["aliased_videos"] == 1 and info["respelt_entries"] == 5
  assert info["alias_examples"] == [
      "entry 1: 'videos/./x.mp4' is 'videos/x.mp4', the video first named by entry 0",
      "entry 4: 'videos//x.mp4' is 'videos/x.mp4', the video first named by entry 0"]
  plain = load_corpus(write_json(tmp_path / "plain.json", entries[:1] * 3), str(tmp_path))
  assert plain.index.info["aliased_videos"] == 0 and plain.index.info["alias_examples"] == []


def test_annotation_error_is_a_refusal():
  from t2v2t_jax.errors import Refusal  # noqa: PLC0415
  assert issubclass(AnnotationError, Refusal) and issubclass(AnnotationError, ValueError)
