"""The program users run: recipes, main.py errors, and exact resume after SIGKILL."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from input_pipeline import synthetic
from t2v2t_jax import recipes
from t2v2t_jax.models.config import validate_model_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ["webvid_pretrain", "webvid_cc3m_pretrain", "msrvtt_ft", "didemo_ft", "anet_ft", "demo"]
MODES = ["v2t", "t2v2t", "t2v2t_naive", "joint"]


def load_recipe(name, arg=None):
  return recipes.load_recipe(os.path.join(REPO, "configs", f"{name}.py") + (f":{arg}" if arg else ""))


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
  root = tmp_path_factory.mktemp("synthetic")
  synthetic.generate_dataset(root, num_train=12, num_val=4, num_test=8, size=32, num_frames=8)
  return str(root)


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_with_paper_numbers(name):
  config = load_recipe(name)
  validate_model_config(config.model)
  assert config.optimizer.b1 == 0.9 and config.optimizer.b2 == 0.999
  assert config.optimizer.weight_decay == 0.02
  if name.endswith("pretrain"):
    assert (config.batch_size, config.num_frames, config.data.max_len) == (512, 4, 32)
    assert config.optimizer.lr == 1e-4 and config.loss_weights.mlm == 1.0
  elif name != "demo":
    assert config.num_frames == 12 and config.optimizer.lr == 1e-5
    assert config.loss_weights.mlm == 0.0
  if name == "anet_ft":
    assert config.eval.num_frames == 32 and config.data.max_len == 64


# Recipes whose `:tiny` configs are the same run as a trained one's (the corpora are
# replaced by the synthetic set), except for fields that cannot change a 2-step run.
SAME_TINY_RUN = {
    "webvid_cc3m_pretrain": ("webvid_pretrain", set()),
    # total_steps=2 fixes the schedule; VindLU's 1 GPU (VTC weight 1, not 1/4:
    # tests/test_vindlu_protocol.py) and the best epoch by val (didemo_ft.py:tiny trains
    # three epochs in tests/test_best_checkpoint.py).
    "didemo_ft": ("msrvtt_ft", {"optimizer.epochs", "vindlu_world_size", "best_key"}),
}
# Every distinct tiny run trains, and every fusion mode is covered by one of them.
TRAINED = [("webvid_pretrain", "v2t"), ("msrvtt_ft", "t2v2t"), ("anet_ft", "joint"),
           ("demo", "t2v2t_naive")]


def test_recipes_not_trained_here_are_tiny_runs_that_are():
  from t2v2t_jax.training import optimizer  # noqa: PLC0415
  from t2v2t_jax.tree_paths import flatten_config  # noqa: PLC0415
  assert {r for r, _ in TRAINED} | set(SAME_TINY_RUN) == set(RECIPES)
  assert {m for _, m in TRAINED} == set(MODES)
  for name, (trained, allowed) in SAME_TINY_RUN.items():
    config, twin = load_recipe(name, "tiny"), load_recipe(trained, "tiny")
    a, b = flatten_config(config), flatten_config(twin)
    assert {k for k in set(a) | set(b) if a.get(k) != b.get(k)} == allowed, name
    assert (optimizer.warmup_and_total_steps(config.optimizer, config.total_steps)
            == optimizer.warmup_and_total_steps(twin.optimizer, twin.total_steps))


@pytest.mark.parametrize("name", RECIPES)
def test_tiny_keeps_the_recipes_choices(name):
  full, tiny = load_recipe(name), load_recipe(name, "tiny")
  for field in ("dtype", "remat", "scan_layers", "attention_impl", "init_std", "temp_init"):
    assert tiny.model[field] == full.model[field], field
  assert tiny.model.fusion.to_dict() == full.model.fusion.to_dict()
  assert tiny.loss_weights.to_dict() == full.loss_weights.to_dict()
  assert tiny.model.vision.width == tiny.model.text.width == 32  # and sizes shrink
  assert tiny.model.vision.depth == 2 and tiny.model.vision.image_size == 32


@pytest.mark.parametrize("name,mode", TRAINED)
def test_tiny_recipe_trains_two_steps_and_evaluates(name, mode, synthetic_root, tmp_path):
  from t2v2t_jax.training import train  # noqa: PLC0415
  config = load_recipe(name, f"tiny,mode={mode}")
  config.data_root = synthetic_root
  results = train.train_and_evaluate(config, str(tmp_path))
  (corpus_results,) = results.values()
  assert corpus_results["num_frames"] == config.eval.num_frames
  for key in ("t2v_r1", "v2t_r1", "emb_t2v_r1", "t2v_medr"):
    assert np.isfinite(corpus_results[key]), key
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows if "loss" in r] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
  # A finite global gradient norm means every parameter's gradient is finite.
  assert all(np.isfinite(r["grad_norm"]) and r["grad_norm"] > 0 for r in rows if "loss" in r)
  assert os.path.isfile(tmp_path / "eval" / "2.json")


def run_main(*args, timeout=600):
  env = dict(os.environ, PYTHONPATH=REPO)
  return subprocess.run([sys.executable, os.path.join(REPO, "main.py"), *args], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def test_misspelt_override_fails_listing_valid_fields(tmp_path):
  t = time.time()
  proc = run_main("--config", "configs/msrvtt_ft.py:tiny", "--workdir", str(tmp_path),
                  "--config.optimizer.lrr=3e-5")
  assert proc.returncode != 0
  assert "optimizer has no field 'lrr'" in proc.stderr
  assert "min_lr" in proc.stderr and "warmup_epochs" in proc.stderr  # the valid fields
  assert time.time() - t < 60  # no compilation happened


def test_missing_annotation_file_fails_before_compiling(tmp_path):
  proc = run_main("--config", "configs/msrvtt_ft.py", "--workdir", str(tmp_path),
                  f"--config.data_root={tmp_path}/nowhere", "--config.allow_random_init=True")
  assert proc.returncode != 0
  assert f"{tmp_path}/nowhere/anno/msrvtt_ret_train9k.json" in proc.stderr
  assert "docs/data.md" in proc.stderr
  assert not os.path.exists(tmp_path / "checkpoints")


def test_finetuning_without_weights_refuses_at_once(tmp_path):
  """A fine-tuning recipe with neither init_from nor pretrained weights would fine-tune
  random BEiT and BERT weights for hours: one line, before any data check or compile."""
  for recipe in ("msrvtt_ft", "didemo_ft", "anet_ft"):
    t = time.time()
    proc = run_main("--config", f"configs/{recipe}.py", "--workdir", str(tmp_path / recipe),
                    f"--config.data_root={tmp_path}/nowhere")
    elapsed = time.time() - t
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FATAL: "), proc.stderr
    for way in ("--config.init_from=", "--config.pretrained.beit=", "--config.allow_random_init=True"):
      assert way in lines[0]
    assert "nowhere" not in proc.stderr  # refused before the data was looked at
    assert elapsed < 60, elapsed  # no compile, no data (about 4 s on an idle machine)
    assert not os.path.exists(tmp_path / recipe / "checkpoints")


def _final_params(workdir):
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"), item_names=("state", "data_iter"))
  step = manager.latest_step()
  state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
  manager.close()
  import jax  # noqa: PLC0415
  return step, jax.tree.leaves(state["params"])


def _batch_crcs(workdir):
  crcs = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    row = json.loads(line)
    if "data/batch_crc" in row:
      crcs.setdefault(row["step"], set()).add(row["data/batch_crc"])
  return crcs


def test_sigkill_then_rerun_resumes_exactly(synthetic_root, tmp_path):
  args = ["--config", "configs/webvid_pretrain.py:tiny", "--mode", "train",
          f"--config.data_root={synthetic_root}", "--config.total_steps=6",
          "--config.checkpoint_every=2", "--config.data.num_workers=2"]
  full = tmp_path / "uninterrupted"
  proc = run_main("--workdir", str(full), *args)
  assert proc.returncode == 0, proc.stderr[-3000:]

  killed = tmp_path / "killed"
  env = dict(os.environ, PYTHONPATH=REPO)
  p = subprocess.Popen([sys.executable, os.path.join(REPO, "main.py"), "--workdir", str(killed), *args],
                       env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       start_new_session=True)
  deadline = time.time() + 600
  # Kill once the step-2 checkpoint is committed (Orbax renames the temporary folder last).
  while time.time() < deadline and not glob.glob(str(killed / "checkpoints" / "2" / "state")):
    if p.poll() is not None:
      break
    time.sleep(0.2)
  assert p.poll() is None, "the run ended before it could be killed"
  os.killpg(p.pid, signal.SIGKILL)
  p.wait()
  assert not os.path.exists(killed / "checkpoints" / "6")

  proc = run_main("--workdir", str(killed), *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "resumed from" in proc.stdout and "other settings" not in proc.stdout

  step_full, params_full = _final_params(full)
  step_resumed, params_resumed = _final_params(killed)
  assert step_full == step_resumed == 6
  for a, b in zip(params_full, params_resumed):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Every step's batch of the resumed run (killed part included) equals the uninterrupted one.
  crc_full, crc_resumed = _batch_crcs(full), _batch_crcs(killed)
  assert sorted(crc_full) == list(range(1, 7))
  for step, crcs in crc_resumed.items():
    assert crcs == crc_full[step], step


def test_config_json_is_never_seen_half_written(tmp_path):
  """Multi-host: process 0 rewrites `config.json` as the others read it to compare (a
  resumed run); a reader must see the old or the new file whole, never an empty one."""
  import threading  # noqa: PLC0415
  from t2v2t_jax.training import workdir as workdir_lib  # noqa: PLC0415
  config = load_recipe("webvid_pretrain", "tiny")
  workdir_lib.save_config(config, str(tmp_path))
  stop, seen_bad = threading.Event(), []

  def writer():
    while not stop.is_set():
      workdir_lib.save_config(config, str(tmp_path))

  thread = threading.Thread(target=writer)
  thread.start()
  try:
    for _ in range(300):
      try:
        workdir_lib.warn_if_resuming_with_changes(config, str(tmp_path), resuming=True)
      except ValueError as e:   # json.JSONDecodeError: a file cut short
        seen_bad.append(e)
  finally:
    stop.set()
    thread.join()
  assert not seen_bad, f"{len(seen_bad)} of 300 reads saw a partial config.json: {seen_bad[0]}"
  assert not [f for f in os.listdir(tmp_path) if f != "config.json"]   # no temporary left


def test_resuming_with_changed_settings_names_them(tmp_path, capsys):
  from t2v2t_jax.training import workdir as workdir_lib  # noqa: PLC0415
  config = load_recipe("demo", "tiny")
  workdir_lib.save_config(config, str(tmp_path))
  # Resuming with the same settings says nothing.
  assert workdir_lib.warn_if_resuming_with_changes(config, str(tmp_path), resuming=True) == []
  # Where the processes meet is not a setting of the run.
  config.multihost.coordinator_address, config.multihost.process_id = "10.0.0.2:1234", 1
  assert workdir_lib.warn_if_resuming_with_changes(config, str(tmp_path), resuming=True) == []
  old_lr, config.optimizer.lr = config.optimizer.lr, 0.125
  config.model.fusion.mode = "v2t"
  # No checkpoint yet: a new run in the same folder says nothing, whatever changed.
  assert workdir_lib.warn_if_resuming_with_changes(config, str(tmp_path), resuming=False) == []
  assert capsys.readouterr().out == ""
  diffs = workdir_lib.warn_if_resuming_with_changes(config, str(tmp_path), resuming=True)
  assert diffs == [("model.fusion.mode", "t2v2t", "v2t"), ("optimizer.lr", old_lr, 0.125)]
  out = capsys.readouterr().out
  assert f"model.fusion.mode ('t2v2t' -> 'v2t'), optimizer.lr ({old_lr!r} -> 0.125)" in out
  assert str(tmp_path) in out and "--workdir" in out


def test_a_paper_size_model_on_the_cpu_is_warned_about():
  """`pip install -e .` gives the CPU jaxlib: a paper recipe must not train on it silently."""
  import jax  # noqa: PLC0415
  from configs import demo, msrvtt_ft  # noqa: PLC0415
  from t2v2t_jax.sharding import make_mesh  # noqa: PLC0415
  from t2v2t_jax.training import train  # noqa: PLC0415
  assert jax.default_backend() == "cpu"
  warning = train.cpu_warning(msrvtt_ft.get_config())
  assert warning and "paper-size model" in warning and '.[cuda]' in warning
  assert train.cpu_warning(msrvtt_ft.get_config("tiny")) is None
  assert train.cpu_warning(demo.get_config()) is None
  line = train.where_it_runs(make_mesh(msrvtt_ft.get_config("tiny").mesh))
  assert line.startswith(f"Running on {jax.device_count()} x cpu (cpu), mesh data=")


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=-0.5", "optimizer.lr=-0.5 is out of range: the peak learning rate must be a finite number in (0, inf]"),
    ("optimizer.lr=nan", "optimizer.lr=nan is out of range"),
    ("optimizer.grad_accum_steps=-2", "optimizer.grad_accum_steps=-2 must be an integer >= 1"),
    ("eval.num_frames=0", "eval.num_frames=0 must be an integer >= 1"),
    ("model.temp_min=0.9", "model.temp_min=0.9 <= model.temp_init=0.07 <= model.temp_max=0.5 must hold"),
    ("optimizer.warmup_epochs=1000", "optimizer.warmup_epochs=1000.0 must not exceed optimizer.epochs"),
    ("optimizer.b2=1.5", "optimizer.b2=1.5 is out of range: Adam's second-moment decay must be a finite number in [0, 1)"),
    ("batch_size=5", "batch_size=5 must be a multiple of the 2 devices"),
    ("data.num_workers=-1", "data.num_workers=-1 must be an integer >= 0"),
])
def test_nonsense_settings_are_refused_before_compiling(tmp_path, override, message):
  """Each numeric setting in one line, with its valid range, before any compile or data."""
  t = time.time()
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--config",
                         "configs/msrvtt_ft.py:tiny", "--workdir", str(tmp_path / "run"),
                         f"--config.data_root={tmp_path}/data", f"--config.{override}"],
                        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("FATAL: ") and message in lines[0], proc.stderr
  assert time.time() - t < 60
  assert not os.path.exists(tmp_path / "run" / "checkpoints")
  assert not os.path.exists(tmp_path / "data")  # refused before the synthetic data is written
