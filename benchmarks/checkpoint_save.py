r"""Checkpoint save time at paper size, integrity records included: before (format 1: every
file of the step re-read and CRC-32'd with zlib; on GCS that is a full download) and after
(format 2: CRC32C, from the object listing on GCS, read once from the page cache locally).

  python benchmarks/checkpoint_save.py --where local            # a local folder
  python benchmarks/checkpoint_save.py --where gs --scale 0.25  # a local GCS API server

The train state is the paper recipe's (B/16 + base, AdamW: parameters and two moments,
float32), filled with random values (real weights compress about as little). `--where gs`
starts `gcp-storage-emulator` (tests/gcs_emulator.py) on localhost, so the GCS figures are
those of a Python server on this machine, not of a real bucket: they show what each record
costs in requests and bytes, not real-network times. `--scale` keeps that fraction of each
parameter's leading axis (to fit the server's memory). Results go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _start_gcs() -> subprocess.Popen:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "gcs_emulator.py"), "start",
                           "--host", "127.0.0.1", "--port", str(port), "--default-bucket",
                           "bench", "--in-memory", "--quiet"])
  url = f"http://127.0.0.1:{port}"
  for _ in range(200):
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b/bench", timeout=2)
      break
    except OSError:
      time.sleep(0.3)
  os.environ.update(STORAGE_EMULATOR_HOST=url, TENSORSTORE_GCS_HTTP_URL=url,
                    GOOGLE_AUTH_TOKEN_FOR_TESTING="bench")
  return proc


def _state(scale: float):
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415
  from configs import webvid_pretrain  # noqa: PLC0415
  from t2v2t_jax.training import optimizer as optimizer_lib  # noqa: PLC0415
  from t2v2t_jax.training import train_state as state_lib  # noqa: PLC0415
  config = webvid_pretrain.get_config()
  tx = optimizer_lib.make_optimizer(config.optimizer, 1000)
  abstract = state_lib.abstract_state(config.model, tx, 0)
  rng = np.random.default_rng(0)

  def fill(a):
    shape = tuple(max(1, int(d * scale)) if i == 0 and a.ndim else d for i, d in enumerate(a.shape))
    if np.issubdtype(a.dtype, np.floating):
      return rng.standard_normal(shape, dtype=np.float32).astype(a.dtype)
    return np.zeros(shape, a.dtype)
  return jax.tree.map(fill, abstract)


def _old_record(step_dir: str) -> dict:
  """Format 1 as it was: every file read back whole and CRC-32'd."""
  from t2v2t_jax import storage  # noqa: PLC0415
  return {rel: [size, zlib.crc32(storage.read_bytes(storage.join(step_dir, rel)))]
          for rel, size in storage.list_files(step_dir).items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--where", choices=("local", "gs"), default="local")
  parser.add_argument("--scale", type=float, default=1.0)
  parser.add_argument("--repeats", type=int, default=2)
  args = parser.parse_args()
  server = _start_gcs() if args.where == "gs" else None
  try:
    import jax  # noqa: PLC0415
    from t2v2t_jax import storage  # noqa: PLC0415
    from t2v2t_jax.checkpoints import run_checkpoints  # noqa: PLC0415
    state = _state(args.scale)
    nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
    print(f"train state: {nbytes / 2**30:.2f} GiB ({args.where}, scale {args.scale})", flush=True)
    root = (f"gs://bench/{os.getpid()}" if args.where == "gs"
            else tempfile.mkdtemp(prefix="ckpt_bench_", dir=os.environ.get("BENCH_DIR")))
    rows = []
    for repeat in range(args.repeats):
      ckpt = run_checkpoints.Checkpointer(storage.join(root, f"r{repeat}"), max_to_keep=3,
                                          async_save=False)
      t0 = time.perf_counter()
      ckpt.save(1, state)
      ckpt.manager.wait_until_finished()
      t_save = time.perf_counter() - t0
      step_dir = ckpt.step_dir(1)
      t0 = time.perf_counter()
      _old_record(step_dir)
      t_old = time.perf_counter() - t0
      t0 = time.perf_counter()
      run_checkpoints.write_integrity(step_dir)
      t_new = time.perf_counter() - t0
      t0 = time.perf_counter()
      reason = run_checkpoints.check_step(step_dir, data_iter=False)
      t_check = time.perf_counter() - t0
      assert reason is None, reason
      ckpt.manager.close()
      rows.append(dict(save_s=t_save, record_before_s=t_old, record_after_s=t_new,
                       check_after_s=t_check))
      print(f"repeat {repeat}: save {t_save:.2f} s; integrity record before (re-read, zlib) "
            f"{t_old:.2f} s, after (CRC32C{', listing' if args.where == 'gs' else ''}) "
            f"{t_new:.2f} s; check at resume {t_check:.2f} s", flush=True)
      storage.rmtree(storage.join(root, f"r{repeat}"))
    print(json.dumps({"where": args.where, "scale": args.scale, "gib": nbytes / 2**30,
                      "rows": rows}))
  finally:
    if server is not None:
      server.kill()


if __name__ == "__main__":
  main()
