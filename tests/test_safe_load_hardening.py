"""Crafted .pth files against the VindLU reader (issue 15) and what runs after it (issue
25, with Hugging Face folders): each is refused with the exact reason, naming the file,
writes nothing, and leaves later loads unchanged.

The files come from `benchmarks/crafted_checkpoints.py` (the suite measured there), built
here in a temporary folder, one test per file; only the 1.4 GB zip bomb is left to the
suite (the 64 MB one is the same class and builds in a fraction of the time).
"""

import os
import re
import sys

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not first: benchmarks/input_pipeline.py would shadow the input_pipeline package
# (in this process and in every process it spawns, which inherit sys.path).
sys.path.append(os.path.join(ROOT, "benchmarks"))

import crafted_checkpoints as crafted  # noqa: E402

from t2v2t_jax.checkpoints import vindlu  # noqa: E402
from t2v2t_jax.checkpoints.safe_torch_load import UnsafeCheckpointError, safe_torch_load  # noqa: E402

# Left to the suite: the 1.4 GB zip bomb and the 200,000-key file (seconds to build and
# read; the 64 MB bomb and test_import_hardening's capped list cover the same classes).
CASES = [c for c in crafted.all_cases() if c.name not in ("zip_bomb_1_4GB", "keys_200k")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An fp16 checkpoint and its values, loaded before any crafted file."""
  path = tmp_path_factory.mktemp("reference") / "fp16.pth"
  path.write_bytes(crafted.good_fp16())
  return path, {k: v.clone() for k, v in torch.load(path, weights_only=True)["model"].items()}


def test_the_suite_covers_every_class_of_the_issue():
  kinds = {c.kind for c in crafted.all_cases()}
  assert kinds == {"format", "shared", "memory", "keys", "after", "run_folder"}  # issues 15, 25
  assert len(crafted.all_cases()) >= 90


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_crafted_file_is_refused(case, tmp_path, reference, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a legacy loader would write its .patch file here
  path = crafted.write_case(case, str(tmp_path))
  path = tmp_path / os.path.basename(path)
  error, message = crafted.run_case(str(path), crafted.tiny_model_config(), case.run)

  assert error == case.error, message
  first = message.split("\n", 1)[0]
  assert re.search(case.match, first), first
  if case.error:
    assert str(path) in first
  if error == "UnsafeCheckpointError":
    assert "\n" not in message
  assert len(message) < 20_000  # error lists are capped (issue 25: 22.7 MB for 200k keys)
  assert sorted(os.listdir(tmp_path)) == [path.name]  # nothing written (no PWNED, no .patch)

  ref_path, want = reference
  later = safe_torch_load(ref_path)["model"]
  plain = torch.load(ref_path, weights_only=True)["model"]
  for key, value in want.items():
    assert torch.equal(later[key], value) and torch.equal(plain[key], value), key


def test_build_on_a_rebuild_function_changes_nothing(tmp_path):
  """The reproduced attack: BUILD on torch's fp16 rebuild function negated every later
  fp16 load. Refused, and the function is the one torch has."""
  import torch._utils as tu
  before = (tu._rebuild_tensor_v2.__code__, tu._rebuild_tensor_v2.__defaults__,
            dict(tu._rebuild_tensor_v2.__dict__))
  for name in ("build_dict_on_rebuild_v2", "build_slots_on_rebuild_v2"):
    case = next(c for c in CASES if c.name == name)
    path = tmp_path / f"{name}.pth"
    path.write_bytes(case.build(str(tmp_path)))
    with pytest.raises(UnsafeCheckpointError, match="which this file did not create"):
      safe_torch_load(path)
  assert (tu._rebuild_tensor_v2.__code__, tu._rebuild_tensor_v2.__defaults__,
          dict(tu._rebuild_tensor_v2.__dict__)) == before


def test_missing_file_is_not_found(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"missing\.pth: checkpoint not found"):
    safe_torch_load(tmp_path / "missing.pth")


def test_real_checkpoints_still_load(tmp_path):
  """What torch.save writes: tied and sliced views, parameters, fp16 / bf16 / int / bool,
  empty tensors, bytes, sets, Size, device, complex, a module's state dict with its
  `_metadata` (BUILD on an OrderedDict this file created), protocol 4."""
  base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
  module = torch.nn.Linear(3, 2)
  obj = {"tied": base, "tied_again": base, "row": base[1], "col": base[:, 2],
         "param": torch.nn.Parameter(torch.ones(2)), "half": base.half(),
         "bf16": base.bfloat16(), "long": torch.arange(3), "bool": torch.tensor([True, False]),
         "empty": torch.zeros(0, 5), "bytes": b"\x00\xff", "set": {1, 2},
         "size": torch.Size([2, 3]), "device": torch.device("cpu"), "complex": 1 + 2j,
         "module": module.state_dict()}
  for protocol in (2, 4):
    path = tmp_path / f"real{protocol}.pth"
    torch.save(obj, path, pickle_protocol=protocol)
    got = safe_torch_load(path)
    for key, value in obj.items():
      if isinstance(value, torch.Tensor):
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
      elif key != "module":
        assert got[key] == value, key
    assert got["tied"].untyped_storage().data_ptr() == got["tied_again"].untyped_storage().data_ptr()
    assert isinstance(got["param"], torch.nn.Parameter)
    assert got["module"]._metadata == module.state_dict()._metadata
    assert all(torch.equal(got["module"][k], v) for k, v in module.state_dict().items())


def test_vindlu_import_names_absent_layers_and_bad_weights():
  """import_vindlu on numpy state dicts (no file): every problem named, with its count."""
  state = dict(crafted._valid_state())
  state["vision_encoder.encoder.layer.5.temp_model.linear.bias"] = state["vision_proj.bias"]
  state["vision_proj.weight"] = state["vision_proj.weight"].astype("int64")
  state["temp"] = state["temp"] * float("nan")
  with pytest.raises(vindlu.VindluCheckpointError) as e:
    vindlu.import_vindlu(state, crafted.tiny_model_config(), source="x.pth")
  msg = str(e.value)
  assert msg.split("\n")[0] == (
      "cannot import x.pth (finetune naming) into the model: source key "
      "'vision_encoder.encoder.layer.5.temp_model.linear.bias' belongs to vision layer 5, "
      "which this model lacks (it has 2) (and 2 more, below)")
  assert "source key 'vision_proj.weight' has dtype int64 (weights must be floating point)" in msg
  assert "source key 'temp' holds 1 non-finite value(s) (NaN or inf) of 1" in msg
  assert msg.count("\n    ") == 3
