"""Devices, mesh and shardings: data parallel over `data`, optional FSDP over `fsdp`.

Used by training, evaluation and search alike: the batch is split over both axes (every
device holds different examples), and `global_batch` is where each process's host batch
from the input pipeline becomes one global `jax.Array` per field. Parameters are
replicated, except under FSDP, where each parameter with at least `fsdp_min_size`
elements is split along its largest dimension divisible by the `fsdp` axis size (XLA
gathers it for the forward pass and reduce-scatters its gradient).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def maybe_initialize_distributed(config) -> None:
  """`jax.distributed.initialize()` when the config asks for multi-host (once per process)."""
  mh = config.get("multihost", None)
  if not mh or not mh.get("enabled", False):
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  for key in ("coordinator_address", "num_processes", "process_id"):
    value = mh.get(key, None)
    if value not in (None, "", -1):
      kwargs[key] = value
  jax.distributed.initialize(**kwargs)


def make_mesh(mesh_cfg, devices=None) -> jax.sharding.Mesh:
  """Mesh of shape (data, fsdp). `data: -1` takes every device not used by fsdp."""
  devices = jax.devices() if devices is None else devices
  n = len(devices)
  fsdp = int(mesh_cfg.get("fsdp", 1))
  data = int(mesh_cfg.get("data", -1))
  if data == -1:
    if n % fsdp:
      raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh data={data} x fsdp={fsdp} != {n} devices; set mesh.data=-1 to fill")
  return jax.make_mesh((data, fsdp), DATA_AXES, axis_types=(AxisType.Auto,) * 2,
                       devices=devices)


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def param_spec(shape, fsdp_size: int, min_size: int) -> P:
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  # Split the largest dimension that the fsdp axis divides.
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh, *, fsdp_min_size: int = 2 ** 18):
  """NamedSharding for every array leaf of `tree` (params or optimizer state)."""
  fsdp_size = mesh.shape["fsdp"]

  def one(leaf):
    shape = getattr(leaf, "shape", ())
    return NamedSharding(mesh, param_spec(shape, fsdp_size, fsdp_min_size))

  return jax.tree.map(one, tree)


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs carrying the target shardings: what a sharded restore or an
  ahead-of-time compile is given in place of arrays."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract, shardings)


def global_batch(local_batch: dict, mesh, keys: Sequence[str]) -> dict:
  """The global batch as `jax.Array`s split over every device of `mesh`, built from each
  process's numpy batch (`jax.make_array_from_process_local_data`); only `keys` go to
  the device (the pipeline's failure records stay on the host)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(local_batch[k]))
          for k in keys}
