"""The pure per-batch functions: train_step and eval_step, and the train state they carry.

They know nothing of loops: build.py jits them once with explicit shardings. The only layout
they take is the gradients' (ZeRO stage 2's reduce-scatter, and the mesh that gradient
accumulation's shard_map runs over).
"""

from typing import Any

import flax
import flax.linen
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state
from jax.sharding import PartitionSpec as P

from jaxcls import ema as ema_lib
from jaxcls import sharding
from jaxcls.data import mixing

BATCH_AXES = sharding.BATCH_AXES


class TrainState(train_state.TrainState):
  """params + optimizer state (from flax) plus the BatchNorm running statistics."""
  batch_stats: Any = None


class EmaTrainState(TrainState):
  """TrainState plus `ema`: {"params", "batch_stats"} averaged over the steps (jaxcls/ema.py).

  Its own class, used only when config.ema.decay > 0, so a run without EMA keeps the tree
  (and the checkpoints) of a plain TrainState.
  """
  ema: Any = None


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

  Applied to one device's contiguous block of the batch, every micro-batch takes an equal
  share of every device's examples, so nothing moves between devices.
  """
  k = num_micro_batches
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                      batch)


def with_batchnorm_axis(apply_fn, axis_name):
  """The model's apply with its BatchNorm statistics averaged over `axis_name`.

  Inside shard_map each device normalizes its own examples; averaging the statistics over
  the batch axes gives the statistics of the whole (micro-)batch, as jit over the global
  array does.
  """
  model = getattr(apply_fn, "__self__", None)
  if not isinstance(model, flax.linen.Module) or "bn_axis_name" not in getattr(
      model, "__dataclass_fields__", {}):
    raise TypeError(
        f"grad_accum_steps > 1 needs a flax model with a `bn_axis_name` field (see "
        f"jaxcls/models/__init__.py); the state's apply_fn is {apply_fn!r}.")
  return model.clone(bn_axis_name=axis_name).apply


def _reduce_over_batch(grads, specs):
  """The one cross-device sum of the accumulated gradients, inside shard_map.

  A gradient whose layout splits a dimension over batch axes (ZeRO stage 2 / 3: 'fsdp') is
  reduce-scattered along it (psum_scatter), the others are all-reduced (psum).
  """

  def reduce(grad, spec):
    scattered = []
    for dim, entry in enumerate(spec):
      axes = entry if isinstance(entry, tuple) else (entry,)
      axes = tuple(axis for axis in axes if axis in BATCH_AXES)
      if axes:
        scattered.append((dim, axes))
    summed = tuple(a for a in BATCH_AXES if all(a not in axes for _, axes in scattered))
    if summed:
      grad = jax.lax.psum(grad, summed)
    for dim, axes in scattered:
      grad = jax.lax.psum_scatter(grad, axes, scatter_dimension=dim, tiled=True)
    return grad

  return jax.tree.map(reduce, grads, specs)


def _batch_part(spec):
  """spec with only its batch axes: shard_map's out_specs name the manual axes only."""
  entries = []
  for entry in spec:
    axes = tuple(a for a in (entry if isinstance(entry, tuple) else (entry,))
                 if a in BATCH_AXES)
    entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*entries)


def make_compute_grads(data_config, optim_config, grad_accum_steps: int = 1,
                       grad_shardings=None):
  """Builds compute_grads(state, batch) -> (grads, batch_stats, metrics).

  grads is the mean gradient over the batch. With grad_shardings (a tree like the params of
  NamedShardings) the gradients land in that layout, which is how ZeRO stage 2 gets its
  reduce-scatter; without, XLA picks (the parameters' layout).

  grad_accum_steps = k > 1 runs k micro-batches one after another (the activations of one
  at a time) in a scan inside a shard_map over the batch axes: each device sums the
  gradients of its own examples, and the sum crosses devices once, after the scan (psum, or
  psum_scatter into the stage's layout), not once per micro-batch. BatchNorm normalizes
  each micro-batch by the statistics of the whole micro-batch (averaged over the devices)
  and updates its running averages once per micro-batch, in order. k > 1 needs
  grad_shardings (their mesh is the one the step runs on).
  """
  num_classes = data_config.num_classes
  mean, std = tuple(data_config.mean), tuple(data_config.std)
  label_smoothing = float(optim_config.label_smoothing)
  k = int(grad_accum_steps)
  if k > 1 and grad_shardings is None:
    raise ValueError("make_compute_grads: grad_accum_steps > 1 needs grad_shardings (a tree "
                     "of NamedShardings like the params; jaxcls.build passes them).")

  def constrain(grads):
    if grad_shardings is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, grad_shardings)

  def loss_and_grads(apply_fn, params, batch_stats, batch):
    images = normalize(batch["image"], mean, std)
    labels = batch["label"]

    def loss_fn(params):
      logits, updates = apply_fn(
          {"params": params, "batch_stats": batch_stats}, images, train=True,
          mutable=["batch_stats"])
      loss = cross_entropy(logits, batch.get("target", labels), num_classes,
                           label_smoothing).mean()
      # A model without BatchNorm has no statistics to update. The same tree structure
      # as the input either way (a scan carry must not turn a FrozenDict into a dict).
      new_stats = jax.tree.unflatten(jax.tree.structure(batch_stats),
                                     jax.tree.leaves(updates.get("batch_stats", batch_stats)))
      return loss, (logits, new_stats)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels)}
    return grads, batch_stats, metrics

  if k == 1:
    def compute_grads(state: TrainState, batch):
      grads, batch_stats, metrics = loss_and_grads(state.apply_fn, state.params,
                                                   state.batch_stats, batch)
      return constrain(grads), batch_stats, metrics
    return compute_grads

  mesh = jax.tree.leaves(grad_shardings)[0].mesh
  specs = jax.tree.map(lambda s: s.spec, grad_shardings)

  def compute_grads(state: TrainState, batch):
    apply_fn = with_batchnorm_axis(state.apply_fn, BATCH_AXES)

    def local(params, batch_stats, batch):
      # One device: its examples, every parameter whole. No collective but BatchNorm's.
      def accumulate(carry, micro_batch):
        grads_sum, batch_stats = carry
        grads, batch_stats, metrics = loss_and_grads(apply_fn, params, batch_stats,
                                                     micro_batch)
        return (jax.tree.map(jnp.add, grads_sum, grads), batch_stats), metrics

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads_sum, batch_stats), metrics = jax.lax.scan(
          accumulate, (zeros, batch_stats), split_micro_batches(batch, k))
      # Equal shares everywhere: the mean of the means is the mean over the batch.
      grads = _reduce_over_batch(jax.tree.map(lambda g: g / (k * batch_shards), grads_sum),
                                 specs)
      metrics = jax.lax.pmean(jax.tree.map(jnp.mean, metrics), BATCH_AXES)
      return grads, batch_stats, metrics

    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    # check_vma=False: the gradients of the (replicated) parameters stay per-device sums
    # until _reduce_over_batch; with it, JAX would insert the psum inside the scan itself.
    grads, batch_stats, metrics = jax.shard_map(
        local, mesh=mesh, axis_names=set(BATCH_AXES), check_vma=False,
        in_specs=(P(), P(), P(BATCH_AXES)),
        out_specs=(jax.tree.map(_batch_part, specs), P(), P()))(
            state.params, state.batch_stats, batch)
    return constrain(grads), batch_stats, metrics

  return compute_grads


def make_train_step(data_config, optim_config, schedule, grad_accum_steps: int = 1,
                    grad_shardings=None, seed: int = 0, ema_config=None):
  """Builds train_step(state, batch) -> (state, metrics); metrics are device scalars.

  The model comes with the state (its apply_fn). See make_compute_grads for grad_accum_steps
  and grad_shardings; `seed` seeds mixup / cutmix. An EmaTrainState also gets its average
  updated after the optimizer step, with ema_config's decay (config.ema).
  """
  compute_grads = make_compute_grads(data_config, optim_config, grad_accum_steps,
                                     grad_shardings)

  def train_step(state: TrainState, batch):
    if mixing.enabled(data_config):  # a new mixup / cutmix draw every step
      rng = jax.random.fold_in(jax.random.key(seed), state.step)
      batch = mixing.mix_train_batch(rng, batch, data_config)
    grads, batch_stats, metrics = compute_grads(state, batch)
    new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if isinstance(state, EmaTrainState):
      if ema_config is None:
        raise ValueError("make_train_step: a state with an EMA needs ema_config (config.ema).")
      new_state = new_state.replace(ema=ema_lib.update(
          state.ema, new_state.params, new_state.batch_stats,
          ema_lib.decay_at(ema_config, state.step)))
    metrics = {
        **metrics,
        "learning_rate": schedule(state.step),
        "grad_norm": optax.tree.norm(grads),
    }
    return new_state, metrics

  return train_step


TTA = ("none", "flip", "flip_shift")  # config.eval_tta


def tta_views(images: jax.Array, tta: str) -> list[tuple[float, jax.Array]]:
  """(weight, view) pairs whose weights sum to 1: 'flip' the image and its mirror at 1/2
  each; 'flip_shift' (airbench) those at 1/4 each, plus the image shifted one pixel down
  and right and one pixel up and left (edges reflected) and their mirrors at 1/8 each."""
  mirror = images[:, :, ::-1]  # images are (batch, height, width, channels)
  if tta == "flip":
    return [(0.5, images), (0.5, mirror)]
  height, width = images.shape[1:3]
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
  shifted = [padded[:, :height, :width], padded[:, 2:height + 2, 2:width + 2]]
  return ([(0.25, images), (0.25, mirror)] +
          [(0.125, view) for s in shifted for view in (s, s[:, :, ::-1])])


def make_eval_step(data_config, tta: str = "none"):
  """Builds eval_step(state, batch) -> the batch's loss sum and every example's scores.

  Exact metrics (top-k, per-class, ROC-AUC) need each example's scores, so the step returns
  them with the labels and the padding mask; jaxcls.evaluation gathers and scores them. The
  scores are log-probabilities: a float32 softmax rounds confident predictions to the same
  1.0 (or 0.0), and such ties change ROC-AUC; log_softmax keeps them apart.

  tta='flip' or 'flip_shift' also returns `tta_loss` and `tta_scores`: the weighted average
  of the softmax probabilities of each image's views (tta_views), as log-probabilities (log
  of the mean probability), from the same batch.
  """
  num_classes = data_config.num_classes
  mean, std = tuple(data_config.mean), tuple(data_config.std)
  if tta not in TTA:
    raise ValueError(f"tta={tta!r}: use one of {', '.join(TTA)}.")

  def eval_step(state: TrainState, batch):
    images = normalize(batch["image"], mean, std)
    labels = batch["label"]
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, images, train=False)
    mask = batch["mask"].astype(jnp.float32)
    scores = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    outputs = {
        "loss": jnp.sum(cross_entropy(logits, labels, num_classes) * mask),
        "scores": scores,
        "label": labels,
        "mask": batch["mask"],
    }
    if tta != "none":
      views = tta_views(images, tta)
      view_scores = [  # the plain view's scores are there already
          scores if view is images else
          jax.nn.log_softmax(state.apply_fn(variables, view, train=False).astype(jnp.float32),
                             axis=-1)
          for _, view in views]
      log_weights = jnp.log(jnp.asarray([weight for weight, _ in views]))[:, None, None]
      tta_scores = jax.nn.logsumexp(jnp.stack(view_scores) + log_weights, axis=0)
      label_scores = jnp.take_along_axis(tta_scores, labels[:, None], axis=-1)[:, 0]
      outputs.update(tta_loss=-jnp.sum(label_scores * mask), tta_scores=tta_scores)
    return outputs

  return eval_step


def init_train_state(model, tx, image_size: int, rng, ema: bool = False) -> TrainState:
  """The initial state; with `ema`, an EmaTrainState whose average starts at these values."""
  variables = model.init(rng, jnp.zeros((1, image_size, image_size, 3), jnp.float32),
                         train=False)
  params = variables["params"]
  batch_stats = variables.get("batch_stats", flax.core.FrozenDict())
  if not ema:
    return TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                             batch_stats=batch_stats)
  return EmaTrainState.create(apply_fn=model.apply, params=params, tx=tx,
                              batch_stats=batch_stats,
                              ema=ema_lib.initial(params, batch_stats))
