"""VindLU's protocol for fine-tuning: evaluate every epoch and keep the best epoch by its
`stop_key` (`best_key` here). A tiny run evaluates after each epoch, names the step whose
reranked r_mean is highest in `checkpoints/best.json` (checked against the evaluations'
own result files), keeps that step whatever `keep_checkpoints` says, and `--mode eval`
reads it by default (`pick_checkpoint=latest` reads the last)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def test_the_best_step_is_kept_beside_the_latest(tmp_path):
  from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer  # noqa: PLC0415
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1, async_save=False)
  state = {"params": {"w": jax.numpy.ones((3,))}, "step": jax.numpy.asarray(0)}
  for step in (1, 2):
    ckpt.save(step, state)
  ckpt.mark_best(2, "corpus/r_mean", 50.0)
  for step in (3, 4, 5):
    ckpt.save(step, state)
  ckpt.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
      == [2, 5]
  # A new Checkpointer (a resumed run) keeps protecting the marked step.
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1, async_save=False)
  assert ckpt.best() == {"step": 2, "key": "corpus/r_mean", "value": 50.0}
  ckpt.save(6, state)
  ckpt.close()
  assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
      == [2, 6]


def _run(*args, cwd):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             XLA_FLAGS=f"--xla_force_host_platform_device_count=1 {FAST_COMPILE}")
  proc = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


def test_a_tiny_finetune_evaluates_every_epoch_and_keeps_the_best(tmp_path):
  from input_pipeline import synthetic  # noqa: PLC0415
  data = tmp_path / "data"
  synthetic.generate_dataset(data, num_train=8, num_val=4, num_test=8, seed=0, size=32, fps=8,
                             num_frames=8)
  workdir = tmp_path / "run"
  common = ["--config", str(REPO / "configs/didemo_ft.py:tiny"), f"--workdir={workdir}",
            f"--config.data_root={data}", "--config.model.dtype=float32"]
  out = _run(*common, "--config.total_steps=0", "--config.optimizer.epochs=3",
             "--config.eval_every_epochs=1", "--config.best_key=synthetic_test/r_mean",
             "--config.keep_checkpoints=1", "--config.checkpoint_every=1000", cwd=tmp_path)
  evaluated = sorted(int(p.stem) for p in (workdir / "eval").glob("*.json"))
  total = max(evaluated)
  assert len(evaluated) == 3 and evaluated == [total // 3, 2 * total // 3, total], evaluated
  assert out.count("Retrieval on synthetic_test at step") == 3
  # Warmup: the learning rate rises over the first half epoch.
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  lrs = [r["lr"] for r in sorted(rows, key=lambda r: r["step"]) if "lr" in r]
  warmup = max(1, total // 3 // 2)
  assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1])), lrs
  # The marker names the evaluated step with the highest r_mean (first of equals).
  scores = {s: json.loads((workdir / "eval" / f"{s}.json").read_text())["synthetic_test"]["r_mean"]
            for s in evaluated}
  best_step = max(evaluated, key=lambda s: (scores[s], -s))
  best = json.loads((workdir / "checkpoints" / "best.json").read_text())
  assert best["step"] == best_step and best["key"] == "synthetic_test/r_mean"
  assert np.isclose(best["value"], scores[best_step])
  kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert kept == sorted({best_step, total}), kept
  # --mode eval reads the best step by default, the last one when asked.
  out = _run(*common, "--mode=eval", cwd=tmp_path)
  assert f"Evaluating {workdir}/checkpoints/{best_step}" in out
  out = _run(*common, "--mode=eval", "--config.pick_checkpoint=latest", cwd=tmp_path)
  assert f"Evaluating {workdir}/checkpoints/{total}\n" in out
