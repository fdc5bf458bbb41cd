"""json_input.read_json: one reader, one refusal per kind of bad file, each naming it."""

import pytest

from t2v2t_jax.errors import Refusal
from t2v2t_jax.json_input import read_json


class OwnError(Refusal):
  pass


@pytest.mark.parametrize("content, message", [
    (None, "file not found"),
    (b"{", "not valid JSON"),
    (b"\xff\xfe{}", "not UTF-8 text"),
    (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
    (b'{"a": "' + b"x" * 100 + b'"}', "more than the 64 bytes a test file may have"),
])
def test_each_bad_file_is_one_refusal_naming_it(tmp_path, content, message):
  path = tmp_path / "f.json"
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(OwnError, match=f"^{path}: {message}"):
    read_json(str(path), error=OwnError, max_bytes=64 if "more than" in message else None,
              what="a test file")


def test_values_and_the_cap_reads_no_more_than_it_allows(tmp_path):
  path = tmp_path / "ok.json"
  path.write_text('{"a": [1, 2.5, "\\u00e9"]}', encoding="utf-8")
  assert read_json(path) == {"a": [1, 2.5, "\u00e9"]}              # a pathlib path too
  assert read_json(str(path), max_bytes=path.stat().st_size) == {"a": [1, 2.5, "\u00e9"]}
  with pytest.raises(Refusal, match="more than the 10 bytes"):
    read_json(str(path), max_bytes=10)
