"""ZeRO stages, the model axis, gradient accumulation and multi-process starts (8 CPU devices)."""

import collections
import functools
import math
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls import config as config_lib
from jaxcls import build, distributed, memory, models, optim, sharding, steps, train
from runner import REPO, free_port, main_env, records, run_main
import test_train
from test_train import synthetic_batches

MIN_SIZE = 256  # small enough that the tiny model's 3x3 kernels are "large"
NUM_STEPS = 3


def tiny_config(stage=3, accum=1, data=-1, fsdp=1, model=1):
  config = test_train.tiny_config(data=data, fsdp=fsdp)
  config.model.width = 8
  config.model.zero_init_residual = False  # every kernel gets a gradient from step 1
  config.mesh.model = model
  config.mesh.zero_stage = stage
  config.grad_accum_steps = accum
  assert config.mesh.fsdp_min_size == MIN_SIZE
  return config


Run = collections.namedtuple("Run", "losses params state grads hlo")


@functools.cache
def model_and_optimizer(model_name):
  """One model and optimizer for all runs, so that one initial state serves every mesh."""
  config = tiny_config()
  model = (models.create_model(config.model, config.data.num_classes)
           if model_name == "resnet_tiny" else NoBatchNormNet())
  schedule = optim.create_schedule(config.optim, config.batch_size, 10, 10)
  return model, schedule, optim.create_optimizer(config.optim, schedule)


@functools.cache
def initial_state(model_name):
  """The seeded initial state on the host: placed on each mesh with device_put, which is
  much cheaper than compiling the initializer once per mesh."""
  model, _, tx = model_and_optimizer(model_name)
  config = tiny_config(data=1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  return jax.device_get(build.create_train_state(model, tx, config, mesh)[0])


def train_run(config, devices, model_name="resnet_tiny", with_grads=True):
  """NUM_STEPS seeded steps; also the gradients of the first batch in the stage's layout.

  The gradients are an intermediate of the train step, so they are measured by jitting the
  step's own gradient function (steps.make_compute_grads, with the same grad shardings)
  and reading the shards of its outputs.
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  model, schedule, tx = model_and_optimizer(model_name)
  _, state_shardings = build.abstract_train_state(model, tx, config, mesh)
  state = jax.device_put(initial_state(model_name), state_shardings)
  grad_shardings = sharding.grad_shardings(mesh, state.params, config.mesh)
  train_step = build.compile_train_step(
      steps.make_train_step(config.data, config.optim, schedule,
                            config.grad_accum_steps, grad_shardings),
      state, state_shardings, mesh, config)
  batches = synthetic_batches(config, NUM_STEPS)
  batch_sharding = sharding.batch_sharding(mesh)
  put = lambda batch: jax.tree.map(lambda x: jax.device_put(x, batch_sharding), batch)
  grads = None
  if with_grads:
    compute_grads = jax.jit(steps.make_compute_grads(
        config.data, config.optim, config.grad_accum_steps, grad_shardings))
    grads = compute_grads(state, put(batches[0]))[0]
  losses = []
  for batch in batches:
    state, metrics = train_step(state, put(batch))
    losses.append(float(metrics["loss"]))
  return Run(losses, jax.device_get(state.params), state, grads, train_step.as_text())


@functools.cache
def stage_run(stage):
  return train_run(tiny_config(stage, data=2, fsdp=4), jax.devices())


@functools.cache
def reference_run():
  return train_run(tiny_config(data=1), jax.devices()[:1], with_grads=False)


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


def assert_same_training(run, reference, label):
  np.testing.assert_allclose(run.losses, reference.losses, rtol=2e-5, atol=2e-5, err_msg=label)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5,
                                                       err_msg=label),
               run.params, reference.params)


def test_every_stage_and_mesh_trains_the_same():
  """Same seeded steps, same losses and parameters as one device. (data=8) and
  (data=4, fsdp=2) are checked the same way by test_train.py's mesh test."""
  reference = reference_run()
  assert reference.losses[-1] != reference.losses[0]
  for stage in (0, 1, 2, 3):
    assert_same_training(stage_run(stage), reference, f"stage {stage} on data=2, fsdp=4")
  mesh = {"data": 2, "fsdp": 2, "model": 2}
  run = train_run(tiny_config(2, **mesh), jax.devices(), with_grads=False)
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


class NoBatchNormNet(nn.Module):
  """Conv-ReLU-pool-Dense, plus a call counter in the batch_stats collection."""

  @nn.compact
  def __call__(self, x, train: bool):
    calls = self.variable("batch_stats", "calls", lambda: jnp.zeros((), jnp.int32))
    if train:
      calls.value += 1
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_grad_accumulation_matches_one_big_batch():
  config = tiny_config(stage=2, data=4, fsdp=2)
  config.batch_size = 32
  whole = train_run(config, jax.devices(), "no_batchnorm", with_grads=False)
  config.grad_accum_steps = 4  # 4 micro-batches of 8: one example per device each
  accumulated = train_run(config, jax.devices(), "no_batchnorm", with_grads=False)
  assert_same_training(accumulated, whole, "4 x 8 vs 32")
  # The running statistics are updated once per micro-batch.
  assert int(whole.state.batch_stats["calls"]) == NUM_STEPS
  assert int(accumulated.state.batch_stats["calls"]) == 4 * NUM_STEPS


def test_grad_accumulation_with_batchnorm_is_micro_batch_steps():
  """With BatchNorm, 4 x B/4 equals four B/4 gradient passes (each normalized by its own
  micro-batch, statistics threaded through) averaged into one update."""
  config = tiny_config(stage=3, accum=4, data=4, fsdp=2)
  config.batch_size = 32
  mesh = sharding.make_mesh(config.mesh)
  model, _, tx = model_and_optimizer("resnet_tiny")
  _, state_shardings = build.abstract_train_state(model, tx, config, mesh)
  state = jax.device_put(initial_state("resnet_tiny"), state_shardings)
  batch = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh)),
                       synthetic_batches(config, 1)[0])
  grads, stats, metrics = jax.jit(steps.make_compute_grads(config.data, config.optim, 4))(
      state, batch)
  one = jax.jit(steps.make_compute_grads(config.data, config.optim, 1))
  manual_stats, manual_grads, losses = state.batch_stats, [], []
  for i in range(4):
    micro = jax.tree.map(lambda x: x[i::4], batch)  # micro-batch i: examples i, i+4, ...
    g, manual_stats, m = one(state.replace(batch_stats=manual_stats), micro)
    manual_grads.append(g)
    losses.append(float(m["loss"]))
  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6)
  jax.tree.map(lambda a, *b: close(a, np.mean(b, axis=0)), grads, *manual_grads)
  jax.tree.map(close, stats, manual_stats)
  close(float(metrics["loss"]), np.mean(losses))


def test_rules_override_the_split_and_the_optimizer_state_follows():
  config = tiny_config(stage=3, data=2, fsdp=4)
  config.mesh.rules = ((r"stage1_block1/conv1/kernel", ()),
                       (r"head/kernel", ("fsdp", None)))
  mesh = sharding.make_mesh(config.mesh)
  model = models.create_model(config.model, config.data.num_classes)
  tx = optim.create_optimizer(config.optim, optim.create_schedule(config.optim, 16, 10, 10))
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
  model = models.create_model(tiny_config().model, 10)
  for stage in (0, 3):
    config = tiny_config(stage, data=2, fsdp=2, model=2)
    mesh = sharding.make_mesh(config.mesh)
    tx = optim.create_optimizer(config.optim, optim.create_schedule(config.optim, 16, 10, 10))
    _, shardings = build.abstract_train_state(model, tx, config, mesh)
    kernel = shardings.params["stage2_block1"]["conv2"]["kernel"].spec
    assert kernel == (sharding.P(None, None, "fsdp", "model") if stage == 3 else
                      sharding.P(None, None, None, "model"))
    assert shardings.params["stem_bn"]["scale"].spec == sharding.P()
    batch = sharding.batch_sharding(mesh).spec
    assert "model" not in jax.tree.leaves(tuple(batch))


@pytest.mark.parametrize("key,value,message", [
    ("mesh.zero_stage", 4, r"config.mesh.zero_stage=4"),
    ("mesh.rules", (("kernel", ("tensor",)),), r"names axis 'tensor'"),
    ("mesh.rules", (("(", ()),), r"bad regex"),
    ("grad_accum_steps", 3, r"does not split into 3 micro-batches.*--config.batch_size=48"),
    ("grad_accum_steps", 0, r"positive integer"),
    ("distributed.cluster_detection", "slurm", r"cluster_detection='slurm'"),
])
def test_parallel_config_errors_name_the_key(key, value, message):
  config = tiny_config()
  config.batch_size = 64
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.check_config(config, num_devices=8)


def test_model_axis_must_stay_within_a_process():
  config = tiny_config(model=8)
  config_lib.check_config(config, num_devices=8, process_count=1)
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh.model=8 .* 4 devices"):
    config_lib.check_config(config, num_devices=8, process_count=2)


def dist_config(**values):
  config = config_lib.base_config().distributed
  config.update(values)
  return config


def test_distributed_settings_come_in_order():
  resolve = distributed.resolve
  jax_env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
             "JAX_PROCESS_ID": "2"}
  torch_env = {"MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29500", "WORLD_SIZE": "2",
               "RANK": "1"}
  slurm_env = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
               "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  # Nothing anywhere: one process.
  assert resolve(dist_config(), environ={}) is None
  # Flags beat config, config beats the environment.
  explicit = resolve(dist_config(coordinator_address="h:1", num_processes=2, process_id=0),
                     "f:9", 3, 2, environ=jax_env)
  assert (explicit.coordinator_address, explicit.num_processes, explicit.process_id) == (
      "f:9", 3, 2)
  from_config = resolve(dist_config(coordinator_address="h:1", num_processes=2, process_id=1),
                        environ=jax_env)
  assert (from_config.coordinator_address, from_config.process_id) == ("h:1", 1)
  # JAX_* beat torchrun-style variables, which beat cluster detection.
  env = resolve(dist_config(), environ={**jax_env, **torch_env, **slurm_env})
  assert (env.coordinator_address, env.num_processes, env.process_id) == ("10.0.0.1:1234", 4, 2)
  env = resolve(dist_config(), environ={**torch_env, **slurm_env})
  assert (env.coordinator_address, env.num_processes, env.process_id) == ("10.0.0.9:29500", 2, 1)
  detected = resolve(dist_config(), environ=slurm_env)
  assert detected.coordinator_address is None and "slurm" in detected.source
  assert resolve(dist_config(cluster_detection="off"), environ=slurm_env) is None
  assert resolve(dist_config(), environ={**slurm_env, "SLURM_NTASKS": "1"}) is None
  assert resolve(dist_config(cluster_detection="jax"), environ={}).coordinator_address is None
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert distributed.detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}
                                    ) == "ompi"


@pytest.mark.parametrize("kwargs,environ,message", [
    ({"coordinator_address": "h:1"}, {}, "needs the coordinator address, the process count"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, r"not in 0\.\.1"),
    ({}, {"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set"),
])
def test_incomplete_distributed_settings_say_what_is_missing(kwargs, environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(dist_config(**kwargs), environ=environ)


SMOKE = ("--config.model.name=resnet_tiny", "--config.model.width=8",
         "--config.num_train_steps=3", "--config.log_every_steps=1", "--config.batch_size=32",
         "--config.eval_batch_size=512")


def test_missing_peers_end_in_a_clear_error_not_a_hang(tmp_path):
  result = run_main(tmp_path, *SMOKE, f"--coordinator_address=127.0.0.1:{free_port()}",
                    "--num_processes=2", "--process_id=0",
                    "--config.distributed.timeout_seconds=2", devices=4, timeout=60)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "process 0 of 2 could not join the multi-process run at 127.0.0.1:" in result.stderr, (
      result.stderr[-2000:])
  assert "within 2s" in result.stderr and "Check Failure" not in result.stderr


def test_launch_local_two_processes_match_one_process(tmp_path):
  """scripts/launch_local.sh: 2 processes x 4 devices (JAX_* variables) train like 1 x 8,
  with ZeRO-2 over fsdp and the model axis.

  Not with grad_accum_steps > 1: each process reads its own share of the data, so the global
  batch holds the same examples in another order, and with BatchNorm the micro-batches (which
  examples are normalized together) depend on that order.
  """
  parallel = ("--config.mesh.fsdp=2", "--config.mesh.model=2", "--config.mesh.zero_stage=2",
              "--config.mesh.fsdp_min_size=256", "--config.optim.warmup_epochs=0")
  single = run_main(tmp_path / "single", *SMOKE, *parallel)
  assert single.returncode == 0, single.stderr[-3000:]
  env = main_env(devices=1)
  del env["XLA_FLAGS"]
  env.update(PYTHON=sys.executable, DEVICES_PER_PROCESS="4")
  multi = subprocess.run(
      ["bash", str(REPO / "scripts/launch_local.sh"), "2", "--config",
       str(REPO / "configs/default.py"), "--workdir", str(tmp_path / "multi"), *SMOKE,
       *parallel], env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert multi.returncode == 0, multi.stderr[-3000:]
  assert multi.stdout.count("step 3/3") == 1  # only process 0 logs
  assert "2 process(es)" in multi.stdout
  losses = lambda path: [r["loss"] for r in records(path)]
  assert len(losses(tmp_path / "multi")) == 3
  np.testing.assert_allclose(losses(tmp_path / "multi"), losses(tmp_path / "single"),
                             rtol=1e-5)


def test_state_memory_per_device_shrinks_with_each_zero_stage():
  totals, parts = [], []
  for stage in (0, 1, 2, 3):
    config = config_lib.base_config()
    config.model.name, config.model.stem, config.data.image_size = "resnet18", "small", 32
    config.mesh.data, config.mesh.fsdp, config.mesh.zero_stage = 1, 8, stage
    parts.append(memory.state_memory(config))
    totals.append(parts[-1]["total"])
  assert totals == sorted(totals, reverse=True) and len(set(totals)) == 4
  whole = parts[0]["params"]
  assert parts[0]["gradients"] == whole  # stage 0: nothing split
  assert parts[0]["optimizer"] == pytest.approx(whole)  # momentum (+ a step count)
  # Stage 3: the big kernels are split 8 ways; the small arrays that stay whole are < 1%.
  assert whole / 8 <= parts[3]["params"] < whole / 8 * 1.1
  assert parts[3]["num_params"] == 11_173_962


def test_parameter_layout_names_what_each_stage_splits():
  config = config_lib.base_config()
  config.model.name, config.model.stem, config.data.image_size = "resnet18", "small", 32
  config.mesh.data, config.mesh.fsdp, config.mesh.zero_stage = 1, 8, 3
  layout = {name: (shape, spec) for name, shape, spec in memory.parameter_layout(config)}
  shape, spec = layout["stage4_block2/conv2/kernel"]
  assert shape == (3, 3, 512, 512) and "fsdp" in spec
  assert layout["head/bias"][1] == jax.sharding.PartitionSpec()  # small: stays whole
  config.mesh.zero_stage = 1  # parameters are not split below stage 3
  assert all(axis is None for _, _, spec in memory.parameter_layout(config) for axis in spec)
