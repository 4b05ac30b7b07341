"""Training over a device mesh: the same steps on any mesh give the same result."""

import jax
import numpy as np
import pytest

from jaxcls import config as config_lib
from jaxcls import build, models, optim, sharding, steps, train


def tiny_config(**mesh):
  config = config_lib.base_config()
  config.model.name = "resnet_tiny"
  config.batch_size = 16
  config.data.image_size = 16
  config.mesh.data = mesh.get("data", -1)
  config.mesh.fsdp = mesh.get("fsdp", 1)
  config.mesh.fsdp_min_size = 256  # small enough that the tiny model's kernels get split
  config.optim.warmup_epochs = 0.0
  config.optim.learning_rate = 0.05
  return config


def synthetic_batches(config, num_steps, seed=0):
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  return [{
      "image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
      "label": rng.integers(0, config.data.num_classes, (config.batch_size,), dtype=np.int32),
  } for _ in range(num_steps)]


def train_on_mesh(config, devices, batches):
  mesh = sharding.make_mesh(config.mesh, devices)
  model = models.create_model(config.model, config.data.num_classes)
  schedule = optim.create_schedule(config.optim, config.batch_size, 10, 10)
  tx = optim.create_optimizer(config.optim, schedule)
  state, state_shardings = build.create_train_state(model, tx, config, mesh)
  train_step = build.compile_train_step(
      steps.make_train_step(config.data, config.optim, schedule),
      state, state_shardings, mesh, config)
  batch_sharding = sharding.batch_sharding(mesh)
  losses = []
  for batch in batches:
    global_batch = jax.tree.map(lambda x: jax.device_put(x, batch_sharding), batch)
    state, metrics = train_step(state, global_batch)
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state


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


@pytest.mark.parametrize("mesh_data,mesh_fsdp,message", [
    (3, 1, "config.mesh"),
    (-1, -1, "only one axis may be -1"),
    (-1, 3, "do not divide"),
])
def test_bad_mesh_is_a_config_error(mesh_data, mesh_fsdp, message):
  config = tiny_config(data=mesh_data, fsdp=mesh_fsdp)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.check_config(config, num_devices=8)


def test_batch_size_not_divisible_names_key_and_fix():
  config = tiny_config()
  config.batch_size = 20
  with pytest.raises(config_lib.ConfigError, match=r"config.batch_size=20 .* 8 data-parallel.*"
                     r"--config.batch_size=16"):
    config_lib.check_config(config, num_devices=8)


def test_unknown_model_names_key_and_choices():
  config = tiny_config()
  config.model.name = "resnet19"
  with pytest.raises(config_lib.ConfigError, match=r"config.model.name.*resnet19.*resnet18"):
    config_lib.check_config(config, num_devices=8)


def test_unknown_key_in_a_config_file_suggests_the_known_one():
  config = tiny_config()
  config.optim.unlock()
  config.optim.learing_rate = 0.3
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.learing_rate.*"
                     r"config.optim.learning_rate"):
    config_lib.check_config(config, num_devices=8)


def test_schedules_warm_up_then_follow_their_shape():
  config = config_lib.base_config().optim
  config.learning_rate = 0.4
  config.warmup_epochs = 1
  for name in ("cosine", "constant", "step"):
    config.schedule = name
    schedule = optim.create_schedule(config, batch_size=256, total_steps=100, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0
    np.testing.assert_allclose(float(schedule(10)), 0.4, rtol=1e-6)
    assert float(schedule(5)) == pytest.approx(0.2)
  config.schedule = "cosine"
  assert float(optim.create_schedule(config, 256, 100, 10)(100)) == pytest.approx(0.0, abs=1e-7)
  config.schedule = "step"
  step = optim.create_schedule(config, 256, 100, 10)
  assert float(step(60)) == pytest.approx(0.04)
  assert float(step(80)) == pytest.approx(0.004)
  config.schedule = "constant"
  config.lr_scaling = "linear"
  assert float(optim.create_schedule(config, 1024, 100, 10)(50)) == pytest.approx(1.6)


def test_weight_decay_skips_batchnorm_and_bias():
  config = tiny_config()
  model = models.create_model(config.model, config.data.num_classes)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                np.zeros((1, 16, 16, 3), np.float32),
                                                train=False))
  mask = optim.decay_mask(variables["params"])
  flat = dict(jax.tree_util.tree_leaves_with_path(mask))
  for path, decayed in flat.items():
    name = jax.tree_util.keystr(path)
    assert decayed == name.endswith("['kernel']"), name
