"""The workdir's own run (issue 25): a failed save stops the run at once in one line naming
the last good step; redone steps replace their metrics rows; one trainer per workdir."""

import json
import os
import socket
import struct
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from t2v2t_jax import metric_writer
from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer, CheckpointSaveError
from t2v2t_jax.errors import Refusal
from t2v2t_jax.training import workdir_lock
from t2v2t_jax.training.workdir_lock import WorkdirLock, WorkdirLockedError

STATE = {"params": {"w": jnp.ones((4, 3))}, "step": jnp.int32(0)}


def _state(step):
  return {**STATE, "step": jnp.int32(step)}


def _unwritable(directory):
  """The checkpoints folder replaced by a file: nothing can be created in it (a read-only
  mount or a full disk, as root, who ignores permission bits, can still be shown this way)."""
  os.rename(directory, f"{directory}.moved")
  open(directory, "w").close()


# -- a failed save -------------------------------------------------------------------------

def test_a_save_that_cannot_write_raises_one_line_naming_the_last_good_step(tmp_path):
  directory = str(tmp_path / "checkpoints")
  ckpt = Checkpointer(directory, async_save=True)
  assert ckpt.save(1, _state(1)) and ckpt.save(2, _state(2))
  ckpt.manager.wait_until_finished()
  _unwritable(directory)
  started = time.perf_counter()
  with pytest.raises(CheckpointSaveError) as e:
    ckpt.save(3, _state(3))
  assert time.perf_counter() - started < 30  # not Orbax's 300 s signal timeouts
  message = str(e.value)
  assert isinstance(e.value, Refusal) and "\n" not in message
  assert message.startswith(f"{directory}/3: saving checkpoint step 3 failed (")
  assert f"the last good checkpoint is step 2 ({directory}/2)" in message
  with pytest.raises(CheckpointSaveError, match="an earlier save failed"):
    ckpt.save(4, _state(4))  # nothing more is attempted
  ckpt.close()  # quiet: the failure was reported once


def test_a_training_run_stops_at_the_failed_save(tmp_path, monkeypatch, capfd):
  """Used to train on two more steps, then die with 510 "Event loop is closed" tracebacks."""
  from configs import demo
  from input_pipeline import synthetic
  from t2v2t_jax.training import train
  synthetic.generate_dataset(tmp_path / "data", num_train=8, num_val=4, num_test=4, size=32,
                             num_frames=8)
  config = demo.get_config("tiny")
  config.data_root = str(tmp_path / "data")
  config.total_steps, config.checkpoint_every, config.log_every = 4, 1, 1
  work = tmp_path / "run"
  real_save = Checkpointer.save

  def save_then_break(self, step, state, data_iter=None):
    if step == 2:
      self.manager.wait_until_finished()  # step 1 is complete, then the folder goes
      _unwritable(self.directory)
    return real_save(self, step, state, data_iter)
  monkeypatch.setattr(Checkpointer, "save", save_then_break)
  with pytest.raises(CheckpointSaveError) as e:
    train.train_and_evaluate(config, str(work), evaluate_at_end=False)
  assert f"the last good checkpoint is step 1 ({work / 'checkpoints' / '1'})" in str(e.value)
  rows = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2]  # no step trained after the failed save
  err = capfd.readouterr().err
  assert err.count("Event loop is closed") == 0 and err.count("Traceback") <= 2, err[-3000:]
  assert not (work / workdir_lock.LOCK_FILE).exists()  # released on the way out


# -- metrics of redone steps ---------------------------------------------------------------

def _events(folder):
  """Every Event of the tensorboardX files in `folder` (TFRecord framing, read directly)."""
  from tensorboardX.proto import event_pb2
  out = []
  for name in sorted(os.listdir(folder)):
    data = open(os.path.join(folder, name), "rb").read()
    pos = 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event()
      event.ParseFromString(data[pos + 12:pos + 12 + length])
      out.append(event)
      pos += 12 + length + 4
  return out


def test_redone_steps_replace_their_rows(tmp_path):
  rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4)]
  text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo'  # cut by a crash
  (tmp_path / "metrics.jsonl").write_text(text)
  writer = metric_writer.MetricWriter(str(tmp_path), enabled=True, resume_step=2)
  writer.write(3, {"loss": 30.0})
  writer.close()
  got = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(r["step"], r["loss"]) for r in got] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  # TensorBoard is told to drop the earlier files' points from step 3 on.
  starts = [e.step for e in _events(tmp_path / "tensorboard") if e.HasField("session_log")]
  assert starts == [3]


def test_a_run_that_is_not_resumed_keeps_the_rows(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/x": 1.0}) + "\n")
  writer = metric_writer.MetricWriter(str(tmp_path), enabled=True)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert [json.loads(x)["step"] for x in open(tmp_path / "metrics.jsonl")] == [0, 1]
  assert not any(e.HasField("session_log") for e in _events(tmp_path / "tensorboard"))


# -- one trainer per workdir ------------------------------------------------------------------

def _holder(tmp_path):
  return json.loads((tmp_path / workdir_lock.LOCK_FILE).read_text())


def test_a_live_holder_is_named_and_refused(tmp_path):
  first = WorkdirLock(str(tmp_path)).acquire()
  holder = _holder(tmp_path)
  assert (holder["host"], holder["pid"]) == (socket.gethostname(), os.getpid())
  with pytest.raises(WorkdirLockedError, match=rf"another trainer is running in this workdir "
                                               rf"\(pid {os.getpid()} on {socket.gethostname()}, "
                                               r"started .* UTC"):
    WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / workdir_lock.LOCK_FILE).exists()
  with WorkdirLock(str(tmp_path)):  # free again
    assert _holder(tmp_path)["pid"] == os.getpid()


def _write_lock(tmp_path, **fields):
  record = {"host": socket.gethostname(), "pid": os.getpid(), "process_start": None,
            "started": "then", "heartbeat": time.time(), "token": "old", **fields}
  (tmp_path / workdir_lock.LOCK_FILE).write_text(json.dumps(record))


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path, capsys):
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  _write_lock(tmp_path, pid=gone.pid)
  with WorkdirLock(str(tmp_path)):
    assert _holder(tmp_path)["pid"] == os.getpid()
  assert f"its holder (pid {gone.pid} on {socket.gethostname()}" in capsys.readouterr().out


def test_a_reused_pid_is_not_the_holder(tmp_path):
  """Our own pid, but another process start time: the holder was an earlier process."""
  _write_lock(tmp_path, process_start="1")
  with WorkdirLock(str(tmp_path)):
    assert _holder(tmp_path)["token"] != "old"


def test_a_holder_on_another_host_is_refused_until_its_heartbeat_is_old(tmp_path):
  _write_lock(tmp_path, host="other-vm", pid=1)
  with pytest.raises(WorkdirLockedError, match="pid 1 on other-vm"):
    WorkdirLock(str(tmp_path)).acquire()
  _write_lock(tmp_path, host="other-vm", pid=1,
              heartbeat=time.time() - workdir_lock.STALE_SECS - 60)
  with WorkdirLock(str(tmp_path)):
    assert _holder(tmp_path)["host"] == socket.gethostname()


def test_the_heartbeat_refreshes_the_lock(tmp_path):
  lock = WorkdirLock(str(tmp_path), heartbeat_secs=0.05).acquire()
  first = _holder(tmp_path)["heartbeat"]
  time.sleep(0.5)
  assert _holder(tmp_path)["heartbeat"] > first
  lock.release()


def test_a_second_trainer_is_refused_before_any_work(tmp_path):
  from configs import demo
  from t2v2t_jax.training import train
  config = demo.get_config("tiny")
  config.data_root = str(tmp_path / "no_data_needed")  # refused before the data is opened
  with WorkdirLock(str(tmp_path)):
    with pytest.raises(WorkdirLockedError, match=f"{tmp_path / workdir_lock.LOCK_FILE}: "
                                                 "another trainer is running"):
      train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()  # nothing in the workdir was touched


def test_the_lock_and_the_replaced_rows_with_the_workdir_in_a_bucket(gcs):
  """gs:// has no exclusive create through the path layer: write, then read back (see
  workdir_lock.py for the limits); metrics.jsonl is rewritten whole as an object."""
  import uuid
  from t2v2t_jax import storage
  work = f"gs://{gcs.bucket}/{uuid.uuid4().hex}/run"
  path = storage.join(work, workdir_lock.LOCK_FILE)
  lock = WorkdirLock(work).acquire()
  assert json.loads(storage.read_text(path))["pid"] == os.getpid()
  with pytest.raises(WorkdirLockedError, match=f"^{path}: another trainer is running"):
    WorkdirLock(work).acquire()
  lock.release()
  assert not storage.exists(path)
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  storage.write_text(path, json.dumps({"host": socket.gethostname(), "pid": gone.pid,
                                       "heartbeat": time.time(), "token": "old"}))
  with WorkdirLock(work):  # a killed trainer's lock in the bucket is taken over
    assert json.loads(storage.read_text(path))["pid"] == os.getpid()

  jsonl = storage.join(work, "metrics.jsonl")
  storage.write_text(jsonl, "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
  writer = metric_writer.MetricWriter(work, enabled=True, resume_step=1)
  writer.write(2, {"loss": 2.0})
  writer.close()
  assert [(json.loads(x)["step"], json.loads(x)["loss"])
          for x in storage.read_text(jsonl).splitlines()] == [(1, 1.0), (2, 2.0)]
