"""Anticipated bad input ends a command with one `FATAL: <file or field>: <reason>` line and
a non-zero status, never a traceback (issue #25): `main.py` before and during a mode's
run, `python -m t2v2t_jax.convert`, and the data command lines.

Each `main.py` / `convert` case is a real process (the status and stderr are what a user
sees), so there are few of them; the finer cases live beside their modules' tests.
"""

import json
import os
import subprocess
import sys

import pytest

from input_pipeline import prepare, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(args, tmp_path, timeout=240):
  env = dict(os.environ, PYTHONPATH=REPO, T2V2T_ANNOTATION_CACHE=str(tmp_path / "index"))
  return subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def assert_one_fatal_line(proc, *parts):
  """Status 2, no traceback, and one FATAL line (the last on stderr) holding `parts`."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  fatal = [line for line in proc.stderr.splitlines() if line.startswith("FATAL")]
  assert len(fatal) == 1 and proc.stderr.rstrip().endswith(fatal[0]), proc.stderr[-3000:]
  for part in parts:
    assert part in fatal[0], (part, fatal[0])
  return fatal[0]


def write_data(root, train_entries, vocab=None):
  """A data_root for a `:tiny` recipe: train.json, test.json and vocab.txt (no videos:
  every case here is refused before one is read)."""
  os.makedirs(root / "videos", exist_ok=True)
  (root / "train.json").write_text(json.dumps(train_entries))
  (root / "test.json").write_text(json.dumps(
      [{"video": f"videos/test_{i}.mp4", "caption": ["a red circle"]} for i in range(4)]))
  words = synthetic.vocabulary() if vocab is None else vocab
  (root / "vocab.txt").write_text("\n".join(words) + "\n")


def main_py(tmp_path, *overrides, mode="train"):
  return run(["main.py", "--config", "configs/msrvtt_ft.py:tiny", "--workdir",
              str(tmp_path / "run"), "--mode", mode, f"--config.data_root={tmp_path}/data",
              *overrides], tmp_path)


TRAIN = [{"video": f"videos/train_{i}.mp4", "caption": "a red circle moves left"}
         for i in range(8)]


def test_media_path_outside_the_root_is_one_line_before_any_work(tmp_path):
  write_data(tmp_path / "data", TRAIN[:1] + [{"video": "../outside.mp4", "caption": "x"}])
  proc = main_py(tmp_path)
  assert_one_fatal_line(proc, f"{tmp_path}/data/train.json: entry 1: 'video' '../outside.mp4' "
                              "leads outside the media root")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_vocab_without_mask_is_one_line_from_inside_the_run(tmp_path):
  """Refused where the run loads its tokenizer (inside `_run`, before compiling)."""
  vocab = [w for w in synthetic.vocabulary() if w != "[MASK]"]
  write_data(tmp_path / "data", TRAIN, vocab=vocab)
  proc = main_py(tmp_path)
  assert_one_fatal_line(proc, f"{tmp_path}/data/vocab.txt: the vocabulary has no [MASK] token")


def test_convert_refusals_are_one_line(tmp_path, capsys):
  bad = tmp_path / "model.pth"
  bad.write_bytes(b"\x80\x02 not a torch file" * 8)
  proc = run(["-m", "t2v2t_jax.convert", "vindlu", str(bad), str(tmp_path / "out")], tmp_path)
  assert_one_fatal_line(proc, f"{bad}: ")
  assert not os.path.exists(tmp_path / "out")
  # In this process too (cheaper): an export from a .pth, and from a folder that is not there.
  from t2v2t_jax import convert  # noqa: PLC0415
  for argv, words in ((["--to", "vindlu", str(bad), str(tmp_path / "o.pth")],
                       "export reads one of our checkpoint folders"),
                      (["--to", "vindlu", str(tmp_path / "none"), str(tmp_path / "o.pth")],
                       str(tmp_path / "none"))):
    assert convert.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("FATAL: ") and words in err and len(err.splitlines()) == 1, err


def test_convert_lets_a_bug_keep_its_traceback(monkeypatch):
  """Only anticipated errors become one line: a TypeError from the code is a bug."""
  from t2v2t_jax import convert  # noqa: PLC0415

  def broken(*args, **kwargs):
    raise TypeError("a bug")

  monkeypatch.setattr(convert, "orbax_to_vindlu", broken)
  with pytest.raises(TypeError, match="a bug"):
    convert.main(["--to", "vindlu", "somewhere", "out.pth"])


def test_prepare_command_line_refuses_a_bad_annotation_file(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("T2V2T_ANNOTATION_CACHE", str(tmp_path / "index"))
  anno = tmp_path / "anno.json"
  anno.write_text("[" * 20_000 + "]" * 20_000)
  with pytest.raises(SystemExit) as stop:
    prepare.main(["--name", "x", "--anno-file", str(anno), "--media-root", str(tmp_path),
                  "--out", str(tmp_path / "prepared")])
  assert stop.value.code == 2
  err = capsys.readouterr().err
  assert err == f"FATAL: {anno}: entry 0: nested too deeply to be an annotation entry " \
                f"(more than ~{sys.getrecursionlimit()} levels of JSON lists or objects)\n"
