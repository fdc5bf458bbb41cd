"""Preemption and profiling, with real processes and real signals.

A SIGTERM in the middle of training (between regular checkpoints) makes every process save
the step it is at, or for several processes the step JAX's preemption sync point picks,
print one line saying so and exit with `preemption.EXIT_CODE`; the same command then
resumes and finishes. The finished runs must equal one uninterrupted run: every step's
losses and batch fingerprints (`data/batch_crc`) and the final train state.

One uninterrupted single-process run (4 CPU devices) is the reference of every test here;
it also traces two steps (`config.profile_steps`), whose TensorBoard profile file is
checked. Compiling dominates the runs (see tests/test_multihost.py for the flags and for
why the multi-process runs do without the compilation cache).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from process_helpers import free_port, restore_numpy

from t2v2t_jax.training import config_checks, preemption, profiling

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
# Steps run; SIGTERM is sent once step SIGNAL_AT is logged. With several processes the save
# comes a few steps later (JAX's notifier polls once a second, then the processes agree):
# the steps after SIGNAL_AT leave room for that.
STEPS, SIGNAL_AT, BATCH = 12, 2, 8
PROCESS_TIMEOUT_S = 900  # per phase; generous for a busy machine
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
PREEMPTED_LINE = re.compile(r"Preempted \(SIGTERM\) at step (\d+): saved checkpoint (\S+); "
                            r"rerun the same command to resume")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
  from input_pipeline import synthetic  # noqa: PLC0415
  root = tmp_path_factory.mktemp("preemption_data")
  # 64 videos x 3 captions: 24 steps per epoch at batch 8, so no epoch ends in these runs.
  synthetic.generate_dataset(root, num_train=64, num_val=4, num_test=8, seed=0, size=32,
                             fps=8, num_frames=8)
  return root


def _env(num_devices: int, *, compilation_cache: bool) -> dict:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices} {FAST_COMPILE}")
  if not compilation_cache:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  return env


def _flags(data_root, workdir) -> list[str]:
  # float32: the multi-process runs are compared with the single-process reference to 1e-5
  # (tests/test_multihost.py says why bfloat16 would not do). A large checkpoint_every: the
  # only checkpoints before the end are the ones preemption writes.
  return ["--config", "configs/msrvtt_ft.py:tiny", f"--workdir={workdir}", "--mode=train",
          f"--config.data_root={data_root}", f"--config.batch_size={BATCH}",
          f"--config.total_steps={STEPS}", "--config.checkpoint_every=1000",
          "--config.log_every=1", "--config.model.dtype=float32"]


def _two_process_jobs(data_root, workdir) -> list[tuple[list[str], dict]]:
  port = free_port()
  return [([sys.executable, str(WORKER), *_flags(data_root, workdir),
            "--config.multihost.enabled=True",
            f"--config.multihost.coordinator_address=127.0.0.1:{port}",
            "--config.multihost.num_processes=2", f"--config.multihost.process_id={i}"],
           _env(2, compilation_cache=False)) for i in range(2)]


class Phase:
  """Processes started together, with their output in log files."""

  def __init__(self, jobs, log_dir: Path, name: str):
    self.logs = [log_dir / f"{name}_{i}.log" for i in range(len(jobs))]
    self._handles = [open(path, "w") for path in self.logs]
    self.procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=h, stderr=subprocess.STDOUT)
                  for (cmd, env), h in zip(jobs, self._handles)]
    self.deadline = time.monotonic() + PROCESS_TIMEOUT_S

  def outputs(self) -> list[str]:
    return [path.read_text() for path in self.logs]

  def wait_for_logged_step(self, workdir: Path, step: int) -> None:
    """Until process 0 has logged `step` (metrics.jsonl is flushed row by row)."""
    metrics = workdir / "metrics.jsonl"
    while time.monotonic() < self.deadline:
      if any(p.poll() is not None for p in self.procs):
        self.finish()
        pytest.fail(f"a process ended before step {step}:\n{self.outputs()[0][-6000:]}")
      if metrics.exists() and any(row.get("step", 0) >= step and "loss" in row
                                  for row in _rows(metrics)):
        return
      time.sleep(0.05)
    self.finish()
    pytest.fail(f"step {step} not reached in {PROCESS_TIMEOUT_S} s")

  def finish(self) -> list[str]:
    """Waits for every process (stops all once one fails: its peers would wait forever)."""
    try:
      while any(p.poll() is None for p in self.procs) and time.monotonic() < self.deadline:
        if any(p.poll() not in (None, 0, preemption.EXIT_CODE) for p in self.procs):
          break
        time.sleep(0.2)
    finally:
      for p in self.procs:
        if p.poll() is None:
          p.kill()
        p.wait()
      for h in self._handles:
        h.close()
    return self.outputs()


def _rows(metrics: Path) -> list[dict]:
  # A row being written may be cut short: only whole lines count.
  return [json.loads(line) for line in metrics.read_text().splitlines(keepends=True)
          if line.endswith("\n")]


def _train_rows(workdir: Path) -> dict[int, dict]:
  rows = [r for r in _rows(workdir / "metrics.jsonl") if "loss" in r]
  steps = [r["step"] for r in rows]
  assert steps == list(range(1, len(steps) + 1)), f"steps logged out of order or twice: {steps}"
  return {r["step"]: r for r in rows}


def _preempted_step(output: str, workdir: Path) -> int:
  match = PREEMPTED_LINE.search(output)
  assert match, f"no preemption line in:\n{output[-6000:]}"
  step = int(match.group(1))
  assert match.group(2) == str(workdir / "checkpoints" / str(step))
  return step


def _assert_same_run(workdir: Path, reference: Path, *, tol: float, same_batches: bool):
  rows, ref_rows = _train_rows(workdir), _train_rows(reference)
  assert sorted(rows) == sorted(ref_rows) == list(range(1, STEPS + 1))
  for step, ref in ref_rows.items():
    if same_batches:
      assert rows[step]["data/batch_crc"] == ref["data/batch_crc"], f"batch of step {step}"
    for key in ("loss", "loss_vtc", "loss_vtm", "grad_norm", "lr"):
      np.testing.assert_allclose(rows[step][key], ref[key], rtol=tol, atol=tol,
                                 err_msg=f"{key} at step {step}")
  state = restore_numpy(workdir / "checkpoints" / str(STEPS))
  ref_state = restore_numpy(reference / "checkpoints" / str(STEPS))
  assert state.keys() == ref_state.keys()
  assert int(state["['step']"]) == STEPS
  for key, value in ref_state.items():
    np.testing.assert_allclose(state[key], value, rtol=0, atol=tol, err_msg=key)


@pytest.fixture(scope="module")
def reference(data_root, tmp_path_factory) -> tuple[Path, str]:
  """The uninterrupted run (one process, 4 devices), tracing steps 2 and 3."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  phase = Phase([([sys.executable, "main.py", *_flags(data_root, workdir),
                   "--config.profile_steps=1:3"], _env(4, compilation_cache=True))],
                workdir.parent, "reference")
  (out,) = phase.finish()
  assert phase.procs[0].returncode == 0, out[-6000:]
  return workdir, out


# ------------------------------------------------------------------ in-process units


def test_watch_sees_a_real_sigterm_and_puts_the_old_handler_back():
  seen = []
  before = signal.signal(signal.SIGTERM, lambda *_: seen.append("old handler"))
  try:
    mine = signal.getsignal(signal.SIGTERM)
    watch = preemption.PreemptionWatch()
    assert not watch.synced  # no jax.distributed here: the plain handler
    assert not watch.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.1)  # Python runs the handler between bytecodes of the main thread
    assert watch.should_stop(2) and watch.should_stop(3)  # stays set
    assert seen == []  # the watch, not the old handler, got it
    watch.close()
    assert signal.getsignal(signal.SIGTERM) is mine
  finally:
    signal.signal(signal.SIGTERM, before)


def test_profile_steps_are_parsed_and_checked_before_any_work():
  assert profiling.parse_profile_steps("") is None
  assert profiling.parse_profile_steps("10:15") == (10, 15)
  assert profiling.parse_profile_steps(" 0:1 ") == (0, 1)
  from configs import msrvtt_ft  # noqa: PLC0415
  config = msrvtt_ft.get_config("tiny")
  assert config.profile_steps == ""
  config_checks.check_run_settings(config)
  for bad in ("15:10", "5:5", "-1:3", "5", "a:b", "1:2:3"):
    config.profile_steps = bad
    with pytest.raises(ValueError, match="START:STOP"):
      config_checks.check_run_settings(config)


# ------------------------------------------------------------------ real runs


def test_profile_steps_write_a_trace_for_tensorboard(reference):
  workdir, out = reference
  traces = list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0, traces
  assert f"Profile of steps 2-3 written to {traces[0].parent}" in out


def test_sigterm_saves_the_next_step_and_the_same_command_resumes_exactly(
    data_root, reference, tmp_path):
  workdir = tmp_path / "run"
  job = ([sys.executable, "main.py", *_flags(data_root, workdir)], _env(4, compilation_cache=True))
  first = Phase([job], tmp_path, "first")
  first.wait_for_logged_step(workdir, SIGNAL_AT)
  first.procs[0].send_signal(signal.SIGTERM)
  (out,) = first.finish()
  assert first.procs[0].returncode == preemption.EXIT_CODE, out[-6000:]
  saved = _preempted_step(out, workdir)
  # Saved at the end of the step in flight when the signal came: at most one step late.
  last_logged = max(_train_rows(workdir))
  assert SIGNAL_AT <= saved == last_logged < STEPS
  assert os.listdir(workdir / "checkpoints") == [str(saved)]

  second = Phase([job], tmp_path, "second")
  (out,) = second.finish()
  assert second.procs[0].returncode == 0, out[-6000:]
  assert f"Starting at step {saved}/{STEPS} (resumed from" in out
  _assert_same_run(workdir, reference[0], tol=1e-6, same_batches=True)


# ~5 CPU-minutes without a compilation cache (two phases of two processes).
@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(
    data_root, reference, tmp_path):
  workdir = tmp_path / "run"
  first = Phase(_two_process_jobs(data_root, workdir), tmp_path, "first")
  first.wait_for_logged_step(workdir, SIGNAL_AT)
  # Process 1 alone, not the coordinator: the notice must reach process 0 through JAX.
  first.procs[1].send_signal(signal.SIGTERM)
  outputs = first.finish()
  for i, (p, out) in enumerate(zip(first.procs, outputs)):
    assert p.returncode == preemption.EXIT_CODE, f"process {i}:\n{out[-6000:]}"
  saved = [_preempted_step(out, workdir) for out in outputs]
  assert saved[0] == saved[1] and SIGNAL_AT <= saved[0] < STEPS
  assert os.listdir(workdir / "checkpoints") == [str(saved[0])]
  assert sorted(os.listdir(workdir / "checkpoints" / str(saved[0]) / "data_iter")) == [
      "commit_success.txt", "process_0-of-2.json", "process_1-of-2.json"]

  second = Phase(_two_process_jobs(data_root, workdir), tmp_path, "second")
  outputs = second.finish()
  for i, (p, out) in enumerate(zip(second.procs, outputs)):
    assert p.returncode == 0, f"process {i}:\n{out[-6000:]}"
  assert f"Starting at step {saved[0]}/{STEPS} (resumed from" in outputs[0]
  # The logged batch fingerprints are process 0's half of the batch: not comparable with
  # the single process's whole batch (tests/test_multihost.py checks the halves).
  _assert_same_run(workdir, reference[0], tol=1e-5, same_batches=False)
