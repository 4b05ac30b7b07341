"""The optimizer: learning-rate schedules, weight decay on kernels only, and the optimizers
by name: each against optax's own on the same gradients, LARS's exclusions, the fine-tuning
groups, and the large-batch LARS config step by step."""

import jax
import numpy as np
import optax
import pytest

from jaxcls import config as config_lib
from jaxcls import build, optim, sharding, steps
from jaxcls.errors import ConfigError
from helpers import put_batch, synthetic_batches, tiny_config, zero_config
from runner import REPO


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
  model = build.create_model(config)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0),
                                                np.zeros((1, 16, 16, 3), np.float32),
                                                train=False))
  mask = optim.decay_mask(variables["params"])
  flat = dict(jax.tree_util.tree_leaves_with_path(mask))
  for path, decayed in flat.items():
    name = jax.tree_util.keystr(path)
    assert decayed == name.endswith("['kernel']"), name


def test_polynomial_schedule_decays_from_the_peak_to_the_end_value():
  config = config_lib.base_config().optim
  config.update(dict(schedule="polynomial", learning_rate=0.4, end_learning_rate=0.004,
                     polynomial_power=2.0, warmup_epochs=1))
  schedule = optim.create_schedule(config, batch_size=256, total_steps=100, steps_per_epoch=10)
  assert float(schedule(5)) == pytest.approx(0.2)  # the warmup
  assert float(schedule(10)) == pytest.approx(0.4)
  assert float(schedule(55)) == pytest.approx(0.004 + 0.396 * (1 - 45 / 90) ** 2)
  assert float(schedule(100)) == pytest.approx(0.004)


# A parameter tree named as the models name theirs, and which leaves are "kernels".
SHAPES = {"conv1": {"kernel": (3, 3, 2, 4)}, "bn1": {"scale": (4,), "bias": (4,)},
          "head": {"kernel": (4, 3), "bias": (3,)}}
KERNELS = {"conv1": {"kernel": True}, "bn1": {"scale": False, "bias": False},
           "head": {"kernel": True, "bias": False}}


def random_tree(rng, scale=1.0):
  return jax.tree.map(lambda shape: (scale * rng.normal(size=shape)).astype(np.float32),
                      SHAPES, is_leaf=lambda x: isinstance(x, tuple))


def optim_config(name, **overrides):
  config = config_lib.base_config().optim
  config.update({"name": name, "weight_decay": 0.01, **overrides})
  return config


def updates_of(tx, num_steps=3, seed=0):
  """The updates of num_steps steps of tx from seeded params and gradients."""
  rng = np.random.default_rng(seed)
  params = random_tree(rng)
  state = tx.init(params)
  updates_seen = []
  for _ in range(num_steps):
    updates, state = tx.update(random_tree(rng, 0.1), state, params)
    params = optax.apply_updates(params, updates)
    updates_seen.append(updates)
  return updates_seen


def kernels(params):
  """True for the leaves named 'kernel', by their printed key path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: jax.tree_util.keystr(path).endswith("['kernel']"), params)


def plain_optax(name, lr, config):
  """optax's own transformation for `name`, with the kernels-only mask written out."""
  if name == "sgd":
    return optax.chain(optax.add_decayed_weights(config.weight_decay, mask=kernels),
                       optax.sgd(lr, momentum=config.momentum, nesterov=config.nesterov))
  if name == "lars":
    return optax.lars(lr, weight_decay=config.weight_decay, weight_decay_mask=kernels,
                      trust_coefficient=config.trust_coefficient, eps=config.eps,
                      trust_ratio_mask=kernels, momentum=config.momentum,
                      nesterov=config.nesterov)
  adam = dict(b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=config.weight_decay,
              mask=kernels)
  return optax.lamb(lr, **adam) if name == "lamb" else optax.adamw(lr, **adam)


@pytest.mark.parametrize("name", optim.NAMES)
def test_each_optimizer_makes_the_updates_of_optax_itself(name):
  config = optim_config(name)
  schedule = optax.linear_schedule(0.1, 0.05, 3)
  got = updates_of(optim.create_optimizer(config, schedule))
  want = updates_of(plain_optax(name, schedule, config))
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(got))


def test_lars_leaves_batchnorm_and_biases_out_of_decay_and_trust_ratio():
  """First step, no momentum yet: a kernel moves by lr * trust ratio * (g + wd w); a
  BatchNorm scale or bias, and any bias, by lr * g."""
  lr, wd, coefficient = 0.5, 0.1, 0.001
  config = optim_config("lars", weight_decay=wd, trust_coefficient=coefficient, eps=0.0,
                        nesterov=False)
  rng = np.random.default_rng(1)
  params, grads = random_tree(rng), random_tree(rng, 0.1)
  tx = optim.create_optimizer(config, optax.constant_schedule(lr))
  updates, _ = tx.update(grads, tx.init(params), params)
  for layer, leaves in KERNELS.items():
    for leaf, is_kernel in leaves.items():
      w, g = params[layer][leaf].astype(np.float64), grads[layer][leaf].astype(np.float64)
      if is_kernel:
        decayed = g + wd * w
        want = -lr * coefficient * np.linalg.norm(w) / np.linalg.norm(decayed) * decayed
      else:
        want = -lr * g
      np.testing.assert_allclose(updates[layer][leaf], want, rtol=1e-5, err_msg=f"{layer}/{leaf}")


@pytest.mark.parametrize("name", ["lars", "lamb", "adamw"])
def test_named_optimizers_take_the_fine_tuning_groups(name):
  """freeze: no update at all; the head as without groups; the backbone at 0.1 of that."""
  schedule = optax.constant_schedule(0.1)
  [plain] = updates_of(optim.create_optimizer(optim_config(name), schedule), num_steps=1)
  tuned_config = optim_config(name, freeze="^bn1/", head_params="^head/", backbone_lr_scale=0.1)
  [tuned] = updates_of(optim.create_optimizer(tuned_config, schedule), num_steps=1)
  assert not np.any(tuned["bn1"]["scale"]) and not np.any(tuned["bn1"]["bias"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
               tuned["head"], plain["head"])
  np.testing.assert_allclose(tuned["conv1"]["kernel"], 0.1 * plain["conv1"]["kernel"],
                             rtol=1e-5)


@pytest.mark.parametrize("key, value, message", [
    ("name", "adam", r"config.optim.name='adam' is not known; use one of sgd, lars, lamb, "
     "adamw"),
    ("b2", 1.0, r"config.optim.b2=1.0 must be in \[0.0, 1.0\)"),
    ("eps", -1e-8, r"config.optim.eps=-1e-08 must be a finite number >= 0"),
    ("trust_coefficient", 0.0, r"config.optim.trust_coefficient=0.0 must be a finite number > 0"),
    ("schedule", "linear", r"config.optim.schedule='linear' is not known; use one of cosine, "
     "constant, step, polynomial"),
])
def test_optimizer_keys_are_checked_by_name(key, value, message):
  config = config_lib.base_config().optim
  config[key] = value
  with pytest.raises(ConfigError, match=message):
    optim.check_config(config)


def test_the_large_batch_lars_config_steps_as_optax_lars():
  """configs/imagenet_resnet50_lars.py on a tiny model and synthetic batches: three train
  steps against optax.lars applied by hand to the same step's gradients."""
  overrides = {"model.name": "resnet_tiny", "model.width": 8, "model.stem": "small",
               "model.zero_init_residual": False, "data.source": "synthetic",
               "data.image_size": 16, "data.num_classes": 10, "batch_size": 16,
               "num_train_steps": 3, "optim.warmup_epochs": 0.0}
  config = config_lib.load_config(str(REPO / "configs" / "imagenet_resnet50_lars.py"), overrides)
  assert (config.optim.name, config.optim.schedule) == ("lars", "polynomial")
  config_lib.check_config(config, num_devices=8)
  assert config.model.to_dict() == {**zero_config().model.to_dict(), "stem": "small"}
  config.mesh.data = 1  # the optimizer is the question here, not the mesh: one device
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  model = build.create_model(config)
  schedule, tx = build.create_optimizer(config, 3, 1)
  abstract, shardings = build.abstract_train_state(model, tx, config, mesh)
  rng = np.random.default_rng(0)  # seeded weights made on the host: no initializer to compile
  params = jax.tree.map(lambda a: rng.normal(0, 0.2, a.shape).astype(a.dtype), abstract.params)
  state = steps.TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                  batch_stats=jax.tree.map(lambda a: np.ones(a.shape, a.dtype),
                                                           abstract.batch_stats))
  train_step = build.config_train_step(config, mesh, schedule, abstract, shardings)
  compute_grads = jax.jit(steps.make_compute_grads(config.data, config.optim))
  reference = plain_optax("lars", schedule, config.optim)
  state = jax.device_put(state, shardings)
  params = jax.device_get(state.params)
  reference_state = reference.init(params)
  for batch in synthetic_batches(config, 3):
    batch = put_batch(batch, mesh)
    grads = jax.device_get(compute_grads(state, batch)[0])
    updates, reference_state = reference.update(grads, reference_state, params)
    params = optax.apply_updates(params, updates)
    state, _ = train_step(state, batch)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.device_get(state.params), params)
