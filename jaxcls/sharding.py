"""Device mesh and shardings: which device holds which part of the batch and the train state.

Axes: 'data' splits the batch; 'fsdp' splits the batch too and, in addition, the large
parameters and their optimizer state (ZeRO-3 / FSDP style: XLA gathers a kernel where it is
used and reduce-scatters its gradient).
"""

import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
# The batch dimension is split over every axis that holds a different share of the data.
BATCH_AXES = ("data", "fsdp")


def resolve_mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Turns config.mesh (one axis may be -1) into concrete axis sizes for num_devices."""
  sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ValueError(
          f"config.mesh.{name}={size}: an axis size must be a positive integer, or -1 to take "
          "the remaining devices.")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(
        f"config.mesh: only one axis may be -1, got {', '.join(free)}. Set all but one "
        "to a number.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(
          f"config.mesh: the fixed axes ({fixed} devices) do not divide the {num_devices} "
          f"devices, so config.mesh.{free[0]}=-1 cannot take the rest.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(
        f"config.mesh: data x fsdp = {fixed}, but there are {num_devices} devices. Make the "
        "product equal the device count, or set one axis to -1.")
  return sizes


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  # Auto axes: shardings are given at jit boundaries and XLA propagates them inside.
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
  """Splits the largest dimension that fsdp_size divides; small arrays stay replicated."""
  if fsdp_size == 1 or math.prod(shape) < min_size:
    return P()
  candidates = [d for d, n in enumerate(shape) if n % fsdp_size == 0]
  if not candidates:
    return P()
  # Largest dimension; on a tie the later one (output channels of a kernel).
  dim = max(candidates, key=lambda d: (shape[d], d))
  spec = [None] * len(shape)
  spec[dim] = "fsdp"
  return P(*spec)


def state_shardings(mesh: Mesh, abstract_state, min_size: int):
  """Shardings for every array leaf of a train state given as shapes (from jax.eval_shape)."""
  fsdp_size = mesh.shape["fsdp"]

  def leaf_sharding(leaf):
    return NamedSharding(mesh, fsdp_spec(tuple(leaf.shape), fsdp_size, min_size))

  return jax.tree.map(leaf_sharding, abstract_state)


def bytes_per_device(tree) -> dict:
  """Bytes of the given arrays held by each device, read from the addressable shards."""
  totals: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals
