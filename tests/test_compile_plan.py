"""The TPU fit planner (`--mode compile`): compiles the tiny recipe for real TPU
topologies with libtpu on this CPU host, and the batch search against a known line."""

import importlib.util
import subprocess
import sys

import pytest

from configs import webvid_pretrain
from t2v2t_jax.training import compile_plan, tpu_topology

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]'); CI installs it")
GIB = 2 ** 30


def tiny_config(topology):
  c = webvid_pretrain.get_config("tiny")
  c.compile.topology = topology
  return c


@needs_libtpu
def test_tiny_recipe_compiles_for_one_v5e_chip(monkeypatch):
  config = tiny_config("v5e:1x1")
  lines = []
  # Every program is the one a TPU traces: the portable GELU (erfc), not this CPU's form.
  traced = []
  real_report = compile_plan._compiled_report
  def report(name, batch, lowered, *rest, **kw):
    traced.append((name, "erfc" in lowered.as_text()))
    return real_report(name, batch, lowered, *rest, **kw)
  monkeypatch.setattr(compile_plan, "_compiled_report", report)
  result = compile_plan.plan(config, log=lines.append)
  assert traced and all(has_erfc for _, has_erfc in traced), traced
  text = "\n".join(lines)
  assert result["chips"] == 1 and result["device_kind"] == "TPU v5 lite"
  assert result["hbm_bytes"] == 16 * GIB and result["usable_hbm_bytes"] == int(15.75 * GIB)
  names = [p["name"] for p in result["programs"]]
  assert names[0].startswith("train step") and any("rerank scorer" in n for n in names)
  assert any("video encoder" in n for n in names) and any("text encoder" in n for n in names)
  train = result["programs"][0]
  assert train["compiled"] and train["batch_per_device"] == config.batch_size
  assert 0 < train["params_bytes"] < train["total_bytes"] < GIB
  # Adam keeps two moments per parameter (float32), plus a step count.
  assert 2 * train["params_bytes"] <= train["opt_state_bytes"] < 2 * train["params_bytes"] + 1024
  assert train["flops_per_device"] > 0
  for column in ("params", "opt st", "temps", "total", "fits 15.75 GiB", "TFLOP/dev", "compile s"):
    assert column in text
  rows = [line for line in text.splitlines()
          if line.startswith(("train step", "video encoder", "text encoder", "rerank scorer"))]
  assert len(rows) == 4 and all(" yes " in row and " NO " not in row for row in rows), rows
  # Each program's census follows the table, with the roofline on the v5e.
  census = train["census"]
  assert census["chip"] == "v5e" and census["hlo"]["kernels"] > 0
  assert census["hlo"]["matmul_flops"] > 0 and census["roofline"]["roofline_s"] > 0
  assert census["memory"]["total_bytes"] == train["total_bytes"]
  assert text.count("HLO census of ") == 4 and "roofline on TPU v5e" in text


def test_table_says_why_a_program_does_not_fit():
  gib = compile_plan.GIB
  report = lambda name, temp, total, compiled, params=gib: compile_plan.ProgramReport(
      name, 8, params, 2 * gib, int(temp * gib), int(total * gib), None, 1.0, compiled=compiled)
  text = compile_plan.format_table([
      report("refused step", 19.84, 22.5, False),
      report("refused encoder", 26.0, 26.0, False, params=0),
      report("over", 15.0, 16.6, True),
      report("fits", 12.0, 15.6, True)], 16 * gib)
  rows = {line.split("  ")[0]: line for line in text.splitlines()[2:6]}
  # A refusal's figure is where the compiler stopped: shown as temps, never as a total.
  assert "NO (refused)" in rows["refused step"] and "22.50" not in rows["refused step"]
  assert "19.84" in rows["refused step"]
  assert rows["refused encoder"].split()[3] == "-"          # its parameters are unknown
  assert "NO (total)" in rows["over"] and "16.60" in rows["over"]
  assert " yes " in rows["fits"]


@needs_libtpu
def test_four_chips_with_fsdp_shard_the_state():
  config = tiny_config("v5e:2x2")
  config.mesh.fsdp = 2
  config.mesh.fsdp_min_size = 1   # the tiny model's matrices are small: shard them all
  config.compile.eval_programs = False
  devices = tpu_topology.topology_devices("v5e:2x2")
  assert len(devices) == 4
  replicated = tiny_config("v5e:2x2")
  full = compile_plan.Planner(replicated, devices).params_bytes
  planner = compile_plan.Planner(config, devices)
  assert dict(planner.mesh.shape) == {"data": 2, "fsdp": 2}
  # Every matrix is split in two; only vectors whose length is odd stay whole.
  assert full / 2 <= planner.params_bytes < 0.6 * full
  report = planner.train_step(config.batch_size // 4)
  assert report.compiled and report.fits(planner.capacity)


@needs_libtpu
def test_one_device_per_chip_as_training_sees_them():
  # libtpu describes v4's two TensorCores per chip as two devices unless asked for the
  # megacore chip configuration, which is what a JAX run on a v4 uses.
  for name, chips, kind in (("v4:2x2x1", 4, "TPU v4"), ("v5e:2x4", 8, "TPU v5 lite"),
                            ("v6e:1x1", 1, "TPU v6 lite")):
    devices = tpu_topology.topology_devices(name)
    assert len(devices) == chips and devices[0].device_kind == kind, name
    assert len({tuple(d.coords) for d in devices}) == chips
    nominal, usable = tpu_topology.hbm_bytes(devices[0]), tpu_topology.usable_hbm_bytes(devices[0])
    # libtpu's own figure (what it names when it refuses a program): it keeps 0.25 GiB of a
    # v5e's 16, more of a v4's or v6e's 32 (1.25 and 0.75 with libtpu 0.0.42).
    if kind == "TPU v5 lite":
      assert usable == int(15.75 * GIB)
    else:
      assert nominal - 2 * GIB <= usable < nominal - 0.25 * GIB, (name, usable / GIB)


@needs_libtpu
def test_errors_are_one_line_and_say_what_to_do():
  with pytest.raises(tpu_topology.TopologyError, match="unknown TPU topology 'v5e-8'"):
    tpu_topology.topology_devices("v5e-8")
  config = tiny_config("v5e:2x2")
  config.batch_size = 6
  with pytest.raises(ValueError, match="batch_size=6 does not divide over the 4 chips"):
    compile_plan.plan(config, log=lambda s: None)


def test_missing_libtpu_names_the_install_command(monkeypatch):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name == "libtpu" else real(name, *a))
  with pytest.raises(tpu_topology.TopologyError, match=r'pip install -e "\.\[tpu\]"'):
    tpu_topology.topology_devices("v5e:1x1")


def test_main_compile_mode_without_topology_fails_at_once():
  out = subprocess.run([sys.executable, "main.py", "--config", "configs/webvid_pretrain.py:tiny",
                        "--mode", "compile"], capture_output=True, text=True, timeout=120)
  assert out.returncode == 2
  assert "--mode compile needs --config.compile.topology" in out.stderr
  assert "Traceback" not in out.stderr


def test_out_of_memory_messages_are_parsed():
  msg = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
         "temporaries (18.26G) exceeds available HBM (15.75G).")
  need, have = tpu_topology.parse_out_of_memory(msg)
  assert need == int(18.26 * GIB) and have == int(15.75 * GIB)
  need, have = tpu_topology.parse_out_of_memory("Used 20.50G of 15.75G hbm. Exceeded by 4.75G")
  assert need == int(20.5 * GIB) and have == int(15.75 * GIB)
  assert tpu_topology.parse_out_of_memory("INTERNAL: something else") is None


class LinearPlanner(compile_plan.Planner):
  """A planner whose 'compiles' follow a known memory line (no XLA), counting compiles."""

  def __init__(self, fixed, per_sample, capacity, refuse_above=None):
    self.fixed, self.per_sample, self.capacity = fixed, per_sample, capacity
    self.refuse_above = refuse_above
    self.compiled = []

  def train_step(self, b):
    self.compiled.append(b)
    total = self.fixed + self.per_sample * b
    refused = self.refuse_above is not None and total > self.refuse_above
    return compile_plan.ProgramReport("train", b, 0, 0, total, total, 1.0, 0.0,
                                      compiled=not refused)


@pytest.mark.parametrize("fixed, per_sample, start", [
    (3.0, 0.2, 64),    # the recipe's batch does not fit: search down
    (3.0, 0.2, 8),     # it fits: search up
    (1.0, 0.01, 4),    # far more fits than the start: growth is bounded per compile
])
def test_batch_search_finds_the_largest_fitting_batch(fixed, per_sample, start):
  cap = 16 * GIB
  p = LinearPlanner(fixed * GIB, per_sample * GIB, cap, refuse_above=15.75 * GIB)
  best = p.find_max_batch({start: p.train_step(start)}, log=lambda s: None, max_compiles=12)
  # The largest b with fixed + per_sample * b <= 15.75 GiB (the compiler's refusal limit).
  expected = min(1024, int((15.75 - fixed) / per_sample + 1e-9))
  assert best == expected
  assert len(p.compiled) <= 14


def test_batch_search_reports_none_when_nothing_fits():
  p = LinearPlanner(20 * GIB, 0.1 * GIB, 16 * GIB)
  assert p.find_max_batch({4: p.train_step(4)}, log=lambda s: None) is None


@needs_libtpu
def test_the_planned_step_takes_the_recipes_objective(monkeypatch):
  """The planner compiles the step training runs: the recipe's protocol ('vindlu': VTM
  negatives per group of the poster's per-GPU batch, VTC weighted 1/W; until 2026-12-06 it
  compiled negatives from the whole batch, which all-gathers every clip's video tokens to
  every chip). A candidate batch of the batch search that the groups do not divide takes
  negatives from the whole batch."""
  from t2v2t_jax.training import train_step as step_lib  # noqa: PLC0415

  class Stop(Exception):
    pass

  seen = []

  def record(*args, **kwargs):
    seen.append(kwargs)
    raise Stop   # the arguments are what is checked: nothing is compiled

  monkeypatch.setattr(step_lib, "make_train_step", record)
  devices = tpu_topology.topology_devices("v5e:2x4")
  for gpu_batch, per_chip, groups in ((4, 4, 8), (16, 4, 2), (16, 3, 1)):
    config = tiny_config("v5e:2x4")
    config.vindlu_gpu_batch = gpu_batch
    config.batch_size = 8 * 4
    with pytest.raises(Stop):
      compile_plan.Planner(config, devices).train_step(per_chip)
    assert seen[-1]["negative_groups"] == groups, (gpu_batch, per_chip, seen[-1])
    assert seen[-1]["mlm_groups"] == groups
  assert seen[0]["loss_weights"]["vtc"] == pytest.approx(1 / config.vindlu_world_size)
  # The recipe's own batch is never quietly changed: one the groups do not divide is refused.
  config = tiny_config("v5e:2x4")
  config.vindlu_gpu_batch, config.batch_size = 16, 24
  with pytest.raises(ValueError, match="not a multiple"):
    compile_plan.Planner(config, devices).train_step(3)
