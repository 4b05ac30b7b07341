"""The train step's gradient accumulation: micro-batches one after another inside the step."""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
  grad_shardings = sharding.grad_shardings(mesh, state.params, config.mesh)
  grads, stats, metrics = jax.jit(steps.make_compute_grads(config.data, config.optim, 4,
                                                           grad_shardings))(state, batch)
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


def test_grad_accumulation_with_batchnorm_trains_the_same_on_every_mesh():
  """BatchNorm over each whole micro-batch, wherever its examples are: one device, ZeRO-3
  over fsdp, ZeRO-2 with the model axis."""
  config = zero_config(stage=3, accum=4, data=1)
  config.batch_size = 32
  reference = train_run(config, jax.devices()[:1], with_grads=False)
  assert reference.losses[-1] != reference.losses[0]
  for stage, mesh in ((3, {"data": 2, "fsdp": 4}), (2, {"data": 2, "fsdp": 2, "model": 2})):
    config = zero_config(stage, accum=4, **mesh)
    config.batch_size = 32
    run = train_run(config, jax.devices(), with_grads=False)
    assert_same_training(run, reference, f"4 micro-batches, stage {stage} on {mesh}")


class DenseOnly(nn.Module):
  """No BatchNorm and no variables but its parameters: batch_stats is an empty FrozenDict."""
  bn_axis_name: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


def test_grad_accumulation_without_any_batch_stats():
  config = zero_config(stage=2, accum=4, data=4, fsdp=2)
  config.batch_size = 32
  mesh = sharding.make_mesh(config.mesh)
  _, _, tx = model_and_optimizer("resnet_tiny")
  state = steps.init_train_state(DenseOnly(), tx, config.data.image_size, jax.random.key(0))
  assert not jax.tree.leaves(state.batch_stats)
  grad_shardings = sharding.grad_shardings(mesh, state.params, config.mesh)
  batch = put_batch(synthetic_batches(config, 1)[0], mesh)
  accumulated, _, metrics = jax.jit(steps.make_compute_grads(
      config.data, config.optim, 4, grad_shardings))(state, batch)
  whole, _, whole_metrics = jax.jit(steps.make_compute_grads(config.data, config.optim))(
      state, batch)
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7)
  jax.tree.map(close, accumulated, whole)
  close(float(metrics["loss"]), float(whole_metrics["loss"]))


def test_grad_accumulation_needs_the_gradient_layout_and_a_model_that_takes_the_axis():
  config = zero_config(accum=4)
  with pytest.raises(ValueError, match="grad_accum_steps > 1 needs grad_shardings"):
    steps.make_compute_grads(config.data, config.optim, 4)
  with pytest.raises(TypeError, match="bn_axis_name"):
    steps.with_batchnorm_axis(lambda variables, x: x, ("data", "fsdp"))
