"""Resume from damaged checkpoints, earlier runs without checkpoints, run settings checked
before any work, and the bad-data counts saved with the data iterator (issue 15)."""

import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from input_pipeline import bad_data
from t2v2t_jax.checkpoints import run_checkpoints
from t2v2t_jax.checkpoints.run_checkpoints import Checkpointer, NoUsableCheckpointError
from t2v2t_jax.training import config_checks
from t2v2t_jax.training import workdir as workdir_lib


def _state(step):
  return {"params": {"w": jnp.arange(1000.0).reshape(10, 100) + step, "b": jnp.ones(7) * step},
          "step": jnp.int32(step)}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))


def _tracked():
  it = iter(grain.MapDataset.range(100).map(lambda i: {
      "i": np.int32(i), "decode_failures": np.int32(i % 3 == 0),
      "failure_log": bad_data.encode_failure_log(
          [bad_data.Failure("missing", f"v{i}.mp4", "file not found")] if i % 3 == 0 else [])
  }).to_iter_dataset())
  return bad_data.TrackedIterator(it, bad_data.FailureTracker(failure_fraction=0.9, min_samples=1))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """A workdir with steps 2 and 4: state, data iterator (2 and 4 items drawn), counts."""
  root = tmp_path_factory.mktemp("saved")
  ckpt = Checkpointer(str(root / "checkpoints"), max_to_keep=3)
  it = _tracked()
  for step in (2, 4):
    next(it), next(it)
    ckpt.save(step, _state(step), it)
  ckpt.close()
  return root


def _biggest(step_dir):
  files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])


def _flip(path):
  with open(path, "rb") as f:
    data = bytearray(f.read())
  data[len(data) // 2] ^= 0xFF
  with open(path, "wb") as f:
    f.write(data)


def _empty(step_dir):
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


DAMAGE = {
    "manifest_deleted": (lambda d: os.remove(os.path.join(d, "state", "manifest.ocdbt")),
                         "state/manifest.ocdbt is missing"),
    "file_truncated": (lambda d: _truncate(_biggest(d)), "were written (truncated or overwritten)"),
    "bits_flipped": (lambda d: _flip(_biggest(d)), "does not match its checksum"),
    "empty_step_folder": (_empty, "the step folder is empty"),
    "data_iterator_missing": (lambda d: shutil.rmtree(os.path.join(d, "data_iter")),
                              "data_iter/process_0-of-1.json is missing"),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_latest_step_resumes_from_the_previous_one(kind, saved, tmp_path, capsys):
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  damage, reason = DAMAGE[kind]
  damage(str(work / "checkpoints" / "4"))

  ckpt = Checkpointer(str(work / "checkpoints"), quarantine=True)
  assert ckpt.latest_step() == 2
  out = capsys.readouterr().out
  assert f"Warning: checkpoint step 4 in {work / 'checkpoints'} is damaged: " in out
  assert reason in out and f"moved to {work / 'checkpoints_damaged' / '4'}" in out
  assert ckpt.all_steps() == [2] and os.path.isdir(work / "checkpoints_damaged" / "4")

  it = _tracked()
  state = ckpt.restore(2, ABSTRACT, it)
  assert ckpt.restored_step == 2 and int(state["step"]) == 2
  np.testing.assert_array_equal(state["params"]["b"], np.full(7, 2.0))
  assert int(next(it)["i"]) == 2  # the iterator continues after the 2 items of step 2
  # The bad-data counts of step 2 (items 0 and 1: item 0 failed) came back with it.
  assert (it.failures.samples, it.failures.failures) == (3, 1)  # + item 2, which did not fail
  # The run can save step 4 again.
  assert ckpt.save(4, _state(4), it)
  ckpt.close()
  assert run_checkpoints.check_step(str(work / "checkpoints" / "4"), data_iter=True) is None


# Orbax leaves the coroutines of the failed read behind; Python reports them when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_step_without_record_that_fails_to_restore_falls_back(saved, tmp_path, capsys):
  """A run killed before writing a step's record: the structural checks pass, the restore
  fails, and the step before is used."""
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  step4 = work / "checkpoints" / "4"
  os.remove(step4 / run_checkpoints.INTEGRITY_FILE)
  _truncate(_biggest(str(step4)))
  ckpt = Checkpointer(str(work / "checkpoints"), quarantine=True)
  assert ckpt.latest_step() == 4  # nothing shows until it is read
  state = ckpt.restore(4, ABSTRACT, _tracked())
  assert ckpt.restored_step == 2 and int(state["step"]) == 2
  assert "checkpoint step 4" in capsys.readouterr().out and "restoring it failed" in ckpt.damaged[4]
  ckpt.close()


def test_no_usable_step_and_an_earlier_run_refuse_to_start(saved, tmp_path):
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  for step in ("2", "4"):
    _empty(str(work / "checkpoints" / step))
  (work / "metrics.jsonl").write_text(json.dumps({"step": 4, "loss": 1.0}) + "\n")
  ckpt = Checkpointer(str(work / "checkpoints"), quarantine=True)
  assert ckpt.latest_step() is None and sorted(ckpt.damaged) == [2, 4]

  from configs import demo
  config = demo.get_config("tiny")
  with pytest.raises(NoUsableCheckpointError) as e:
    workdir_lib.check_start_from_scratch(config, str(work), ckpt.damaged)
  assert str(e.value).startswith(
      f"{work} holds an earlier run (metrics.jsonl, checkpoints_damaged/, damaged checkpoint "
      "step(s) 2, 4) but no usable checkpoint to resume from; refusing to start from scratch")
  assert "--config.start_over=True" in str(e.value)

  config.start_over = True
  (work / "config.json").write_text("{}")
  workdir_lib.check_start_from_scratch(config, str(work), ckpt.damaged)
  assert sorted(os.listdir(work / "previous_runs" / "1")) == ["config.json", "metrics.jsonl"]
  assert not (work / "metrics.jsonl").exists()


def test_an_earlier_run_without_checkpoints_is_refused_before_any_work(tmp_path):
  """What used to start "from scratch" without a word and append to the old metrics."""
  from configs import demo
  from t2v2t_jax.training import train
  (tmp_path / "config.json").write_text("{}")
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.0}) + "\n")
  config = demo.get_config("tiny")
  config.data_root = str(tmp_path / "no_data_needed")  # fails before the data is opened
  with pytest.raises(NoUsableCheckpointError, match=r"holds an earlier run \(metrics\.jsonl\)"):
    train.train_and_evaluate(config, str(tmp_path))
  assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_evaluation_rows_alone_are_not_an_earlier_run(tmp_path):
  """A zero-shot `--mode eval` in the folder before training logs no training step."""
  from configs import demo
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/x/t2v_r1": 1.0}) + "\n")
  (tmp_path / "config.json").write_text("{}")
  workdir_lib.check_start_from_scratch(demo.get_config("tiny"), str(tmp_path))
  assert (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "previous_runs").exists()


@pytest.mark.parametrize("field,value,message", [
    ("log_every", 0, r"log_every=0 must be an integer >= 1 \(a number of steps\)"),
    ("checkpoint_every", 0, r"checkpoint_every=0 must be an integer >= 1"),
    ("keep_checkpoints", 0, r"keep_checkpoints=0 must be an integer >= 1 \(the number of latest "
                            r"checkpoints kept: 0 would delete every one, the final one included\)"),
    ("eval_every", -1, r"eval_every=-1 must be an integer >= 0"),
])
def test_bad_intervals_fail_before_any_work(field, value, message):
  from configs import demo
  config = demo.get_config("tiny")
  config[field] = value
  with pytest.raises(ValueError, match=message):
    config_checks.check_run_settings(config)


@pytest.mark.parametrize("source", ["/missing/file.pth", "/missing/run"])
def test_missing_init_from_is_not_found_at_once(source):
  from configs import demo
  config = demo.get_config("tiny")
  config.init_from = source
  with pytest.raises(FileNotFoundError, match=rf"init_from='{source}' not found: no such "):
    config_checks.check_run_settings(config, "eval")


def test_bad_data_counts_survive_a_resume(tmp_path):
  """The failure fraction is checked on the counts of the whole run, not from zero."""
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  it = _tracked()
  for _ in range(6):
    next(it)
  before = it.failures.get_state()
  assert before["failures"] == 2 and before["by_reason"] == {"missing": 2}
  ckpt.save(6, _state(6), it)
  ckpt.close()

  resumed = _tracked()
  # Counted from zero, the next read (1 of 2 failed) would be below min_samples; counted
  # with the restored 2 of 8 reads, it makes 3 of 10 > 25%.
  resumed.failures.failure_fraction, resumed.failures.min_samples = 0.25, 9
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  ckpt.restore(ckpt.latest_step(), ABSTRACT, resumed)
  assert resumed.failures.get_state() == before
  with pytest.raises(bad_data.DataFailureError, match=r"3 of 10 sample reads failed"):
    next(resumed)  # item 6 fails
  ckpt.close()


def test_a_run_whose_latest_step_is_truncated_resumes_from_the_step_before(tmp_path, capsys):
  """The whole training program: the warning names the damaged step, training resumes from
  the one before and saves the damaged step's number again."""
  from configs import demo
  from input_pipeline import synthetic
  from t2v2t_jax.training import train
  synthetic.generate_dataset(tmp_path / "data", num_train=8, num_val=4, num_test=4, size=32,
                             num_frames=8)
  config = demo.get_config("tiny")
  config.data_root = str(tmp_path / "data")
  config.total_steps, config.checkpoint_every = 2, 1
  work = tmp_path / "run"
  train.train_and_evaluate(config, str(work), evaluate_at_end=False)
  first = [json.loads(line) for line in open(work / "metrics.jsonl")]
  _truncate(_biggest(str(work / "checkpoints" / "2")))
  capsys.readouterr()

  train.train_and_evaluate(config, str(work), evaluate_at_end=False)
  out = capsys.readouterr().out
  assert f"Warning: checkpoint step 2 in {work / 'checkpoints'} is damaged: state/" in out
  assert f"Starting at step 1/2 (resumed from {work / 'checkpoints' / '1'})" in out
  assert sorted(os.listdir(work / "checkpoints")) == ["1", "2"]
  assert os.listdir(work / "checkpoints_damaged") == ["2"]
  # Step 2 was redone: its row is replaced, not duplicated (issue 25).
  again = [json.loads(line) for line in open(work / "metrics.jsonl")]
  assert [r["step"] for r in again] == [1, 2]
  assert again[0] == first[0]  # the kept row, as written
  assert again[1]["loss"] == first[1]["loss"]  # step 2 again, with the same batch and state
  assert again[1]["time"] > first[1]["time"]


# -- issue 25: records of another form, missing or empty; step folders that lie ----------------

WRONG_RECORDS = {
    "a_list": "[]",
    "files_a_list": json.dumps({"format": 2, "files": [1, 2]}),
    "entry_a_string": json.dumps({"format": 2, "files": {"state/_METADATA": "abc"}}),
    "format_a_string": json.dumps({"format": "2", "files": {}}),
    "empty_files": json.dumps({"format": 2, "checksum": "crc32c", "files": {}}),
}


@pytest.mark.parametrize("kind", WRONG_RECORDS)
def test_a_record_of_another_form_makes_the_step_unverified_not_a_crash(kind, saved, tmp_path,
                                                                         capsys):
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  (work / "checkpoints" / "4" / run_checkpoints.INTEGRITY_FILE).write_text(WRONG_RECORDS[kind])
  ckpt = Checkpointer(str(work / "checkpoints"), quarantine=True)
  assert ckpt.latest_step() == 4  # the data is intact: usable, with a warning
  out = capsys.readouterr().out
  assert f"Warning: checkpoint step 4 in {work / 'checkpoints'} is unverified: its " \
         "integrity.json " in out
  state = ckpt.restore(4, ABSTRACT, _tracked())
  assert ckpt.restored_step == 4 and int(state["step"]) == 4
  ckpt.close()


# Orbax leaves the coroutines of the failed read behind; Python reports them when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("record", ["deleted", "empty_files", "wrong_form"])
def test_an_unverified_step_whose_data_changed_is_damaged(record, saved, tmp_path, capsys):
  """What used to make a damaged step acceptable: the record deleted or emptied. Without
  a record a changed value byte cannot be found (Orbax's value files carry no checksum of
  their own), but a cut file fails the restore, and that is damage, as on resume."""
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  step4 = work / "checkpoints" / "4"
  path = step4 / run_checkpoints.INTEGRITY_FILE
  if record == "deleted":
    os.remove(path)
  else:
    path.write_text(WRONG_RECORDS["empty_files" if record == "empty_files" else "files_a_list"])
  _truncate(_biggest(str(step4)))
  ckpt = Checkpointer(str(work / "checkpoints"), quarantine=True)
  assert ckpt.latest_step() == 4
  assert "is unverified" in capsys.readouterr().out
  state = ckpt.restore(4, ABSTRACT, _tracked())
  assert ckpt.restored_step == 2 and int(state["step"]) == 2
  assert "restoring it failed" in ckpt.damaged[4]
  np.testing.assert_array_equal(state["params"]["b"], np.full(7, 2.0))
  ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("with_record", [True, False])
def test_a_step_folder_holding_another_steps_checkpoint_is_damaged(with_record, saved, tmp_path,
                                                                   capsys):
  """Step 2's folder copied over step 4: a run "resumed from .../4" would start at 2."""
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  ckpts = work / "checkpoints"
  shutil.rmtree(ckpts / "4")
  shutil.copytree(ckpts / "2", ckpts / "4")
  if not with_record:
    os.remove(ckpts / "4" / run_checkpoints.INTEGRITY_FILE)
  ckpt = Checkpointer(str(ckpts), quarantine=True)
  if with_record:  # the record names its step: found before anything is read
    assert ckpt.latest_step() == 2
    assert "integrity.json is step 2's: the folder holds another step's checkpoint" \
        in ckpt.damaged[4]
  else:  # the restored state names its step
    assert ckpt.latest_step() == 4
    state = ckpt.restore(4, ABSTRACT, _tracked())
    assert ckpt.restored_step == 2 and int(state["step"]) == 2
    assert "its state is step 2's, not step 4's" in ckpt.damaged[4]
  assert "checkpoint step 4" in capsys.readouterr().out
  ckpt.close()
  # Evaluation (parameters only) does not report step-2 weights as step 4 either.
  if not with_record:
    shutil.rmtree(work / "checkpoints_damaged")  # step 4 was moved there
    shutil.copytree(ckpts / "2", ckpts / "4")
    os.remove(ckpts / "4" / run_checkpoints.INTEGRITY_FILE)
    ckpt = Checkpointer(str(ckpts))
    params = ckpt.restore_params(ckpt.latest_step(data_iter=False), ABSTRACT["params"])
    assert ckpt.restored_step == 2 and "its state is step 2's" in ckpt.damaged[4]
    np.testing.assert_array_equal(params["b"], np.full(7, 2.0))
    ckpt.close()


def test_a_step_is_listed_and_checksummed_once(saved, tmp_path, monkeypatch):
  """check_step listed a step twice (two GCS listings), and evaluation checked the best
  step's checksums again after the latest-step search had checked them."""
  from t2v2t_jax import storage
  work = tmp_path / "run"
  shutil.copytree(saved, work)
  calls = {"list_files": 0, "files_with_checksums": 0}
  for name in calls:
    real = getattr(storage, name)
    def counted(*a, _real=real, _name=name, **k):
      calls[_name] += 1
      return _real(*a, **k)
    monkeypatch.setattr(storage, name, counted)
  assert run_checkpoints.check_step(str(work / "checkpoints" / "4"), data_iter=True) is None
  # One walk of the folder (inside files_with_checksums), one read of each file.
  assert calls == {"list_files": 1, "files_with_checksums": 1}
  ckpt = Checkpointer(str(work / "checkpoints"))
  assert ckpt.latest_step(data_iter=False) == 4
  assert ckpt.check(4) is None and ckpt.check(4) is None  # cached: no second read
  assert calls == {"list_files": 2, "files_with_checksums": 2}
  ckpt.close()
