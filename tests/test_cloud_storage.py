"""A run with its workdir in a Google Cloud Storage bucket, against a real GCS JSON API served
on this machine (`gcp-storage-emulator`, started by the test through `gcs_emulator.py`,
which adds the one response header it lacks; not a mock): train the tiny
recipe with `--workdir gs://...`, SIGKILL it, resume, evaluate. The bucket must hold the
whole run (checkpoints with their integrity records, config, metrics, TensorBoard, eval)
and the local disk nothing of it. Also the path layer's pieces on the same server: the
integrity record taken from the object listing, a changed object found, unknown schemes.

The server is conftest.py's `gcs` fixture: gcsfs (etils.epath) finds it through
`STORAGE_EMULATOR_HOST`, Orbax's tensorstore through `TENSORSTORE_GCS_HTTP_URL`
(`GOOGLE_AUTH_TOKEN_FOR_TESTING` skips its OAuth).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
PROCESS_TIMEOUT_S = 900


def _objects(prefix: str) -> dict[str, int]:
  """{object name under prefix: size}, straight from the server's listing."""
  from t2v2t_jax import storage  # noqa: PLC0415
  return storage.list_files(prefix)


# ------------------------------------------------------------------ the path layer


def test_unknown_schemes_fail_at_once(tmp_path):
  from t2v2t_jax import storage  # noqa: PLC0415
  for bad in ("s3://b/run", "hdfs://x/y", "http://host/run"):
    with pytest.raises(ValueError, match="scheme is not supported"):
      storage.check_path(bad, "--workdir")
  storage.check_path("gs://b/run", "--workdir")
  storage.check_path(str(tmp_path), "--workdir")
  with pytest.raises(ValueError, match="gcsfuse"):
    storage.check_local_only("gs://b/videos", "media_root", "videos")
  # From the command line: one line, nothing created (no local folder named `s3:`).
  proc = subprocess.run(
      [sys.executable, str(REPO / "main.py"), "--config", str(REPO / "configs/msrvtt_ft.py:tiny"),
       "--workdir", "s3://bucket/run"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.startswith("FATAL: --workdir='s3://bucket/run': the s3:// scheme")
  assert list(tmp_path.iterdir()) == []


def test_integrity_record_from_the_listing_finds_a_changed_object(gcs, tmp_path):
  """The record of a step in the bucket is made from the server's CRC32C (no download),
  equals the one computed from the same bytes locally, and finds a changed object."""
  from t2v2t_jax import storage  # noqa: PLC0415
  from t2v2t_jax.checkpoints import run_checkpoints  # noqa: PLC0415
  step = f"gs://{gcs.bucket}/{uuid.uuid4().hex}/checkpoints/3"
  local = tmp_path / "3"
  files = {"state/_METADATA": b'{"tree": 1}', "state/manifest.ocdbt": os.urandom(5000),
           "state/d/abc": os.urandom(70000),
           "data_iter/process_0-of-1.json": b'{"next": 4}'}
  for rel, data in files.items():
    storage.path(storage.join(step, rel)).parent.mkdir(parents=True, exist_ok=True)
    storage.path(storage.join(step, rel)).write_bytes(data)
    (local / rel).parent.mkdir(parents=True, exist_ok=True)
    (local / rel).write_bytes(data)
  assert storage.files_with_checksums(step) == storage.files_with_checksums(local)
  run_checkpoints.write_integrity(step)
  run_checkpoints.write_integrity(str(local))
  record = json.loads(storage.read_text(storage.join(step, "integrity.json")))
  assert record["format"] == 2 and set(record["files"]) == set(files)
  assert record == json.loads((local / "integrity.json").read_text())
  assert run_checkpoints.check_step(step, data_iter=True) is None
  # Same size, one byte changed: only a checksum finds it.
  changed = bytearray(files["state/d/abc"])
  changed[1234] ^= 0x10
  storage.path(storage.join(step, "state/d/abc")).write_bytes(bytes(changed))
  reason = run_checkpoints.check_step(step, data_iter=True)
  assert reason is not None and "state/d/abc does not match its checksum" in reason


def test_a_log_on_gcs_is_uploaded_whole_and_continues_an_earlier_one(gcs):
  from t2v2t_jax import storage  # noqa: PLC0415
  p = f"gs://{gcs.bucket}/{uuid.uuid4().hex}/metrics.jsonl"
  log = storage.AppendableText(p, flush_secs=3600)
  log.write("a\n")
  assert not storage.exists(p)  # buffered: an object cannot be appended to
  log.close()
  log = storage.AppendableText(p, flush_secs=0)  # a resumed run: the rows so far stay
  log.write("b\n")
  assert storage.read_text(p) == "a\nb\n"
  log.close()


# ------------------------------------------------------------------ a whole run in the bucket


def _env(gcs_env) -> dict:
  env = dict(os.environ)
  env.update(gcs_env)
  env.update(JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1", JAX_ENABLE_COMPILATION_CACHE="false",
             XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}",
             PYTHONPATH=str(REPO))
  return env


def test_train_kill_resume_evaluate_with_the_workdir_in_a_bucket(gcs, tmp_path):
  from input_pipeline import synthetic  # noqa: PLC0415
  from t2v2t_jax import storage  # noqa: PLC0415
  data = tmp_path / "data"
  synthetic.generate_dataset(data, num_train=16, num_val=4, num_test=8, seed=0, size=32, fps=8,
                             num_frames=8)
  run_name = f"run-{uuid.uuid4().hex[:12]}"
  workdir = f"gs://{gcs.bucket}/runs/{run_name}"
  cwd = tmp_path / "cwd"  # the commands run here: nothing may appear in it
  cwd.mkdir()
  command = [sys.executable, str(REPO / "main.py"), "--config",
             str(REPO / "configs/msrvtt_ft.py:tiny"), f"--workdir={workdir}",
             f"--config.data_root={data}", "--config.total_steps=6",
             "--config.checkpoint_every=2", "--config.model.dtype=float32"]
  env = _env(gcs.env)

  # 1. Train; SIGKILL once step 5 is logged (checkpoints 2 and 4 are in the bucket).
  proc = subprocess.Popen(command + ["--mode=train"], cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  out, deadline = [], time.monotonic() + PROCESS_TIMEOUT_S
  for line in proc.stdout:
    out.append(line)
    if line.startswith("step 5/6"):
      proc.send_signal(signal.SIGKILL)
      break
    assert time.monotonic() < deadline, "".join(out)
  proc.wait(timeout=60)
  text = "".join(out)
  assert proc.returncode == -signal.SIGKILL, text
  assert "Running on 1 x cpu (cpu)" in text
  assert "Starting at step 0/6 (from scratch)" in text
  steps = {int(k.split("/")[0]) for k in _objects(f"{workdir}/checkpoints")}
  assert {2, 4} <= steps, steps

  # 2. The same command resumes from the bucket, finishes and evaluates.
  proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=PROCESS_TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  # Step 4's save may still have been in flight at the kill: then it never committed and
  # the run resumes from step 2 (and saves 4 again).
  resumed = re.search(rf"Starting at step (\d)/6 \(resumed from {workdir}/checkpoints/(\d)\)",
                      proc.stdout)
  assert resumed and resumed.group(1) == resumed.group(2) in ("2", "4"), proc.stdout
  assert "Retrieval on synthetic_test at step 6" in proc.stdout

  # 3. --mode eval reads the bucket's newest step alone.
  proc = subprocess.run(command + ["--mode=eval"], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=PROCESS_TIMEOUT_S)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert f"Evaluating {workdir}/checkpoints/6" in proc.stdout

  # The bucket holds the run.
  objects = _objects(workdir)
  assert "config.json" in objects and "eval/6.json" in objects
  assert any(k.startswith("tensorboard/events.out.tfevents") for k in objects), sorted(objects)
  for step in (4, 6):
    record = json.loads(storage.read_text(f"{workdir}/checkpoints/{step}/integrity.json"))
    assert record["format"] == 2
    assert f"checkpoints/{step}/state/manifest.ocdbt" in objects
  rows = [json.loads(line) for line in storage.read_text(f"{workdir}/metrics.jsonl").splitlines()]
  assert {r["step"] for r in rows if "loss" in r} >= {5, 6}
  results = json.loads(storage.read_text(f"{workdir}/eval/6.json"))
  assert results["synthetic_test"]["num_videos"] == 8
  # ... and the local disk nothing: no `gs:` folder, no file or folder named after the run.
  assert list(cwd.iterdir()) == []
  for root in (tmp_path, Path("/tmp"), REPO):
    found = subprocess.run(["find", str(root), "-name", f"*{run_name}*"], capture_output=True,
                           text=True).stdout.strip()
    assert not found, found


def test_annotation_files_and_vocab_read_from_the_bucket(gcs, tmp_path):
  """Annotation files and the tokenizer's vocab in a bucket read like local ones (the media
  folder stays local: videos are read through a mount, docs/cloud.md)."""
  from input_pipeline import annotations, synthetic, text  # noqa: PLC0415
  from t2v2t_jax import storage  # noqa: PLC0415
  data = tmp_path / "data"
  synthetic.generate_dataset(data, num_train=4, num_val=2, num_test=4, seed=0, size=32, fps=8,
                             num_frames=8)
  base = f"gs://{gcs.bucket}/{uuid.uuid4().hex}"
  for name in ("train.json", "test.json", "vocab.txt"):
    storage.path(f"{base}/{name}").write_bytes((data / name).read_bytes())
  for split in ("train", "test"):
    remote = annotations.load_corpus(f"{base}/{split}.json", str(data))
    local = annotations.load_corpus(str(data / f"{split}.json"), str(data))
    assert remote.num_pairs == local.num_pairs > 0 and remote.num_videos == local.num_videos
    assert list(remote.texts) == list(local.texts) and list(remote.media) == list(local.media)
    assert [remote.video_of_pair(i) for i in range(remote.num_pairs)] == \
        [local.video_of_pair(i) for i in range(local.num_pairs)]
  ids = text.load_tokenizer(f"{base}/vocab.txt")("a red circle")["input_ids"]
  assert ids == text.load_tokenizer(str(data / "vocab.txt"))("a red circle")["input_ids"]


def test_json_files_and_a_hf_folder_read_from_the_bucket(gcs, tmp_path):
  """The one JSON reader (`json_input.read_json`) on gs:// objects: values read, a missing,
  oversized or broken object refused naming its gs:// path; and a Hugging Face folder (its
  config.json through that reader, its weights) read from the bucket like a local one."""
  from t2v2t_jax import storage  # noqa: PLC0415
  from t2v2t_jax.checkpoints import hf_files  # noqa: PLC0415
  from t2v2t_jax.errors import Refusal  # noqa: PLC0415
  from t2v2t_jax.json_input import read_json  # noqa: PLC0415
  base = f"gs://{gcs.bucket}/{uuid.uuid4().hex}"
  storage.path(f"{base}/ok.json").write_bytes(b'{"a": [1, 2]}')
  storage.path(f"{base}/broken.json").write_bytes(b'{"a": ')
  assert read_json(f"{base}/ok.json") == {"a": [1, 2]}
  for name, kwargs, message in (("missing.json", {}, "file not found"),
                                ("ok.json", {"max_bytes": 4}, "more than the 4 bytes"),
                                ("broken.json", {}, "not valid JSON")):
    with pytest.raises(Refusal, match=re.escape(f"{base}/{name}: {message}")):
      read_json(f"{base}/{name}", **kwargs)

  sys.path.append(str(REPO / "benchmarks"))   # appended: benchmarks/input_pipeline.py
  import crafted_checkpoints  # noqa: PLC0415
  files = crafted_checkpoints._hf_bert_files()
  local = tmp_path / "bert"
  local.mkdir()
  for name, data in files.items():
    (local / name).write_bytes(data)
    storage.path(f"{base}/bert/{name}").write_bytes(data)
  remote_config, remote_state, _ = hf_files.read_hf_checkpoint(f"{base}/bert")
  local_config, local_state, _ = hf_files.read_hf_checkpoint(str(local))
  assert remote_config == local_config and remote_config["hidden_size"] > 0
  assert sorted(remote_state) == sorted(local_state)
  assert all((remote_state[k] == local_state[k]).all() for k in local_state)
  storage.path(f"{base}/bert/config.json").write_bytes(b"[" * 100_000 + b"]" * 100_000)
  with pytest.raises(hf_files.HfCheckpointError,
                     match=re.escape(f"{base}/bert/config.json: JSON nested too deeply")):
    hf_files.read_hf_checkpoint(f"{base}/bert")
