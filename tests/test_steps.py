"""The train step's gradient accumulation: micro-batches one after another inside the step."""

import functools

import jax
import numpy as np

from jaxcls import build, sharding, steps
from helpers import (NUM_STEPS, assert_same_training, initial_state, model_and_optimizer,
                     put_batch, synthetic_batches, train_run, zero_config)


def test_grad_accumulation_matches_one_big_batch():
  config = zero_config(stage=2, data=4, fsdp=2)
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
  config = zero_config(stage=3, accum=4, data=4, fsdp=2)
  config.batch_size = 32
  mesh = sharding.make_mesh(config.mesh)
  model, _, tx = model_and_optimizer("resnet_tiny")
  _, state_shardings = build.abstract_train_state(model, tx, config, mesh)
  state = jax.device_put(initial_state("resnet_tiny"), state_shardings)
  batch = put_batch(synthetic_batches(config, 1)[0], mesh)
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
