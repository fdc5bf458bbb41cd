"""The prepared-frame path: `input_pipeline.prepare` writes JPEG frame shards that the
pipelines read instead of the videos.

- Read through the real pipelines, prepared frames equal the raw decode (same indices,
  crops and flips) within the JPEG tolerance of docs/data.md, in training and in
  evaluation; reduced frame rate and size keep the frames the prepare step says.
- A video that fails at prepare time is listed and reads as a failed decode.
- An interrupted prepare (a worker killed, or an error in-process) resumes without losing
  or duplicating a record: the shards end up byte-identical to an uninterrupted run's.
- On several hosts (`main.py --mode prepare` with `--config.multihost.*`, two processes
  on localhost) each host decodes only its own shards, and the result is byte-identical to
  one process's; a host killed mid-shard, or one that stops with an error (the others
  stop too), resumes when the same command runs again, to the same bytes.
- Selecting 'prepared' without (a finished, matching) prepare fails at once, naming the path.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import grain
import numpy as np
import pytest
from process_helpers import free_port

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


# ------------------------------------------------------------------ prepare on every host
#
# The same `--mode prepare` command on P hosts: host p writes the shards with index mod P
# = p, host 0 writes the metadata once every shard is done, and a rerun resumes. Checked
# in-process (two hosts as two threads, for the failure path) and with real processes
# joined by `jax.distributed` on localhost, as tests/test_multihost.py starts them.


def _tree_hashes(directory):
  """{path relative to `directory`: sha256} of every file below it."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _wait_until(condition, timeout_s, what):
  deadline = time.monotonic() + timeout_s
  while not condition():
    assert time.monotonic() < deadline, f"gave up waiting for {what}"
    time.sleep(0.05)


def test_a_failed_host_stops_the_others_and_a_rerun_resumes(data, tmp_path):
  # 6 train videos, 6 shards of 1: host 0 writes 0, 2, 4; host 1 writes 1, 3, 5 and stops
  # at video 3 (its second shard) with an error. Host 0 finishes its own shards, then sees
  # host 1's failure marker and stops instead of waiting for shards that will not come.
  corpus = load_corpus(data["train"], data["root"], name="train")
  one = _prepare(data, "train", tmp_path / "one", shard_size=1)
  out = str(tmp_path / "two")
  directory = prepared_source.corpus_dir(out, "train")

  def host(p, **kw):
    return prepare.prepare_corpus(corpus, out, _settings(), shard_size=1, workers=1,
                                  progress=False, process_index=p, process_count=2, **kw)

  def start_host_0():
    result = {}

    def run():
      try:
        result["summary"] = host(0)
      except BaseException as e:  # pylint: disable=broad-except
        result["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    # Host 1 starts once host 0 runs: a failure marker older than a host's start is a
    # past run's and ignored.
    _wait_until(lambda: os.path.isdir(os.path.join(directory, prepare.TMP_DIR, "process_0")),
                60, "host 0 to start")
    return thread, result

  thread, result = start_host_0()
  with pytest.raises(prepare.PrepareInterrupted, match="test hook"):
    host(1, _fail_at_video=3)
  thread.join(60)
  assert not thread.is_alive(), "host 0 still waits for the failed host's shards"
  assert isinstance(result.get("error"), prepare.PrepareInterrupted), result
  assert "process_1: PrepareInterrupted: test hook" in str(result["error"])
  done = sorted(f for f in os.listdir(os.path.join(directory, "prepare_shards"))
                if f.endswith(".json"))
  assert done == ["00000.json", "00001.json", "00002.json", "00004.json"]
  assert not os.path.exists(os.path.join(directory, prepared_source.INFO_FILE))
  # A finished shard damaged since (its info file says complete) is written anew.
  damaged = prepared_source.shard_path(directory, "train", 2, 6)
  with open(damaged, "r+b") as f:
    f.truncate(os.path.getsize(damaged) // 2)

  thread, result = start_host_0()
  second = host(1)
  thread.join(60)
  assert "summary" in result, result
  first = result["summary"]
  assert (first["shards_written"], first["shards_skipped"]) == (1, 2)   # shard 2 again
  assert (second["shards_written"], second["shards_skipped"]) == (2, 1)  # shards 3, 5
  assert first["shard_lengths"] == second["shard_lengths"] == one["shard_lengths"]
  # The very bytes of one host, and no temporary folder left.
  assert _tree_hashes(directory) == _tree_hashes(
      prepared_source.corpus_dir(str(tmp_path / "one"), "train"))
  assert prepare.host_shards(6, 1, 2) == [1, 3, 5] and prepare.host_shards(1, 1, 2) == []


# One host of a multi-host prepare: main.py, with every video it decodes appended to
# $DECODE_LOG and, when $KILL_AT names a video, SIGKILLed as it comes to that video (a
# host lost mid-shard). Patching prepare_media reaches the decoding only with
# data.prepare_workers=1 (shards written in this process).
HOST = r"""
import os, signal, sys
from absl import app
import main
from input_pipeline import prepare

decode = prepare.prepare_media

def prepare_media(video_idx, rel_path, *args, **kwargs):
  if rel_path == os.environ.get("KILL_AT"):
    os.kill(os.getpid(), signal.SIGKILL)
  with open(os.environ["DECODE_LOG"], "a") as f:
    f.write(rel_path + "\n")
  return decode(video_idx, rel_path, *args, **kwargs)

prepare.prepare_media = prepare_media
app.run(main.main, flags_parser=main._parse_flags)
"""
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_TIMEOUT_S = 300  # per run; generous for a busy machine
MH_SHARD_SIZE = 2


@pytest.fixture(scope="module")
def mh_data(tmp_path_factory):
  """12 train videos (6 shards of 2), 4 test videos (2 shards), and the one-process
  prepare of both corpora (the `:tiny` recipe's synthetic_train and synthetic_test)."""
  from input_pipeline.synthetic import generate_dataset as generate  # noqa: PLC0415
  root = tmp_path_factory.mktemp("mh_syn")
  paths = generate(root, num_train=12, num_val=0, num_test=4, seed=0, size=32, fps=8,
                   num_frames=8)
  one = root / "prepared_one"
  (out,) = _run_hosts([_host_command(paths["root"], one, None)], root, "one")
  assert "Prepared 2 corpora" in out
  return paths, one


def _host_command(data_root, prepared_dir, process_id, port=None, log=None, kill_at=None):
  """(command, env) of one host; `process_id` None: a single-process prepare."""
  cmd = [sys.executable, "-c", HOST, "--config", "configs/msrvtt_ft.py:tiny", "--mode=prepare",
         f"--config.data_root={data_root}", f"--config.data.prepared_dir={prepared_dir}",
         f"--config.data.prepare_shard_size={MH_SHARD_SIZE}", "--config.data.prepare_workers=1"]
  if process_id is not None:
    cmd += ["--config.multihost.enabled=True",
            f"--config.multihost.coordinator_address=127.0.0.1:{port}",
            "--config.multihost.num_processes=2", f"--config.multihost.process_id={process_id}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
             JAX_ENABLE_COMPILATION_CACHE="false", DECODE_LOG=str(log or os.devnull))
  env.pop("KILL_AT", None)
  if kill_at:
    env["KILL_AT"] = kill_at
  return cmd, env


def _start(jobs, log_dir, name):
  logs = [os.path.join(log_dir, f"{name}_{i}.log") for i in range(len(jobs))]
  procs = []
  for (cmd, env), log in zip(jobs, logs):
    with open(log, "w") as handle:
      procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=handle,
                                    stderr=subprocess.STDOUT))
  return procs, logs


def _finish(procs, logs, name, expect=0):
  """Waits for `procs`; all must exit with `expect`. When one fails, the others are
  stopped (a host waiting for a dead peer's shards would wait on)."""
  deadline = time.monotonic() + HOST_TIMEOUT_S
  try:
    while any(p.poll() is None for p in procs):
      if any(p.poll() not in (None, expect) for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = [open(log).read() for log in logs]
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == expect, f"{name} host {i} exited with {p.returncode}:\n{out[-4000:]}"
  return outputs


def _run_hosts(jobs, log_dir, name):
  return _finish(*_start(jobs, log_dir, name), name)


def _media_of_shards(paths, split, shards):
  media = load_corpus(paths[split], paths["root"]).media
  return sorted(m for s in shards for m in media[s * MH_SHARD_SIZE:(s + 1) * MH_SHARD_SIZE])


def _decoded(log):
  return sorted(open(log).read().split()) if os.path.exists(log) else []


def test_two_hosts_write_the_bytes_of_one_each_decoding_its_own_shards(mh_data, tmp_path):
  paths, one = mh_data
  port, two = free_port(), tmp_path / "prepared"
  logs = [tmp_path / f"decoded_{p}.txt" for p in range(2)]
  out = _run_hosts([_host_command(paths["root"], two, p, port, logs[p]) for p in range(2)],
                   tmp_path, "two")
  for p in range(2):
    assert f"host {p} of 2: Preparing synthetic_train (12 videos, 6 shards; this host " \
           f"writes the 3 with index mod 2 = {p}, 0 already done)" in out[p]
    # Each host decoded its own shards' videos (train: 6 shards, test: 2), each once.
    assert _decoded(logs[p]) == sorted(
        _media_of_shards(paths, "train", range(p, 6, 2))
        + _media_of_shards(paths, "test", range(p, 2, 2))), p
  # Every shard, shard info and metadata file is the one-process prepare's, byte for byte.
  assert _tree_hashes(two) == _tree_hashes(one)
  # Per corpus: plan, info and the two TFDS files, then each shard and its info.
  assert len(_tree_hashes(one)) == 2 * 4 + 2 * (6 + 2)


def test_a_killed_host_resumes_to_the_bytes_of_one(mh_data, tmp_path):
  # Host 1 is SIGKILLed as it comes to train video 7: its shard 1 (videos 2, 3) is done,
  # shard 3 (videos 6, 7) half written in its temporary folder, shard 5 not begun. Host 0
  # finishes shards 0, 2, 4 and waits for the others; it is killed too (a lost host takes
  # the job down). The same command on both hosts then resumes and completes.
  paths, one = mh_data
  two = tmp_path / "prepared"
  train = os.path.join(prepared_source.corpus_dir(str(two), "synthetic_train"))
  kill_at = load_corpus(paths["train"], paths["root"]).media[7]
  port = free_port()
  procs, logs = _start([_host_command(paths["root"], two, 0, port),
                        _host_command(paths["root"], two, 1, port, kill_at=kill_at)],
                       tmp_path, "cut")
  try:
    _wait_until(lambda: procs[1].poll() is not None, HOST_TIMEOUT_S, "host 1 to be killed")
    host0_done = [os.path.join(train, "prepare_shards", f"{s:05d}.json") for s in (0, 2, 4)]
    _wait_until(lambda: all(map(os.path.exists, host0_done)) or procs[0].poll() is not None,
                HOST_TIMEOUT_S, "host 0's shards")
    time.sleep(1.5)  # host 0 must not finish the corpus without host 1's shards
    assert procs[0].poll() != 0, open(logs[0]).read()[-4000:]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  assert procs[1].returncode == -signal.SIGKILL, open(logs[1]).read()[-4000:]
  assert sorted(os.listdir(os.path.join(train, "prepare_shards"))) == [
      f"{s:05d}.json" for s in (0, 1, 2, 4)]
  (partial,) = os.listdir(os.path.join(train, prepare.TMP_DIR, "process_1"))
  assert ".array_record-00003-of-00006." in partial
  assert not os.path.exists(os.path.join(train, prepared_source.INFO_FILE))
  assert not os.path.exists(prepared_source.corpus_dir(str(two), "synthetic_test"))

  port = free_port()
  decoded = [tmp_path / f"decoded_{p}.txt" for p in range(2)]
  out = _run_hosts([_host_command(paths["root"], two, p, port, decoded[p]) for p in range(2)],
                   tmp_path, "resumed")
  assert "writes the 3 with index mod 2 = 0, 3 already done" in out[0]
  assert "writes the 3 with index mod 2 = 1, 1 already done" in out[1]
  # Only what was missing was decoded: host 1's shards 3 and 5, then the test corpus.
  assert _decoded(decoded[0]) == _media_of_shards(paths, "test", [0])
  assert _decoded(decoded[1]) == sorted(_media_of_shards(paths, "train", [3, 5])
                                        + _media_of_shards(paths, "test", [1]))
  assert _tree_hashes(two) == _tree_hashes(one)
