"""Shared test setup: keep JAX on the CPU and quiet, and let Grain's absl flags parse."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from absl import flags  # noqa: E402

# Grain's multi-worker loader reads absl flags; pytest does not run absl.app.run.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
