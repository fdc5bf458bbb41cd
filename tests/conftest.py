"""Shared test setup: JAX on the CPU, a compilation cache shared by every test process,
and absl flags marked parsed for Grain."""
import os
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Tests build the same tiny programs many times (and in subprocesses): a persistent
# compilation cache turns every compile after the first into a load.
_CACHE = os.path.join(tempfile.gettempdir(), "t2v2t_jax_test_compile_cache")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Tests run tiny models: LLVM's optimisation passes cost far more compile time than they
# save at run time (about 2x less compile CPU time, same numerics).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_backend_optimization_level=0").strip()

from absl import flags  # noqa: E402

# Grain's multi-worker loader reads absl flags; pytest does not run absl.app.run.
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()
