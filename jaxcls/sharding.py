"""Device mesh and shardings: which device holds which part of the batch and the train state.

Axes:
  'data'   splits the batch.
  'fsdp'   splits the batch too and, by the ZeRO stage (config.mesh.zero_stage), the train
           state: 0 nothing (plain data parallel), 1 optimizer state, 2 optimizer state and
           gradients (reduce-scattered), 3 also parameters (FSDP: XLA gathers a kernel where
           it is used).
  'model'  splits the output channels of large kernels (tensor parallel); the batch is not
           split over it, so the devices of one 'model' group see the same examples.

Across hosts: on several processes (or TPU slices) the mesh comes from
mesh_utils.create_hybrid_device_mesh; config.mesh.across_hosts ('data' by default) is the
one axis that spans hosts, so 'fsdp' and 'model' collectives stay on a host's fast network.

Every large array has one "sharded layout" (by shape, or a regex rule from the config); a
stage that does not shard a tree uses that layout with 'fsdp' taken out.
"""

import math
import re

import jax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from jaxcls.errors import ConfigError

MESH_AXES = ("data", "fsdp", "model")
# The batch dimension is split over every axis that holds a different share of the data.
BATCH_AXES = ("data", "fsdp")
ZERO_STAGES = (0, 1, 2, 3)
# The trees each stage splits over 'fsdp'; batch_stats go with the parameters.
_STAGE_OF_TREE = {"opt_state": 1, "grads": 2, "params": 3, "batch_stats": 3}


def resolve_mesh_shape(mesh_config, num_devices: int) -> dict[str, int]:
  """Turns config.mesh (one axis may be -1) into concrete axis sizes for num_devices.

  Raises ConfigError naming the axis for sizes that cannot fit the devices.
  """
  sizes = {name: int(mesh_config[name]) for name in MESH_AXES}
  for name, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(
          f"config.mesh.{name}={size}: an axis size must be a positive integer, or -1 to take "
          "the remaining devices.")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ConfigError(
        f"config.mesh: only one axis may be -1, got {', '.join(free)}. Set all but one "
        "to a number.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ConfigError(
          f"config.mesh: the fixed axes ({fixed} devices) do not divide the {num_devices} "
          f"devices, so config.mesh.{free[0]}=-1 cannot take the rest.")
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ConfigError(
        f"config.mesh: data x fsdp x model = {fixed}, but there are {num_devices} devices. "
        "Make the product equal the device count, or set one axis to -1.")
  return sizes


def _granule_key(devices) -> str:
  """What groups devices behind one fast network: TPU slices when there are several, else
  processes (hosts)."""
  slices = {getattr(d, "slice_index", None) for d in devices}
  return "slice_index" if len(slices) > 1 and None not in slices else "process_index"


def host_shapes(sizes: dict, across_hosts: str, num_granules: int) -> tuple[tuple, tuple]:
  """-> (shape within a host, shape across hosts), in MESH_AXES order: the across_hosts
  axis takes num_granules hosts (slices), every other axis stays within one."""
  within = dict(sizes)
  within[across_hosts] //= num_granules
  across = tuple(num_granules if name == across_hosts else 1 for name in MESH_AXES)
  return tuple(within[name] for name in MESH_AXES), across


def device_grid(mesh_config, devices):
  """The devices as a (data, fsdp, model) array. On one host (or slice), JAX's order
  (jax.make_mesh); on several, mesh_utils.create_hybrid_device_mesh: config.mesh.across_hosts
  spans the hosts, the other axes stay inside each host, on its fast network."""
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  key = _granule_key(devices)
  granules = len({getattr(d, key) for d in devices})
  across_hosts = mesh_config.get("across_hosts", "data")
  if granules == 1:
    return None
  if sizes[across_hosts] % granules:
    raise ConfigError(
        f"config.mesh.across_hosts={across_hosts!r}: its axis has {sizes[across_hosts]} "
        f"devices, which does not split over the {granules} hosts; make "
        f"config.mesh.{across_hosts} a multiple of {granules}.")
  within, across = host_shapes(sizes, across_hosts, granules)
  return mesh_utils.create_hybrid_device_mesh(
      within, across, devices, process_is_granule=key == "process_index")


def make_mesh(mesh_config, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  # Auto axes: shardings are given at jit boundaries and XLA propagates them inside.
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  grid = device_grid(mesh_config, devices)
  if grid is not None:
    return Mesh(grid, MESH_AXES, axis_types=axis_types)
  sizes = resolve_mesh_shape(mesh_config, len(devices))
  shape = tuple(sizes[name] for name in MESH_AXES)
  # 'model' is the last (fastest-varying) axis, so its groups are the closest devices.
  return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[axis] for axis in BATCH_AXES)


def check_rules(rules) -> None:
  """Raises ConfigError unless rules is a sequence of (regex, spec) pairs naming mesh axes."""
  for rule in rules:
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ConfigError(f"config.mesh.rules: {rule!r} is not a (regex, spec) pair.")
    pattern, spec = rule
    if not isinstance(spec, (tuple, list)):
      raise ConfigError(f"config.mesh.rules: the spec of {pattern!r} is {spec!r}; give a tuple "
                       "with one entry per dimension, e.g. (None, 'fsdp'), or () for whole.")
    try:
      re.compile(pattern)
    except re.error as e:
      raise ConfigError(f"config.mesh.rules: bad regex {pattern!r}: {e}.") from None
    used = []
    for entry in spec:
      names = entry if isinstance(entry, (tuple, list)) else (entry,)
      for name in names:
        if name is not None and name not in MESH_AXES:
          raise ConfigError(
              f"config.mesh.rules: {pattern!r} -> {tuple(spec)!r} names axis {name!r}; the "
              f"axes are {', '.join(MESH_AXES)} (None for a dimension that is not split).")
        if name is not None and name in used:
          raise ConfigError(
              f"config.mesh.rules: {pattern!r} -> {tuple(spec)!r} uses axis {name!r} twice.")
        used.append(name)


def check_mesh_config(mesh_config, num_devices: int, process_count: int = 1) -> dict[str, int]:
  """Checks config.mesh for this many devices and processes; -> the resolved axis sizes."""
  sizes = resolve_mesh_shape(mesh_config, num_devices)
  if mesh_config.zero_stage not in ZERO_STAGES:
    raise ConfigError(f"config.mesh.zero_stage={mesh_config.zero_stage!r}: use 0 (replicated), "
                      "1 (optimizer state split), 2 (gradients too) or 3 (parameters too).")
  check_rules(mesh_config.rules)
  local_devices = num_devices // process_count
  if local_devices % sizes["model"]:
    raise ConfigError(
        f"config.mesh.model={sizes['model']} does not divide the {local_devices} devices "
        "of one process: a model group must stay within one host (its devices share the "
        "same examples).")
  across_hosts = mesh_config.get("across_hosts", "data")
  if across_hosts not in BATCH_AXES:
    raise ConfigError(f"config.mesh.across_hosts={across_hosts!r}: use 'data' or 'fsdp' (the "
                      "axis that spans hosts; 'model' stays within one).")
  if sizes[across_hosts] % process_count:
    raise ConfigError(
        f"config.mesh.{across_hosts}={sizes[across_hosts]} does not split over the "
        f"{process_count} processes, but config.mesh.across_hosts={across_hosts!r} puts that "
        f"axis across hosts: use a multiple of {process_count}, or the other batch axis.")
  return sizes


def _spec_axes(entry) -> tuple:
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, (tuple, list)) else (entry,)


def sharded_spec(name: str, shape: tuple[int, ...], mesh_shape, min_size: int,
                 rules=()) -> P:
  """The layout of one array when its stage shards it.

  The first rule whose regex matches `name` (re.search) decides; otherwise arrays with fewer
  than min_size elements stay replicated, a kernel's output channels (last dimension) go to
  'model', and the largest other dimension that 'fsdp' divides goes to 'fsdp' (the later one
  on a tie).
  """
  for pattern, spec in rules:
    if re.search(pattern, name):
      spec = tuple(spec)
      if len(spec) > len(shape):
        raise ConfigError(f"config.mesh.rules: {pattern!r} -> {spec!r} has {len(spec)} "
                          f"entries, but {name} has shape {shape}.")
      for dim, entry in enumerate(spec):
        parts = math.prod(mesh_shape[axis] for axis in _spec_axes(entry))
        if shape[dim] % parts:
          raise ConfigError(
              f"config.mesh.rules: {pattern!r} -> {spec!r} splits dimension {dim} of {name} "
              f"(shape {shape}) into {parts} parts, which does not divide {shape[dim]}.")
      return P(*(tuple(e) if isinstance(e, list) else e for e in spec))
  if math.prod(shape) < min_size:
    return P()
  spec = [None] * len(shape)
  model, fsdp = mesh_shape["model"], mesh_shape["fsdp"]
  if model > 1 and len(shape) >= 2 and shape[-1] % model == 0:
    spec[-1] = "model"
  if fsdp > 1:
    candidates = [d for d, n in enumerate(shape) if spec[d] is None and n % fsdp == 0]
    if candidates:
      spec[max(candidates, key=lambda d: (shape[d], d))] = "fsdp"
  return P(*spec)


def without_fsdp(spec: P) -> P:
  """The same layout, but whole over 'fsdp' (for the trees a stage does not shard)."""
  entries = []
  for entry in spec:
    axes = tuple(axis for axis in _spec_axes(entry) if axis != "fsdp")
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def path_name(path) -> str:
  """'stage1_block1/conv1/kernel' for a pytree key path (what config.mesh.rules match)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
  return "/".join(parts)


class Layout:
  """Shardings of the train state and the gradients for a mesh and config.mesh."""

  def __init__(self, mesh: Mesh, mesh_config):
    self.mesh = mesh
    self.stage = int(mesh_config.zero_stage)
    self.min_size = int(mesh_config.fsdp_min_size)
    self.rules = tuple(mesh_config.rules)

  def spec(self, name: str, shape, tree: str) -> P:
    spec = sharded_spec(name, tuple(shape), self.mesh.shape, self.min_size, self.rules)
    return spec if self.stage >= _STAGE_OF_TREE[tree] else without_fsdp(spec)

  def tree_shardings(self, tree, kind: str):
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(self.mesh, self.spec(path_name(path), leaf.shape,
                                                              kind)), tree)

  def opt_state_shardings(self, opt_state, params):
    """Optimizer state follows its parameter (matched by key path), at the stage's layout.

    A leaf whose path ends with a parameter's path and has its shape (momentum, Adam's
    moments) takes that parameter's layout, so regex rules reach it; any other leaf (step
    counts, state of unusual transforms) is laid out by its own shape.
    """
    by_path = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      by_path[path_name(path)] = tuple(leaf.shape)

    def leaf_sharding(path, leaf):
      name = path_name(path)
      parts = name.split("/")
      for start in range(len(parts)):
        suffix = "/".join(parts[start:])
        if by_path.get(suffix) == tuple(leaf.shape):
          name = suffix
          break
      return NamedSharding(self.mesh, self.spec(name, leaf.shape, "opt_state"))

    return jax.tree_util.tree_map_with_path(leaf_sharding, opt_state)

  def state_shardings(self, abstract_state):
    """A TrainState of NamedShardings for a TrainState of shapes (from jax.eval_shape).

    A weight EMA (steps.EmaTrainState) is laid out as the parameters and statistics it
    averages: the same rules, the same stage.
    """
    shardings = abstract_state.replace(
        step=replicated(self.mesh),
        params=self.tree_shardings(abstract_state.params, "params"),
        opt_state=self.opt_state_shardings(abstract_state.opt_state, abstract_state.params),
        batch_stats=self.tree_shardings(abstract_state.batch_stats, "batch_stats"))
    average = getattr(abstract_state, "ema", None)
    if average is not None:
      shardings = shardings.replace(ema={"params": shardings.params,
                                         "batch_stats": shardings.batch_stats})
    return shardings

  def grad_shardings(self, abstract_params):
    """Where the gradients live before the update: whole over 'fsdp' (all-reduced) below
    stage 2, in the sharded layout (reduce-scattered) from stage 2 on."""
    return self.tree_shardings(abstract_params, "grads")


def state_shardings(mesh: Mesh, abstract_state, mesh_config):
  """Shardings for every array of a train state given as shapes (from jax.eval_shape)."""
  return Layout(mesh, mesh_config).state_shardings(abstract_state)


def grad_shardings(mesh: Mesh, abstract_params, mesh_config):
  return Layout(mesh, mesh_config).grad_shardings(abstract_params)


def bytes_per_device(tree) -> dict:
  """Bytes of the given arrays held by each device, read from the addressable shards."""
  totals: dict = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      totals[shard.device] = totals.get(shard.device, 0) + shard.data.nbytes
  return totals


def bytes_per_device_from_shardings(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of shapes laid out by shardings (nothing allocated)."""
  total = 0
  for leaf, leaf_sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    shard_shape = leaf_sharding.shard_shape(tuple(leaf.shape))
    total += math.prod(shard_shape) * leaf.dtype.itemsize
  return total
