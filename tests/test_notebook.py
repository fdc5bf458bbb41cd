"""notebooks/colab_tpu.ipynb runs top to bottom on CPU (tiny settings), so it cannot rot.

The notebook reads T2V2T_NOTEBOOK_TINY=1 (the tiniest model, 2 steps) and
T2V2T_NOTEBOOK_WORKDIR (outputs); it runs from the checkout, so its install cell finds the
package and its dependencies present and installs nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

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


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert not cell.outputs and cell.execution_count is None, cell.source[:80]


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, monkeypatch):
  monkeypatch.setenv("T2V2T_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("T2V2T_NOTEBOOK_WORKDIR", str(tmp_path))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", FAST_COMPILE)
  monkeypatch.delenv("T2V2T_MY_DATA", raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  NotebookClient(nb, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": str(REPO)}}).execute()
  text = "\n".join(_text_outputs(cell) for cell in nb.cells if cell.cell_type == "code")

  assert "dependencies already present" in text  # ran from the checkout, installed nothing
  assert "cpu " in text  # the accelerator probe ran in its own process
  # The demo trained, evaluated, and its table was shown.
  demo = json.loads((tmp_path / "demo" / "eval" / "2.json").read_text())
  assert demo["synthetic_test"]["num_frames"] == 2
  assert "synthetic_test" in text and "text->video" in text
  # The fine-tune started from the demo's weights, on the example folder, and evaluated.
  assert "initialised from" in text and str(tmp_path / "demo") in text
  finetune = json.loads((tmp_path / "my_finetune" / "eval" / "2.json").read_text())
  assert set(finetune) == {"my_test"} and finetune["my_test"]["num_videos"] == 16
  assert os.path.isfile(tmp_path / "my_recipe.py")
  # The user's folder got no synthetic dataset written into it.
  assert not os.path.exists(tmp_path / "my_data" / "train.json")
