"""notebooks/colab_tpu.ipynb runs top to bottom on CPU (tiny settings), so it cannot rot.

The notebook reads T2V2T_NOTEBOOK_TINY=1 (the tiniest model, 2 steps), T2V2T_NOTEBOOK_WORKDIR
(the runs folder, which is on Google Drive on Colab), T2V2T_REPO_URL and T2V2T_INIT_FROM. It
runs from the checkout, and from an empty folder as on Colab, where it clones a local git URL
holding this working tree. The kernel's python has the dependencies either way, so the install
cell installs nothing; outside the checkout main.py runs from the clone, with the clone's code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "colab_tpu.ipynb"
# Compiling dominates a tiny run on CPU; the tiny model runs fast enough unoptimised.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _text_outputs(cell) -> str:
  parts = []
  for out in cell.get("outputs", []):
    if out.get("output_type") == "stream":
      parts.append(out.get("text", ""))
    elif "data" in out:
      parts.append(out["data"].get("text/plain", ""))
  return "".join(parts)


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  # Shared by the runs of this module: the demo's programs are the same in each, and
  # compiling is most of a tiny run's time.
  return tmp_path_factory.mktemp("jax_cache")


def _tiny_env(monkeypatch, runs: Path, compile_cache: Path) -> None:
  monkeypatch.setenv("T2V2T_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("T2V2T_NOTEBOOK_WORKDIR", str(runs))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(compile_cache))
  for name in ("T2V2T_MY_DATA", "T2V2T_INIT_FROM", "T2V2T_REPO_URL", "T2V2T_REPO_DIR"):
    monkeypatch.delenv(name, raising=False)


def _execute(cwd: Path) -> tuple[nbformat.NotebookNode, str]:
  """Runs the notebook with its kernel in `cwd`; returns it with its printed text."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()
  return nb, "\n".join(_text_outputs(cell) for cell in nb.cells if cell.cell_type == "code")


def _local_git_url(dest: Path) -> str:
  """A git repository at `dest` holding this working tree as it is now (tracked and untracked
  files, ignored ones left out), committed; its file:// URL, which `git clone --depth 1` takes."""
  listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                          cwd=REPO, check=True, capture_output=True).stdout.decode()
  for rel in filter(None, listed.split("\0")):
    source = REPO / rel
    if source.is_file():  # tracked files deleted in the working tree are listed too
      (dest / rel).parent.mkdir(parents=True, exist_ok=True)
      shutil.copy2(source, dest / rel)
  git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
         "-c", "commit.gpgsign=false", "-c", "init.defaultBranch=main"]
  for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "working tree"]):
    subprocess.run(git + args, cwd=dest, check=True, capture_output=True)
  return dest.as_uri()


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch, compile_cache):
  _tiny_env(monkeypatch, tmp_path, compile_cache)
  _, text = _execute(REPO)

  assert "dependencies already present" in text  # ran from the checkout, installed nothing
  assert f"code in {REPO} " in text
  # The Drive cell fell back to local folders (no google.colab here).
  assert f"runs in {tmp_path} (a local folder: not on Colab" in text
  assert "cpu 1 x cpu" in text  # the accelerator probe ran in its own process
  # The demo trained, evaluated, and its table was shown.
  demo = json.loads((tmp_path / "demo" / "eval" / "2.json").read_text())
  assert demo["synthetic_test"]["num_frames"] == 2
  assert "synthetic_test" in text and "text->video" in text
  # The batch for this runtime was worked out for the paper recipe (its tiny form: batch 4,
  # 2 clips a device here), but INIT_FROM is empty, so the demo's weights and recipe ran,
  # at the demo recipe's own batch, and the notebook said so.
  assert "runtime 1 x cpu: 2 clips a device" in text
  assert ("configs/msrvtt_ft.py:tiny here: --config.batch_size=2 --config.optimizer.grad_accum_steps=2"
          in text)
  assert "NOTICE: INIT_FROM is not set" in text and "not used now" in text
  assert "initialised from" in text and str(tmp_path / "demo") in text
  # The example folder was copied to local disk, and the fine-tune read the copy.
  local_data = tmp_path / "local" / "my_data"
  assert "data on local disk: " in text and "0 files copied" not in text
  assert (local_data / "anno" / "train.json").is_file() and (local_data / "vocab.txt").is_file()
  config = json.loads((tmp_path / "my_finetune" / "config.json").read_text())
  assert config["data_root"] == str(local_data)
  assert config["batch_size"] == 4 and config["optimizer"]["grad_accum_steps"] == 1
  finetune = json.loads((tmp_path / "my_finetune" / "eval" / "2.json").read_text())
  assert set(finetune) == {"my_test"} and finetune["my_test"]["num_videos"] == 16
  assert os.path.isfile(tmp_path / "my_recipe.py")
  # The user's folder, and its copy, got no synthetic dataset written into them.
  assert not os.path.exists(tmp_path / "local" / "example_data" / "train.json")
  assert not os.path.exists(local_data / "train.json")


def test_notebook_outside_a_checkout_clones_and_resumes(tmp_path, monkeypatch, compile_cache):
  """As on Colab: the kernel starts in an empty folder and clones REPO_URL; with INIT_FROM set
  the paper recipe (tiny) fine-tunes with the batch and accumulation picked for the runtime.
  Then the notebook runs again in the same folders, as after a restarted runtime with the
  runs on Drive: the clone is reused, the copy skips what it has, and the runs resume."""
  url = _local_git_url(tmp_path / "source")
  work, runs = tmp_path / "colab", tmp_path / "drive"
  work.mkdir()
  clone = work / "t2v2t-jax"
  _tiny_env(monkeypatch, runs, compile_cache)
  monkeypatch.setenv("T2V2T_REPO_URL", url)
  monkeypatch.setenv("T2V2T_INIT_FROM", str(runs / "demo"))  # the demo run the notebook makes first
  _, text = _execute(work)

  assert f"$ git clone --depth 1 {url} {clone}" in text
  assert (clone / ".git").is_dir() and (clone / "main.py").is_file()
  assert f"code in {clone} | dependencies already present" in text
  if not (sys.dont_write_bytecode or os.environ.get("PYTHONDONTWRITEBYTECODE")):
    # main.py ran from the clone and imported the clone's package, not the checkout's.
    assert list((clone / "t2v2t_jax" / "training").glob("__pycache__/train.*.pyc"))
  assert f"runs in {runs} (a local folder: not on Colab" in text
  assert (runs / "demo" / "eval" / "2.json").is_file()
  # The real fine-tune: the tiny paper recipe from the demo's weights, at 2 clips a step x 2
  # steps an update (the recipe's batch of 4), on the local copy of the example folder.
  assert "NOTICE" not in text and "not used now" not in text
  assert f"fine-tuning configs/msrvtt_ft.py:tiny from {runs / 'demo'}" in text
  assert ("configs/msrvtt_ft.py:tiny here: --config.batch_size=2 --config.optimizer.grad_accum_steps=2"
          in text)
  assert f"initialised from {runs / 'demo'}" in text
  config = json.loads((runs / "my_finetune" / "config.json").read_text())
  assert config["batch_size"] == 2 and config["optimizer"]["grad_accum_steps"] == 2
  assert config["data_root"] == str(runs / "local" / "my_data")
  assert config["model"]["dtype"] == "bfloat16"  # the paper recipe's choice, kept by :tiny
  evals = sorted((runs / "my_finetune" / "eval").glob("*.json"))
  assert [p.name for p in evals] == ["4.json"]  # 2 updates of 2 steps each
  finetune = json.loads(evals[0].read_text())
  assert set(finetune) == {"my_test"} and finetune["my_test"]["num_videos"] == 16
  copied = sum(1 for p in (runs / "local" / "my_data").rglob("*") if p.is_file())

  _, again = _execute(work)
  assert "$ git clone" not in again and f"code in {clone} " in again
  assert f"data on local disk: 0 files copied (0.0 MiB), {copied} already there" in again
  assert f"resumed from {runs / 'demo'}" in again
  assert f"resumed from {runs / 'my_finetune'}" in again
  assert [p.name for p in sorted((runs / "my_finetune" / "eval").glob("*.json"))] == ["4.json"]


def test_notebook_outside_a_checkout_needs_the_repo_url(tmp_path, monkeypatch, compile_cache):
  _tiny_env(monkeypatch, tmp_path / "runs", compile_cache)
  work = tmp_path / "colab"
  work.mkdir()
  with pytest.raises(CellExecutionError, match="REPO_URL is not set"):
    _execute(work)
  assert list(work.iterdir()) == []  # nothing cloned
