"""What the tests that start real processes share: a free localhost port (for a
`jax.distributed` coordinator or a local server) and a checkpoint's train state read back
as numpy (no devices needed), to compare runs."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def restore_numpy(step_dir: Path) -> dict:
  """A checkpoint step's train state as numpy arrays, keyed by tree path."""
  import jax  # noqa: PLC0415
  import orbax.checkpoint as ocp  # noqa: PLC0415
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(Path(step_dir) / "state").item_metadata
  target = jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), meta.tree)
  state = checkpointer.restore(Path(step_dir) / "state", target)
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]}
