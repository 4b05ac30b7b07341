"""The pure per-batch functions: train_step and eval_step, and the train state they carry.

They know nothing of meshes or loops: build.py jits them once with explicit shardings (the
only layout they take is an optional one for the gradients, ZeRO stage 2's reduce-scatter).
"""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from jaxcls.data import mixing


class TrainState(train_state.TrainState):
  """params + optimizer state (from flax) plus the BatchNorm running statistics."""
  batch_stats: Any = None


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 images -> float32, scaled to [0, 1], then standardized per channel."""
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
  # Integer labels, or soft targets [B, K] (mixup / cutmix).
  targets = labels if labels.ndim == logits.ndim else jax.nn.one_hot(labels, num_classes)
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def split_micro_batches(batch, num_micro_batches: int):
  """(B, ...) arrays -> (k, B/k, ...): micro-batch i takes examples i, i+k, i+2k, ...

  Each device holds a contiguous block of the batch, which this splits evenly among the
  micro-batches, so every micro-batch is spread over all devices and nothing moves.
  """
  k = num_micro_batches
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                      batch)


def make_compute_grads(data_config, optim_config, grad_accum_steps: int = 1,
                       grad_shardings=None):
  """Builds compute_grads(state, batch) -> (grads, batch_stats, metrics).

  grads is the mean gradient over the batch, summed over grad_accum_steps micro-batches in
  a scan (the activations of one micro-batch at a time). With grad_shardings (a tree like
  the params) each micro-batch's gradients are constrained to that layout, which is how
  ZeRO stage 2 gets its reduce-scatter; without, XLA picks (the parameters' layout).
  BatchNorm normalizes each micro-batch by its own statistics and updates its running
  averages once per micro-batch, in order.
  """
  num_classes = data_config.num_classes
  mean, std = tuple(data_config.mean), tuple(data_config.std)
  label_smoothing = float(optim_config.label_smoothing)
  k = int(grad_accum_steps)

  def constrain(grads):
    if grad_shardings is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, grad_shardings)

  def loss_and_grads(state: TrainState, batch_stats, batch):
    images = normalize(batch["image"], mean, std)
    labels = batch["label"]

    def loss_fn(params):
      logits, updates = state.apply_fn(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = cross_entropy(logits, batch.get("target", labels), num_classes,
                           label_smoothing).mean()
      # A model without BatchNorm has no statistics to update.
      return loss, (logits, updates.get("batch_stats", batch_stats))

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return constrain(grads), batch_stats, metrics

  def compute_grads(state: TrainState, batch):
    if k == 1:
      return loss_and_grads(state, state.batch_stats, batch)

    def accumulate(carry, micro_batch):
      grads_sum, batch_stats = carry
      grads, batch_stats, metrics = loss_and_grads(state, batch_stats, micro_batch)
      return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), metrics

    zeros = constrain(jax.tree.map(jnp.zeros_like, state.params))
    (grads_sum, batch_stats), metrics = jax.lax.scan(
        accumulate, (zeros, state.batch_stats), split_micro_batches(batch, k))
    # Equal micro-batches: the mean of their means is the mean over the batch.
    grads = jax.tree.map(lambda g: g / k, grads_sum)
    return grads, batch_stats, jax.tree.map(jnp.mean, metrics)

  return compute_grads


def make_train_step(data_config, optim_config, schedule, grad_accum_steps: int = 1,
                    grad_shardings=None, seed: int = 0):
  """Builds train_step(state, batch) -> (state, metrics); metrics are device scalars.

  The model comes with the state (its apply_fn). See make_compute_grads for grad_accum_steps
  and grad_shardings; `seed` seeds mixup / cutmix.
  """
  compute_grads = make_compute_grads(data_config, optim_config, grad_accum_steps,
                                     grad_shardings)

  def train_step(state: TrainState, batch):
    if mixing.enabled(data_config):  # a new mixup / cutmix draw every step
      rng = jax.random.fold_in(jax.random.key(seed), state.step)
      batch = mixing.mix_train_batch(rng, batch, data_config)
    grads, batch_stats, metrics = compute_grads(state, batch)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    metrics = {
        **metrics,
        "learning_rate": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics

  return train_step


def make_eval_step(data_config):
  """Builds eval_step(state, batch) -> the batch's loss sum and every example's probabilities.

  Exact metrics (top-k, per-class, ROC-AUC) need each example's scores, so the step returns
  them with the labels and the padding mask; jaxcls.evaluation gathers and scores them.
  """
  num_classes = data_config.num_classes
  mean, std = tuple(data_config.mean), tuple(data_config.std)

  def eval_step(state: TrainState, batch):
    images = normalize(batch["image"], mean, std)
    labels = batch["label"]
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, images, train=False)
    mask = batch["mask"].astype(jnp.float32)
    return {
        "loss": jnp.sum(cross_entropy(logits, labels, num_classes) * mask),
        "probs": jax.nn.softmax(logits.astype(jnp.float32), axis=-1),
        "label": labels,
        "mask": batch["mask"],
    }

  return eval_step


def init_train_state(model, tx, image_size: int, rng) -> TrainState:
  variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                         train=False)
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables.get("batch_stats", flax.core.FrozenDict()))
