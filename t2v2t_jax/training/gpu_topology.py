"""NVIDIA GPU devices for ahead-of-time compilation on a host without a GPU.

XLA compiles for a GPU it is told about rather than one it finds: JAX's CUDA plugin takes a
`GpuTargetConfigProto` (the card's description: compute capability, SM count, memory,
bandwidth, ...) through `jax.experimental.topologies.get_topology_desc(platform="cuda",
target_config=..., topology="1x1x1")` and gives compile-only devices that `jit(...).lower(
...).compile()` accepts, as libtpu does for TPU slices (`tpu_topology.py`). The compiled
program has XLA:GPU's optimized HLO (its fusions, cuBLAS / cuDNN / Triton calls, copies)
and memory analysis; its `cost_analysis()` is None with jax 0.10.2 (`hlo_census` counts
from the HLO instead). No kernel is autotuned (there is no GPU to time them on), so the
GEMM back ends chosen can differ from a run's; the program's structure and memory do not.

Needs the CUDA plugin of the installed jaxlib's version, but none of the CUDA libraries
(measured with jax 0.10.2: the plugin's own PTX compiler suffices). Programs are compiled
with `COMPILER_OPTIONS` (pass them to `lowered.compile(compiler_options=...)`). Installed into the
environment, the plugin makes every JAX process on a GPU-less host print a CUDA error at
start-up; kept in a folder of its own it is loaded only here:

  pip install --no-deps --target ~/.cache/t2v2t/jax-cuda12-$(python -c \
      "import jax; print(jax.__version__)") "jax-cuda12-plugin==<that version>" \
      "jax-cuda12-pjrt==<that version>"

(that folder is found by default; `T2V2T_CUDA_PLUGIN_DIR` names another).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

import jax


class GpuTopologyError(ValueError):
  """A GPU target that cannot be compiled for here; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class GpuSpec:
  """What XLA needs to know about a card to compile for it."""
  name: str                       # the device kind the compiled devices report
  compute_capability: tuple[int, int]
  sm_count: int
  memory_bytes: int               # as the driver reports it (cudaMemGetInfo total)
  memory_bandwidth: int           # bytes/s
  l2_cache_bytes: int
  clock_ghz: float                # SM boost clock
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int


# Vendor facts: NVIDIA H100 / H200 datasheets and the Hopper tuning guide (sm_90, 132 SMs
# on the SXM parts, 1.98 GHz boost, 50 MiB L2, 228 KiB shared memory per SM of which 227
# KiB to one block, 3.35 / 4.8 TB/s). Device memory: what the CUDA runtime gives a program
# on these cards, 79.1 GiB of the H100's 80 GB and 141.0 GiB on the H200.
SPECS = {
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", (9, 0), 132, 84_942_979_072, 3_352_320_000_000,
                    50 * 2 ** 20, 1.98, 228 * 1024, 227 * 1024),
    "h200": GpuSpec("NVIDIA H200", (9, 0), 132, 151_397_597_184, 4_800_000_000_000,
                    50 * 2 ** 20, 1.98, 228 * 1024, 227 * 1024),
}

# Compiler options of every program compiled for these targets. Triton GEMM fusions off,
# so that every matrix product is a cuBLAS call: without a GPU XLA cannot autotune the
# Triton tilings, and its untuned default refused the tiny recipe's train step (jax
# 0.10.2: "INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.1181 =
# bf16[20,32]{1,0} dot(...)"). On a GPU the autotuner picks cuBLAS or Triton per product;
# the work outside the products, what the census is for, is the same either way.
COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

# cuDNN version the compiler may assume (decides which cuDNN fusions, e.g. flash attention,
# it emits); the lent machines' images carry cuDNN 9.
CUDNN_VERSION = (9, 10, 0)


def target_config(spec: GpuSpec, cudnn: tuple[int, int, int] = CUDNN_VERSION) -> str:
  """`stream_executor.GpuTargetConfigProto` text for `spec`."""
  major, minor = spec.compute_capability
  return "\n".join([
      "gpu_device_info {",
      "  threads_per_block_limit: 1024",
      "  threads_per_warp: 32",
      "  shared_memory_per_block: 49152",
      f"  shared_memory_per_core: {spec.shared_memory_per_sm}",
      "  threads_per_core_limit: 2048",
      f"  core_count: {spec.sm_count}",
      "  fpus_per_core: 128",
      "  block_dim_limit_x: 2147483647",
      "  block_dim_limit_y: 65535",
      "  block_dim_limit_z: 65535",
      f"  memory_bandwidth: {spec.memory_bandwidth}",
      f"  l2_cache_size: {spec.l2_cache_bytes}",
      f"  clock_rate_ghz: {spec.clock_ghz}",
      f"  device_memory_size: {spec.memory_bytes}",
      f"  shared_memory_per_block_optin: {spec.shared_memory_per_block_optin}",
      f"  cuda_compute_capability {{ major: {major} minor: {minor} }}",
      "  registers_per_core_limit: 65536",
      "  registers_per_block_limit: 65536",
      "}",
      'platform_name: "CUDA"',
      f"dnn_version_info {{ major: {cudnn[0]} minor: {cudnn[1]} patch: {cudnn[2]} }}",
      f'device_description_str: "{spec.name}"',
  ]) + "\n"


def plugin_dir() -> str:
  return os.environ.get("T2V2T_CUDA_PLUGIN_DIR") or os.path.expanduser(
      f"~/.cache/t2v2t/jax-cuda12-{jax.__version__}")


def _load_plugin() -> None:
  """Registers JAX's CUDA plugin (installed, or in `plugin_dir()`) if it is not yet."""
  from jax._src import xla_bridge  # noqa: PLC0415
  from t2v2t_jax.training import tpu_topology  # noqa: PLC0415
  tpu_topology.quiet_libtpu_without_tpu()   # libtpu loads with the other plugins below
  xla_bridge._discover_and_register_pjrt_plugins()   # the installed plugins, once
  if "cuda" in xla_bridge._topology_factories:
    return
  # No CUDA runtime here to check versions against; compiling needs none.
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  folder = plugin_dir()
  if not os.path.isdir(os.path.join(folder, "jax_plugins")):
    raise GpuTopologyError(
        f"compiling for a GPU needs JAX's CUDA plugin for jax {jax.__version__}: run\n  pip "
        f"install --no-deps --target {folder} jax-cuda12-plugin=={jax.__version__} "
        f"jax-cuda12-pjrt=={jax.__version__}\n(or set T2V2T_CUDA_PLUGIN_DIR to a folder "
        f"holding it)")
  if folder not in sys.path:
    sys.path.append(folder)
  import jax_plugins  # noqa: PLC0415 (a namespace package: add the folder's part of it)
  part = os.path.join(folder, "jax_plugins")
  if part not in list(jax_plugins.__path__):
    jax_plugins.__path__.append(part)
  try:
    module = importlib.import_module("jax_plugins.xla_cuda12")
    module.initialize()
  except Exception as e:  # noqa: BLE001
    raise GpuTopologyError(f"JAX's CUDA plugin in {folder} did not load: {e}") from e
  if "cuda" not in xla_bridge._topology_factories:
    raise GpuTopologyError(f"JAX's CUDA plugin in {folder} registered no compile-only "
                           f"topology (is it for jax {jax.__version__}?)")


def gpu_devices(target: str) -> list:
  """Compile-only devices of one GPU of kind `target` ('h100' or 'h200')."""
  if target not in SPECS:
    raise GpuTopologyError(f"unknown GPU target {target!r}: expected one of {sorted(SPECS)}")
  _load_plugin()
  from jax.experimental import topologies  # noqa: PLC0415
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1",
                                        target_config=target_config(SPECS[target]))
  except Exception as e:  # noqa: BLE001
    raise GpuTopologyError(f"the CUDA plugin refused the {target} target: {e}") from e
  return list(topo.devices)
