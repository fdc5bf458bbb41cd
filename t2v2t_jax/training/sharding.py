"""Device mesh and shardings: data parallel over `data`, optional FSDP over `fsdp`.

The batch is split over both axes (every device holds different examples). Parameters
are replicated, except under FSDP, where each parameter with at least
`fsdp_min_size` elements is split along its largest dimension divisible by the `fsdp`
axis size (XLA gathers it for the forward pass and reduce-scatters its gradient).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


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
