"""docs/config_reference.md is what `python -m t2v2t_jax.config_reference` prints, and every
config field has a description."""

from __future__ import annotations

import textwrap
from pathlib import Path

from t2v2t_jax import config_reference

DOC = Path(__file__).resolve().parents[1] / "docs" / "config_reference.md"


def test_every_field_is_described():
  assert config_reference.missing_descriptions() == []


def test_doc_is_current():
  expected = config_reference.render()
  assert DOC.read_text() == expected, (
      "docs/config_reference.md is out of date: run "
      "`python -m t2v2t_jax.config_reference > docs/config_reference.md`")


def test_every_field_and_recipe_is_on_the_page():
  fields, _ = config_reference.field_table()
  page = DOC.read_text()
  for field in fields:
    assert f"| `{field}` |" in page, field
  for recipe in config_reference.RECIPES:
    assert f"### `configs/{recipe}.py`" in page, recipe


def test_trailing_comments_are_read(tmp_path):
  source = tmp_path / "example.py"
  source.write_text(textwrap.dedent('''
      def make():
        c = Config()
        c.lr = 1e-4        # peak learning rate
        c.inner.size = (1,
                        2)  # spans two lines
        # a comment on its own line describes nothing
        c.plain = 3
        return c
      '''))
  assert config_reference.assignment_comments(source, "make", "opt.") == {
      "opt.lr": "peak learning rate", "opt.inner.size": "spans two lines"}


def test_docstring_field_lists_are_read():
  doc = "Intro.\n\nFields:\n\n  alpha    the first\n           continued.\n  beta     second\n\nAfter."
  assert config_reference.docstring_fields(doc, "Fields:", "x.") == {
      "x.alpha": "the first continued.", "x.beta": "second"}
