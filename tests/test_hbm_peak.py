"""benchmarks/hbm_peak.py on XLA's dump of a small CPU program with a known peak."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Appended, not first: benchmarks/input_pipeline.py would shadow the input_pipeline package
# (in this process and in every process it spawns, which inherit sys.path).
sys.path.append(os.path.join(ROOT, "benchmarks"))

import hbm_peak  # noqa: E402

PROGRAM = """
import jax, jax.numpy as jnp

@jax.jit
def peaky(x):                       # x: f32[1024, 64], 256 KiB
  y = jnp.sin(x) @ x.T              # f32[1024, 1024], 4 MiB: the largest buffer (an output)
  return y, jnp.exp(y).sum()

peaky(jnp.ones((1024, 64), jnp.float32))
"""


def test_reads_the_peak_of_a_dumped_program(tmp_path):
  # No compilation cache: a program loaded from it is not compiled, so not dumped.
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env = dict(env, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false",
             XLA_FLAGS=f"--xla_dump_to={tmp_path} --xla_dump_hlo_as_text "
                       f"--xla_dump_hlo_module_re=.*peaky.*")
  subprocess.run([sys.executable, "-c", PROGRAM], env=env, check=True, timeout=300)
  peak = hbm_peak.read_peak(*hbm_peak.find_module(str(tmp_path), "peaky"))
  assert peak.module.endswith("jit_peaky")
  largest = max(peak.buffers, key=lambda b: b.bytes)
  assert largest.bytes == 1024 * 1024 * 4
  assert largest.shape == "f32[1024,1024]" and largest.live
  text = hbm_peak.report(peak, top=5)
  assert "By operation:" in text and "GiB" in text


def test_says_how_to_dump_when_there_is_nothing(tmp_path):
  import pytest  # noqa: PLC0415
  with pytest.raises(SystemExit, match="xla_dump_to"):
    hbm_peak.find_module(str(tmp_path), "train_step")
