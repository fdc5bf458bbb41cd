"""TPU devices for ahead-of-time compilation on a host without a TPU.

libtpu (PyPI, `pip install -e ".[tpu]"`) compiles for any TPU topology without the chips
("deviceless" AOT, as MaxText's `train_compile.py`): `get_topology_desc` gives device
objects with real coordinates that a mesh can be built on, and `jit(...).lower(...)
.compile()` then yields the program's exact per-device HBM use.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import re

import jax
import jax.numpy as jnp

# HBM per chip in GiB (vendor figures), by `device_kind` as libtpu names it.
HBM_GIB = {
    "TPU v4": 32.0,
    "TPU v5 lite": 16.0,   # v5e
    "TPU v5": 95.0,        # v5p
    "TPU v5p": 95.0,
    "TPU v6 lite": 32.0,   # v6e (Trillium)
    "TPU v6e": 32.0,
}

MEGACORE = ("v4", "v5p")

_NAME = re.compile(r"^(v[0-9][a-z]*):([0-9]+(?:x[0-9]+){1,2})$")


class TopologyError(ValueError):
  """A topology that cannot be compiled for; the message says what to do."""


def check_libtpu() -> None:
  if importlib.util.find_spec("libtpu") is None:
    raise TopologyError(
        f"compiling for a TPU topology needs libtpu, which is not installed: run "
        f"`pip install -e \".[tpu]\"` (or `pip install \"jax[tpu]=={jax.__version__}\"`)")


def quiet_libtpu_without_tpu() -> None:
  """Environment for loading libtpu on a host without a TPU; read when libtpu loads, i.e.
  before the first TPU compile (or the first plugin discovery) of this process."""
  # libtpu takes a machine-wide lock file (/tmp/libtpu_lockfile) so that one process owns
  # the chips; compiling ahead of time uses no chip, so two compiles (two test workers, or
  # a plan made while a run trains on the TPU) must not exclude each other.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  if not glob.glob("/dev/accel*") and not os.path.exists("/dev/vfio"):
    # No TPU on this host: without these libtpu looks for one (the cloud metadata server,
    # the worker list) and prints a screen of alarming but harmless errors before every
    # plan. They describe only this host, not the topology compiled for (checked: the same
    # bytes and FLOPs with and without). On a TPU VM they are left to libtpu.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-1")


def topology_devices(name: str) -> list:
  """The devices of TPU topology `name` (e.g. 'v5e:1x1', 'v5e:2x4', 'v4:2x2x1').

  Multi-host topologies (e.g. 'v5e:4x4': 16 chips on 4 hosts) give every host's devices,
  so one process compiles the global program.
  """
  check_libtpu()
  quiet_libtpu_without_tpu()
  from jax.experimental import topologies  # noqa: PLC0415 (needs libtpu only here)
  match = _NAME.match(name or "")
  if not match:
    raise TopologyError(
        f"unknown TPU topology {name!r}: expected '<generation>:<chips>' such as 'v5e:1x1', "
        f"'v5e:2x4', 'v6e:2x4' or 'v4:2x2x1'")
  dims = [int(d) for d in match.group(2).split("x")]
  # v4 and v5p chips have two TensorCores that JAX drives as one device ("megacore");
  # without this libtpu describes each core as a device, which a training run never sees.
  options = {"chip_config_name": "megacore"} if match.group(1) in MEGACORE else {}
  try:
    return list(topologies.get_topology_desc(topology_name=name, platform="tpu", **options).devices)
  except Exception as first:  # noqa: BLE001 (libtpu raises JaxRuntimeError subclasses)
    # Slices smaller than one host (e.g. Colab's single v5e chip, 'v5e:1x1') need the
    # host bounds given explicitly: libtpu's default is a 2x2x1 host.
    if "chips_per_host_bounds" not in str(first):
      raise TopologyError(f"libtpu does not know TPU topology {name!r}: {_first_line(first)}") from first
    bounds = tuple(dims + [1] * (3 - len(dims)))
    try:
      return list(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                               chips_per_host_bounds=bounds, **options).devices)
    except Exception as e:  # noqa: BLE001
      raise TopologyError(f"libtpu does not know TPU topology {name!r}: {_first_line(e)}") from e


# When libtpu cannot find the usable HBM by the probe below: nominal less what it keeps on
# a v5e (it names "available HBM (15.75G)" for the 16 GiB chip).
RESERVED_GIB = 0.25

_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}
# libtpu, refusing a program: "the total memory required for HLO temporaries (18.26G)
# exceeds available HBM (15.75G)", or "Used 20.50G of 15.75G hbm".
_TEMPS_OVER = re.compile(r"required for HLO temporaries \(([0-9.]+)([KMGT]?)\) exceeds available "
                         r"HBM \(([0-9.]+)([KMGT]?)\)")
_USED_OF = re.compile(r"Used ([0-9.]+)([KMGT]?) of ([0-9.]+)([KMGT]?) hbm")


def parse_out_of_memory(message: str) -> tuple[int, int] | None:
  """(bytes needed, bytes available) from a TPU compiler out-of-HBM error, else None."""
  for pattern in (_TEMPS_OVER, _USED_OF):
    m = pattern.search(message)
    if m:
      need = float(m.group(1)) * _UNITS[m.group(2)]
      have = float(m.group(3)) * _UNITS[m.group(4)]
      return int(need), int(have)
  return None


def hbm_bytes(device, *, reserved_gib: float = 0.0) -> int | None:
  """The chip's nominal HBM less `reserved_gib` (None: a chip this table does not know)."""
  gib = HBM_GIB.get(device.device_kind)
  return None if gib is None else int((gib - reserved_gib) * 2 ** 30)


_USABLE: dict = {}


def usable_hbm_bytes(device) -> int | None:
  """HBM a program may fill on `device`'s chip, as libtpu itself states it.

  What libtpu keeps differs by generation: 0.0.42 names 15.75 GiB available on a v5e (16
  nominal), 30.75 on a v4 (32), 31.25 on a v6e (32) and 95.74 on a v5p (95). So it is
  asked: a probe program that cannot fit any chip (a 2 TiB output) is compiled for the
  device and the figure its refusal names is read (well under a second). When that
  fails, the nominal HBM less `RESERVED_GIB`.
  """
  if device.device_kind not in _USABLE:
    probe = jax.ShapeDtypeStruct((1024,), jnp.float32,
                                 sharding=jax.sharding.SingleDeviceSharding(device))
    try:
      jax.jit(lambda x: jnp.broadcast_to(x, (2 ** 31, 1024)) + 1).lower(probe).compile()
      parsed = None
    except Exception as e:  # noqa: BLE001 (libtpu raises JaxRuntimeError subclasses)
      parsed = parse_out_of_memory(str(e))
    _USABLE[device.device_kind] = (parsed[1] if parsed
                                   else hbm_bytes(device, reserved_gib=RESERVED_GIB))
  return _USABLE[device.device_kind]


def _first_line(e: Exception) -> str:
  return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
