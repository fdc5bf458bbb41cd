"""The one exception type for refusals the project anticipates.

A `Refusal` is bad input that the code recognised: a damaged checkpoint, a weight file of
the wrong shape, an annotation entry that points outside the media root, a nonsense
setting. `main.py` and `convert` print it as one line, `FATAL: <message>`, and exit with a
non-zero status; anything else that escapes is a bug and keeps its traceback.

The message should start with the file or field it is about, then say what is wrong and,
where there is one, what to do: `FATAL: runs/x/checkpoints/10: integrity.json does not
match (state/d/abc...); resume falls back to step 8`.

It subclasses ValueError so that callers (and tests) that caught ValueError keep working.
"""
from __future__ import annotations

from collections.abc import Iterable

# Error lists longer than this are cut: a 200,000-key checkpoint must not print 22 MB.
MAX_LISTED = 20


class Refusal(ValueError):
  """Input the project recognised as unusable; printed as one `FATAL:` line."""


def capped_list(items: Iterable[object], limit: int = MAX_LISTED, sep: str = ", ") -> str:
  """`a, b, c ... and 1,234 more`: the first `limit` items, then a count of the rest."""
  shown, extra = [], 0
  for item in items:
    if len(shown) < limit:
      shown.append(str(item))
    else:
      extra += 1
  text = sep.join(shown)
  return f"{text} ... and {extra:,} more" if extra else text


def one_line(message: object) -> str:
  """A message folded onto one line (newlines would break `FATAL:` grepping)."""
  return " ".join(str(message).split())


# Errors the project raises for input it recognised as unusable that are not `Refusal`s
# (they derive from RuntimeError or carry other meaning): (module, class). Looked up in
# `sys.modules` only when an exception reaches a command's top level: a class whose module
# was never imported cannot have been raised, and importing them up front would load JAX
# and torch for `--help`.
_OTHER_ANTICIPATED = (
    ("t2v2t_jax.checkpoints.run_checkpoints", "StepMismatchError"),
    ("t2v2t_jax.training.tpu_topology", "TopologyError"),
    ("t2v2t_jax.training.gpu_topology", "GpuTopologyError"),
    ("t2v2t_jax.training.train", "NonFiniteLossError"),
    ("input_pipeline.bad_data", "DataFailureError"),
    ("input_pipeline.prepare", "PrepareInterrupted"),
)

# Missing, unreadable or already existing files: said in one line too.
_FILE_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)


def anticipated() -> tuple[type[BaseException], ...]:
  """The exception types a command prints as one `FATAL:` line (`main.py`, `convert`):
  `Refusal`, file errors and the project's other anticipated errors. Anything else is a
  bug and keeps its traceback."""
  import sys  # noqa: PLC0415

  types: list[type[BaseException]] = [Refusal, *_FILE_ERRORS]
  for module, name in _OTHER_ANTICIPATED:
    cls = getattr(sys.modules.get(module), name, None)
    if isinstance(cls, type) and issubclass(cls, BaseException):
      types.append(cls)
  return tuple(types)
