"""Training over a device mesh: the same steps on any mesh, at any ZeRO stage and with the
model axis, give the same result; each stage splits what it promises (8 CPU devices)."""

import collections
import functools
import math
import re

import jax
import numpy as np
import pytest

from jaxcls import config as config_lib
from jaxcls import build, sharding
from helpers import (MIN_SIZE, assert_same_training, synthetic_batches, tiny_config,
                     train_on_mesh, train_run, zero_config)


def test_same_losses_and_params_on_every_mesh():
  devices = jax.devices()
  assert len(devices) == 8, "conftest must give 8 fake CPU devices"
  # One batch seen four times: the loss must fall, so the steps really train.
  batches = synthetic_batches(tiny_config(), num_steps=1) * 4
  reference_losses, reference_params, _ = train_on_mesh(
      tiny_config(data=1, fsdp=1), devices[:1], batches)
  assert reference_losses[-1] < reference_losses[0] - 0.01
  for mesh in ({"data": 8, "fsdp": 1}, {"data": 4, "fsdp": 2}):
    losses, params, _ = train_on_mesh(tiny_config(**mesh), devices, batches)
    np.testing.assert_allclose(losses, reference_losses, rtol=2e-5, atol=2e-5, err_msg=str(mesh))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(mesh)),
        params, reference_params)


def test_fsdp_splits_large_kernels_and_their_optimizer_state():
  config = tiny_config(data=4, fsdp=2)
  batches = synthetic_batches(config, num_steps=1)
  _, _, state = train_on_mesh(config, jax.devices(), batches)
  momentum = state.opt_state[1][0].trace  # chain(decay, sgd): sgd's momentum buffer
  big_kernels = 0
  flat_params = jax.tree_util.tree_leaves_with_path(state.params)
  flat_momentum = dict(jax.tree_util.tree_leaves_with_path(momentum))
  for path, param in flat_params:
    if param.size < config.mesh.fsdp_min_size or not any(n % 2 == 0 for n in param.shape):
      continue
    big_kernels += 1
    for array in (param, flat_momentum[path]):
      shards = array.addressable_shards
      assert len(shards) == 8
      for shard in shards:
        assert shard.data.size * 2 == array.size, (jax.tree_util.keystr(path), shard.data.shape)
  assert big_kernels >= 2
  # Small arrays (BatchNorm scales, biases) stay whole on every device.
  scale = next(p for path, p in flat_params if jax.tree_util.keystr(path).endswith("['scale']"))
  assert all(s.data.size == scale.size for s in scale.addressable_shards)


def test_fsdp_halves_state_bytes_per_device():
  config = tiny_config(data=4, fsdp=2)
  replicated_config = tiny_config(data=8, fsdp=1)
  replicated_config.mesh.fsdp_min_size = config.mesh.fsdp_min_size
  batches = synthetic_batches(config, num_steps=1)
  _, _, sharded = train_on_mesh(config, jax.devices(), batches)
  _, _, whole = train_on_mesh(replicated_config, jax.devices(), batches)
  sharded_bytes = max(sharding.bytes_per_device(sharded.params).values())
  whole_bytes = max(sharding.bytes_per_device(whole.params).values())
  assert sharded_bytes < 0.6 * whole_bytes


@functools.cache
def stage_run(stage):
  return train_run(zero_config(stage, data=2, fsdp=4), jax.devices())


@functools.cache
def reference_run():
  return train_run(zero_config(data=1), jax.devices()[:1], with_grads=False)


def is_large(shape, fsdp):
  return math.prod(shape) >= MIN_SIZE and any(n % fsdp == 0 for n in shape)


def expected_bytes(tree, split: bool, fsdp=4):
  """Bytes per device if the stage splits this tree: large arrays hold 1/fsdp, others all."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    nbytes = leaf.size * leaf.dtype.itemsize
    total += nbytes // fsdp if split and is_large(leaf.shape, fsdp) else nbytes
  return total


def per_device(tree):
  totals = set(sharding.bytes_per_device(tree).values())
  assert len(totals) == 1, totals  # every device holds the same amount
  return totals.pop()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bytes_per_device_are_what_the_stage_promises(stage):
  run = stage_run(stage)
  params, opt_state, grads = run.state.params, run.state.opt_state, run.grads
  assert per_device(params) == expected_bytes(params, split=stage >= 3)
  assert per_device(opt_state) == expected_bytes(opt_state, split=stage >= 1)
  assert per_device(grads) == expected_bytes(grads, split=stage >= 2)
  # Splitting saves something real here: the large kernels are most of the model.
  assert expected_bytes(params, split=True) < 0.5 * expected_bytes(params, split=False)
  kernel = run.state.params["stage2_block1"]["conv2"]["kernel"]  # (3, 3, 16, 16)
  shard_sizes = {s.data.size for s in kernel.addressable_shards}
  assert shard_sizes == {kernel.size // 4 if stage == 3 else kernel.size}
  scale = run.state.params["stem_bn"]["scale"]  # small: whole on every device
  assert {s.data.size for s in scale.addressable_shards} == {scale.size}


def test_every_stage_and_mesh_trains_the_same():
  """Same seeded steps, same losses and parameters as one device. (data=8) and
  (data=4, fsdp=2) are checked the same way by test_same_losses_and_params_on_every_mesh."""
  reference = reference_run()
  assert reference.losses[-1] != reference.losses[0]
  for stage in (0, 1, 2, 3):
    assert_same_training(stage_run(stage), reference, f"stage {stage} on data=2, fsdp=4")
  mesh = {"data": 2, "fsdp": 2, "model": 2}
  run = train_run(zero_config(2, **mesh), jax.devices(), with_grads=False)
  assert_same_training(run, reference, f"stage 2 on {mesh}")


def _hlo_instructions(hlo: str) -> dict:
  """name -> (result shapes, opcode, operand names, called computation) for HLO text."""
  pattern = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([a-z][\w\-]*)\((.*)$")
  out = {}
  for line in hlo.splitlines():
    match = pattern.match(line)
    if match:
      name, result_type, opcode, rest = match.groups()
      shapes = [tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"\w+\[([\d,]*)\]", result_type)]
      called = re.search(r"calls=%([\w.\-]+)", rest)
      out[name] = (shapes, opcode, re.findall(r"%([\w.\-]+)", rest),
                   called.group(1) if called else None)
  return out


def _computation_bodies(hlo: str) -> dict:
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"^%([\w.\-]+) .*\{$", line)
    if header:
      name, bodies[name] = header.group(1), ""
    elif name:
      bodies[name] += line + "\n"
  return bodies


def reduce_scattered_shapes(hlo: str) -> set:
  """Shapes of results that a reduce-scatter produces in compiled HLO text.

  GPU and TPU compilers emit a `reduce-scatter`. XLA:CPU has no pass that forms one, so there
  it stays in the form the SPMD partitioner wrote: an all-reduce whose result is only ever
  dynamic-sliced down to this device's shard (the exact pattern the GPU/TPU pass rewrites).
  """
  instructions = _hlo_instructions(hlo)
  bodies = _computation_bodies(hlo)
  users = collections.defaultdict(list)
  for name, (_, _, operands, _) in instructions.items():
    for operand in operands:
      users[operand].append(name)

  def is_slice(name):
    _, opcode, _, called = instructions[name]
    return opcode == "dynamic-slice" or (
        opcode == "fusion" and "dynamic-slice(" in bodies.get(called, ""))

  shapes = set()
  for name, (result_shapes, opcode, _, _) in instructions.items():
    if opcode.startswith("reduce-scatter"):
      shapes.update(result_shapes)
    if opcode not in ("all-reduce", "all-reduce-done"):
      continue
    values = [name]
    if len(result_shapes) > 1:  # a combined all-reduce: its elements are tuple reads
      values = [u for u in users[name] if instructions[u][1] == "get-tuple-element"]
    for value in values:
      if users[value] and all(is_slice(u) for u in users[value]):
        shapes.update(instructions[u][0][0] for u in users[value])
  return shapes


def test_stage_two_step_reduce_scatters_the_gradients():
  shard_shapes = {tuple(g.addressable_shards[0].data.shape)
                  for g in jax.tree.leaves(stage_run(2).grads) if is_large(g.shape, 4)}
  assert len(shard_shapes) >= 3
  assert shard_shapes <= reduce_scattered_shapes(stage_run(2).hlo)
  # Stage 0 keeps whole gradients: no gradient shard is ever reduce-scattered.
  assert not shard_shapes & reduce_scattered_shapes(stage_run(0).hlo)


COLLECTIVE = re.compile(r"^(all-reduce|reduce-scatter)(-start)?$")


def loop_and_step_reductions(hlo: str) -> tuple[set, set]:
  """Result shapes of the cross-device sums (all-reduce, reduce-scatter) inside while bodies,
  and of those elsewhere in the step."""
  instructions = _hlo_instructions(hlo)
  bodies = _computation_bodies(hlo)
  loop_names = set()
  for body in re.findall(r"body=%([\w.\-]+)", hlo):
    loop_names.update(_hlo_instructions(bodies[body]))
  inside, outside = set(), set()
  for name, (shapes, opcode, _, _) in instructions.items():
    if COLLECTIVE.match(opcode):
      (inside if name in loop_names else outside).update(shapes)
  return inside, outside


@pytest.mark.parametrize("stage,mesh", [(0, {"data": 8}), (2, {"data": 2, "fsdp": 4})])
def test_accumulation_reduces_the_gradients_once_per_step(stage, mesh):
  """4 micro-batches: no gradient is summed across devices inside the scan's while loop,
  only once after it. BatchNorm's statistics ((2, channels): mean and mean of squares) are
  the only sums inside."""
  config = zero_config(stage, accum=4, **mesh)
  config.batch_size = 32
  run = train_run(config, jax.devices())
  assert re.search(r" while\(", run.hlo)
  params = jax.tree.leaves(run.state.params)
  gradient_shapes = {tuple(p.shape) for p in params} | {
      tuple(g.addressable_shards[0].data.shape) for g in jax.tree.leaves(run.grads)}
  inside, outside = loop_and_step_reductions(run.hlo)
  assert inside, "BatchNorm needs its statistics summed inside the loop"
  assert not inside & gradient_shapes, sorted(inside & gradient_shapes)
  channels = {p.shape[0] for p in params if p.ndim == 1}
  assert inside <= {(2, c) for c in channels}, sorted(inside)
  kernels = {tuple(g.addressable_shards[0].data.shape) for g in jax.tree.leaves(run.grads)
             if g.ndim == 4}
  assert kernels <= outside  # summed once, after the loop, in the stage's layout
  split = {tuple(g.addressable_shards[0].data.shape) for g in jax.tree.leaves(run.grads)
           if g.addressable_shards[0].data.shape != g.shape}
  assert len(split) >= 3 if stage == 2 else not split
  assert split <= reduce_scattered_shapes(run.hlo)


def test_rules_override_the_split_and_the_optimizer_state_follows():
  config = zero_config(stage=3, data=2, fsdp=4)
  config.mesh.rules = ((r"stage1_block1/conv1/kernel", ()),
                       (r"head/kernel", ("fsdp", None)))
  mesh = sharding.make_mesh(config.mesh)
  model = build.create_model(config)
  _, tx = build.create_optimizer(config, 10, 10)
  shapes, shardings = build.abstract_train_state(model, tx, config, mesh)
  specs = jax.tree.map(lambda s: s.spec, shardings.params)
  assert specs["stage1_block1"]["conv1"]["kernel"] == sharding.P()
  assert specs["stage1_block1"]["conv2"]["kernel"] == sharding.P(None, None, None, "fsdp")
  assert specs["head"]["kernel"] == sharding.P("fsdp", None)  # (16, 10): below min size
  momentum = shardings.opt_state[1][0].trace
  assert momentum["stage1_block1"]["conv1"]["kernel"].spec == sharding.P()
  assert momentum["head"]["kernel"].spec == sharding.P("fsdp", None)
  config.mesh.rules = ((r"head/kernel", (None, "fsdp")),)  # 10 classes over 4 devices
  with pytest.raises(config_lib.ConfigError, match=r"head/kernel.*does not divide 10"):
    build.abstract_train_state(model, tx, config, mesh)


def test_model_axis_splits_output_channels_at_every_stage():
  model = build.create_model(zero_config())
  for stage in (0, 3):
    config = zero_config(stage, data=2, fsdp=2, model=2)
    mesh = sharding.make_mesh(config.mesh)
    _, tx = build.create_optimizer(config, 10, 10)
    _, shardings = build.abstract_train_state(model, tx, config, mesh)
    kernel = shardings.params["stage2_block1"]["conv2"]["kernel"].spec
    assert kernel == (sharding.P(None, None, "fsdp", "model") if stage == 3 else
                      sharding.P(None, None, None, "model"))
    assert shardings.params["stem_bn"]["scale"].spec == sharding.P()
    batch = sharding.batch_sharding(mesh).spec
    assert "model" not in jax.tree.leaves(tuple(batch))


class FakeDevice:
  """What mesh_utils reads of a device (not a tuple: numpy would unpack it)."""
  platform = device_kind = "cpu"

  def __init__(self, device_id, process_index):
    self.id, self.process_index = device_id, process_index


def test_hybrid_mesh_keeps_fsdp_and_model_inside_each_host():
  """4 hosts x 8 devices (stand-ins: mesh_utils needs only these attributes), data across
  hosts: every fsdp x model group is one host's devices; the data axis crosses hosts."""
  devices = [FakeDevice(8 * host + i, host) for host in range(4) for i in range(8)]
  config = zero_config(data=-1, fsdp=4, model=2)
  config.mesh.across_hosts = "data"
  grid = sharding.device_grid(config.mesh, devices)
  assert grid.shape == (4, 4, 2)
  for data_index in range(4):
    assert {d.process_index for d in grid[data_index].flat} == {data_index}
  config.mesh.update(dict(data=2, fsdp=-1, across_hosts="fsdp"))  # fsdp over 16 = 4 hosts x 4
  grid = sharding.device_grid(config.mesh, devices)
  assert grid.shape == (2, 8, 2)
  assert len({d.process_index for d in grid[:, 0].flat}) == 1  # one host: the data axis
  assert {d.process_index for d in grid[0, :, 0].flat} == {0, 1, 2, 3}
  config.mesh.update(dict(data=2, fsdp=8, model=2, across_hosts="data"))
  with pytest.raises(config_lib.ConfigError, match=r"across_hosts='data'.*2 devices.*4 hosts"):
    sharding.device_grid(config.mesh, devices)


def test_one_process_mesh_is_the_plain_mesh_and_across_hosts_is_checked():
  config = zero_config(data=2, fsdp=2, model=2)
  assert sharding.device_grid(config.mesh, jax.devices()) is None  # one host: JAX's order
  mesh = sharding.make_mesh(config.mesh)
  plain = jax.make_mesh((2, 2, 2), sharding.MESH_AXES, devices=jax.devices())
  assert (mesh.devices == plain.devices).all()
  config.mesh.across_hosts = "model"
  with pytest.raises(config_lib.ConfigError, match=r"across_hosts='model'.*'data' or 'fsdp'"):
    sharding.check_mesh_config(config.mesh, 8)
  config.mesh.across_hosts = "fsdp"
  with pytest.raises(config_lib.ConfigError, match=r"mesh.fsdp=2 does not split over the 4 "):
    sharding.check_mesh_config(config.mesh, 8, process_count=4)
