"""The optimizer: learning-rate schedules, and weight decay on kernels only."""

import jax
import numpy as np
import pytest

from jaxcls import config as config_lib
from jaxcls import build, optim
from helpers import tiny_config


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
