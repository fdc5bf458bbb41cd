"""The library index of `--mode search`: incremental, resumable, recursive, unreadable files
recorded; float32 on the CPU; no recompilation across queries; stored and recomputed
rerank tokens agree.

A randomly initialised tiny model (`configs/demo.py:tiny`: width 32, 32 px, 2 frames)
stands in for a checkpoint: what is checked is which videos get embedded and that the
scores are the model's, against the model's own calls on frames read independently.
Videos are rendered on the fly (32 px, 8 frames).
"""

import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from input_pipeline import synthetic
from t2v2t_jax.checkpoints import restore
from t2v2t_jax.evaluation import library_index, search_videos
from t2v2t_jax.evaluation import search as search_lib
from t2v2t_jax.evaluation.retrieval import RetrievalEvaluator
from t2v2t_jax.models.t2v2t import create_model, similarity

QUERY = "a red circle moves left"


def _config(root):
  # The tokenizer is the synthetic data's vocabulary, read from data_root.
  with open(os.path.join(root, "vocab.txt"), "w") as f:
    f.write("\n".join(synthetic.vocabulary()) + "\n")
  config = demo.get_config("tiny")
  config.data_root = root
  config.eval.video_batch_size = 2
  config.eval.k = 3
  return config


def _write(path, seed):
  rng = np.random.default_rng(seed)
  spec = synthetic.random_spec(rng)
  synthetic.write_video(str(path), synthetic.render_video(spec, seed, size=32, num_frames=8))


@pytest.fixture
def random_model(monkeypatch):
  """load_params -> a random tiny model (one per config, the same for every Searcher);
  records the configs it was given."""
  seen, made = [], {}

  def load(config, workdir, mesh, purpose="Evaluating"):
    seen.append(config)
    key = config.model.to_json_best_effort()
    if key not in made:
      made[key] = nnx.split(create_model(config.model), nnx.Param)
    graphdef, params = made[key]
    return params, graphdef, 0

  monkeypatch.setattr(restore, "load_params", load)
  return seen


@pytest.fixture
def encoded(monkeypatch):
  """Video ids actually run through the video encoder while indexing (counted at the
  evaluator's batches, not from the index's own bookkeeping)."""
  counts = []
  real = RetrievalEvaluator._encoded_batches

  def counting(self, params, data, desc):
    for index, keep, emb, tok in real(self, params, data, desc):
      counts.append(int(keep.sum()))
      yield index, keep, emb, tok

  monkeypatch.setattr(RetrievalEvaluator, "_encoded_batches", counting)
  return counts


def _take(counts):
  n = sum(counts)
  counts.clear()
  return n


def _encode(graphdef, params, frames):
  """(per-frame embeddings, tokens) by the model's own calls (jitted: one compile, not
  one per operation)."""
  @jax.jit
  def run(params, frames):
    model = nnx.merge(graphdef, params)
    pooled, tokens = model.encode_video(frames)
    return model.video_embedding(pooled), tokens
  return run(params, frames)


def _reference_stage1(searcher, paths):
  """The model's own per-frame embeddings of frames read again, scored by `similarity`."""
  config = searcher.config
  frames = np.stack([search_videos.read_frames(p, config.eval.num_frames,
                                               config.model.vision.image_size) for p in paths])
  video_emb = np.asarray(_encode(searcher.graphdef, searcher.params, frames)[0])
  text_emb, _, _ = searcher.embed_query(QUERY)
  return similarity(video_emb, text_emb)[:, 0]


def test_incremental_add_change_touch_remove(tmp_path, random_model, encoded):
  lib = tmp_path / "lib"
  (lib / "a" / "b").mkdir(parents=True)
  _write(lib / "one.mp4", 1)
  _write(lib / "a" / "two.mp4", 2)
  _write(lib / "a" / "b" / "three.mp4", 3)
  config, workdir = _config(str(tmp_path)), str(tmp_path / "run")
  searcher = search_lib.Searcher(config, workdir, videos=str(lib), progress=False)
  assert _take(encoded) == 3 and searcher.index.stats["embedded"] == 3
  np.testing.assert_allclose(searcher.stage1(searcher.embed_query(QUERY)[0]),
                             _reference_stage1(searcher, searcher.index.paths), atol=1e-5)
  # Nothing changed: nothing embedded, nothing hashed.
  stats = searcher.refresh()
  assert _take(encoded) == 0 and stats["hashed"] == 0 and stats["reused"] == 3
  # One added: only it.
  _write(lib / "a" / "four.mkv", 4)
  stats = searcher.refresh()
  assert _take(encoded) == 1 and stats["listed"] == 4 and stats["embedded"] == 1
  # Touched (new mtime, same bytes): hashed again, not embedded.
  os.utime(lib / "one.mp4", ns=(1, 10**18))
  stats = searcher.refresh()
  assert _take(encoded) == 0 and stats["hashed"] == 1
  # Replaced by other contents: embedded again, and scored as the new contents.
  _write(lib / "a" / "two.mp4", 22)
  stats = searcher.refresh()
  assert _take(encoded) == 1 and stats["embedded"] == 1
  np.testing.assert_allclose(searcher.stage1(searcher.embed_query(QUERY)[0]),
                             _reference_stage1(searcher, searcher.index.paths), atol=1e-5)
  # Renamed (same contents): nothing embedded. Removed: nothing embedded, listed less.
  os.rename(lib / "a" / "b" / "three.mp4", lib / "three_renamed.mp4")
  os.remove(lib / "a" / "four.mkv")
  stats = searcher.refresh()
  assert _take(encoded) == 0 and stats["listed"] == 3 and stats["removed"] == 2
  results = searcher.search(QUERY, top=5)
  assert sorted(os.path.relpath(r.path, lib) for r in results) == [
      "a/two.mp4", "one.mp4", "three_renamed.mp4"]
  # A new Searcher (a new process) over the same workdir embeds nothing.
  again = search_lib.Searcher(config, workdir, videos=str(lib), progress=False)
  assert _take(encoded) == 0
  np.testing.assert_array_equal(again.index.video_mean, searcher.index.video_mean)


def test_interrupted_embedding_resumes(tmp_path, random_model, encoded, monkeypatch):
  lib = tmp_path / "lib"
  lib.mkdir()
  for i in range(5):
    _write(lib / f"v{i}.mp4", i)
  config = _config(str(tmp_path))
  workdir = str(tmp_path / "run")
  real_commit = library_index.LibraryIndex.commit_chunk
  commits = []

  def commit_then_stop(self, *args, **kwargs):
    chunk = real_commit(self, *args, **kwargs)
    commits.append(chunk)
    raise KeyboardInterrupt  # Ctrl-C right after the first chunk is committed

  monkeypatch.setattr(library_index.LibraryIndex, "commit_chunk", commit_then_stop)
  with pytest.raises(KeyboardInterrupt):
    search_lib.Searcher(config, workdir, videos=str(lib), progress=False, chunk_videos=2)
  assert len(commits) == 1 and _take(encoded) >= 2
  monkeypatch.setattr(library_index.LibraryIndex, "commit_chunk", real_commit)
  resumed = search_lib.Searcher(config, workdir, videos=str(lib), progress=False,
                                chunk_videos=2)
  assert _take(encoded) == 3 and resumed.index.stats["reused"] == 2  # the committed 2 kept
  # Same vectors as an index built in one go.
  fresh = search_lib.Searcher(config, str(tmp_path / "fresh"), videos=str(lib), progress=False)
  np.testing.assert_allclose(resumed.index.video_mean, fresh.index.video_mean, atol=1e-6)


def test_recursive_listing_extensions_and_unreadable_files(tmp_path, random_model, encoded,
                                                            capsys):
  lib = tmp_path / "lib"
  (lib / "deep" / "deeper").mkdir(parents=True)
  (lib / ".hidden").mkdir()
  _write(lib / "x.mp4", 1)
  # Containers by extension, case-insensitive; PyAV finds the format from the bytes.
  shutil.copy(lib / "x.mp4", lib / "deep" / "CLIP.MOV")
  shutil.copy(lib / "x.mp4", lib / "deep" / "deeper" / "clip.m4v")
  _write(lib / "deep" / "y.mkv", 2)
  shutil.copy(lib / "x.mp4", lib / ".hidden" / "skipped.mp4")
  shutil.copy(lib / "x.mp4", lib / "deep" / "._x.mp4")  # a macOS resource fork
  (lib / "notes.txt").write_text("not a video")
  (lib / "deep" / "broken.avi").write_bytes(b"not an avi")
  listed = search_videos.list_videos(_config(str(tmp_path)), str(lib)).paths
  assert [os.path.relpath(p, lib) for p in listed] == [
      "deep/CLIP.MOV", "deep/broken.avi", "deep/deeper/clip.m4v", "deep/y.mkv", "x.mp4"]
  config, workdir = _config(str(tmp_path)), str(tmp_path / "run")
  searcher = search_lib.Searcher(config, workdir, videos=str(lib), progress=False)
  # x.mp4, CLIP.MOV and clip.m4v are one content: embedded once; the broken file is read
  # (and fails) once.
  assert _take(encoded) == 3
  broken = str(lib / "deep" / "broken.avi")
  assert list(searcher.index.failures) == [broken]
  assert "1 of 5 videos could not be read" in capsys.readouterr().err
  results = searcher.search(QUERY, top=10)
  assert len(results) == 4 and broken not in [r.path for r in results]
  same = [r.stage1 for r in results if not r.path.endswith("y.mkv")]
  assert max(same) - min(same) < 1e-6  # the three copies score alike
  # Not retried while unchanged, still reported.
  again = search_lib.Searcher(config, workdir, videos=str(lib), progress=False)
  assert _take(encoded) == 0 and list(again.index.failures) == [broken]
  # Changed (now a real video): tried again, and searchable.
  _write(lib / "deep" / "broken.avi", 5)
  again.refresh()
  assert _take(encoded) == 1 and not again.index.failures
  assert len(again.search(QUERY, top=10)) == 5


def test_float32_on_the_cpu(tmp_path, random_model):
  assert jax.default_backend() == "cpu"
  lib = tmp_path / "lib"
  lib.mkdir()
  _write(lib / "v.mp4", 0)
  config = _config(str(tmp_path))
  config.model.dtype = "bfloat16"  # as the paper recipes
  searcher = search_lib.Searcher(config, str(tmp_path / "run"), videos=str(lib), progress=False)
  assert config.model.dtype == "bfloat16"  # the caller's config is left alone
  assert random_model[-1].model.dtype == "float32" and searcher.config.model.dtype == "float32"
  _, hidden, _ = searcher.embed_query(QUERY)
  assert hidden.dtype == np.float32
  assert nnx.merge(searcher.graphdef, searcher.params).dtype in ("float32", np.float32)


@pytest.mark.parametrize("tokens", ["recompute", "float16"])
def test_queries_do_not_recompile(tmp_path, random_model, tokens):
  lib = tmp_path / "lib"
  lib.mkdir()
  for i in range(5):
    _write(lib / f"v{i}.mp4", i)
  config = _config(str(tmp_path))
  searcher = search_lib.Searcher(config, str(tmp_path / "run"), videos=str(lib),
                                 progress=False, tokens=tokens)
  searcher.search("a blue square appears", top=3)  # compiles what a query needs
  from jax._src import monitoring  # noqa: PLC0415 (to remove the listener again)
  events = []

  def listener(event, duration, **_):
    if event.startswith("/jax/core/compile/"):
      events.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for query in ("a red circle moves left, then it turns green", "the square", QUERY):
      results = searcher.search(query, top=5)
      assert len(results) == 5 and sum(r.rerank is not None for r in results) == 3
    assert events == []
    # The listener is not blind: a program of a new shape does compile.
    jax.jit(lambda x: x * 3)(np.ones(7))
    assert events
  finally:
    monitoring.unregister_event_duration_listener(listener)


def test_stored_and_recomputed_tokens_rerank_alike(tmp_path, random_model):
  lib = tmp_path / "lib"
  lib.mkdir()
  for i in range(5):
    _write(lib / f"v{i}.mp4", i)
  config = _config(str(tmp_path))
  config.eval.k = 5
  workdir = str(tmp_path / "run")
  stored = search_lib.Searcher(config, workdir, videos=str(lib), progress=False,
                               tokens="float16")
  again = search_lib.Searcher(config, workdir, videos=str(lib), progress=False)
  assert stored.index.cache_dir != again.index.cache_dir  # one index per token storage
  for query in (QUERY, "a blue square appears"):
    a = stored.search(query, top=5)
    b = again.search(query, top=5)
    assert [r.path for r in a] == [r.path for r in b]
    np.testing.assert_allclose([r.rerank for r in a], [r.rerank for r in b], atol=1e-5)
  # The index's tokens are the encoder's (float16) output for frames read independently.
  frames = np.stack([search_videos.read_frames(p, config.eval.num_frames,
                                               config.model.vision.image_size)
                     for p in stored.index.paths])
  _, tokens = _encode(stored.graphdef, stored.params, frames)
  np.testing.assert_allclose(stored.video_tokens(np.arange(5)).astype(np.float32),
                             np.asarray(tokens, np.float16).astype(np.float32), atol=2e-3)
  np.testing.assert_allclose(again.video_tokens(np.arange(5)).astype(np.float32),
                             np.asarray(tokens, np.float16).astype(np.float32), atol=2e-3)


def test_content_hash_sees_size_and_sampled_blocks(tmp_path):
  block = library_index.HASH_BLOCK
  big = bytearray(np.random.default_rng(0).integers(0, 256, 5 * block, dtype=np.uint8).tobytes())
  path = tmp_path / "big.bin"
  path.write_bytes(bytes(big))
  base = library_index.content_hash(str(path))
  assert base == library_index.content_hash(str(path))
  for offset in (10, (5 * block - block) // 2 + 5, 5 * block - 3):  # first, middle, last MiB
    changed = bytearray(big)
    changed[offset] ^= 0xFF
    path.write_bytes(bytes(changed))
    assert library_index.content_hash(str(path)) != base, offset
  path.write_bytes(bytes(big) + b"x")
  assert library_index.content_hash(str(path)) != base
  # Bytes outside the sampled blocks are not read (the documented trade-off).
  changed = bytearray(big)
  changed[block + 10] ^= 0xFF
  path.write_bytes(bytes(changed))
  assert library_index.content_hash(str(path)) == base
  # Small files: every byte.
  small = tmp_path / "small.bin"
  small.write_bytes(b"a" * 1000)
  h = library_index.content_hash(str(small))
  small.write_bytes(b"a" * 500 + b"b" + b"a" * 499)
  assert library_index.content_hash(str(small)) != h
