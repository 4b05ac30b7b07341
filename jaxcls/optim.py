"""The optimizer: optax SGD with momentum, a learning-rate schedule and decoupled-from-BN decay."""

import flax
import optax
from absl import logging

from jaxcls.errors import check_at_least, check_choice, check_in_range

SCHEDULES = ("cosine", "constant", "step")
LR_SCALINGS = ("none", "linear")


def check_config(optim_config) -> None:
  """Raises ConfigError for a config.optim that no schedule or optimizer here can build."""
  check_choice("optim.schedule", optim_config.schedule, SCHEDULES)
  check_choice("optim.lr_scaling", optim_config.lr_scaling, LR_SCALINGS)
  for key in ("learning_rate", "warmup_epochs", "weight_decay"):
    check_at_least(f"optim.{key}", optim_config[key], 0.0)
  check_at_least("optim.base_batch_size", optim_config.base_batch_size, 1, integer=True)
  check_in_range("optim.momentum", optim_config.momentum, 0.0, 1.0, high_inclusive=False)
  check_in_range("optim.label_smoothing", optim_config.label_smoothing, 0.0, 1.0,
                 high_inclusive=False)
  if optim_config.learning_rate == 0:
    logging.log_first_n(logging.WARNING, "config.optim.learning_rate=0: the parameters will "
                        "not change (BatchNorm statistics still do).", 1)


def peak_learning_rate(optim_config, batch_size: int) -> float:
  """The configured peak LR, scaled linearly with the batch size when asked (Goyal et al.)."""
  lr = float(optim_config.learning_rate)
  if optim_config.lr_scaling == "linear":
    lr *= batch_size / optim_config.base_batch_size
  return lr


def create_schedule(optim_config, batch_size: int, total_steps: int,
                    steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine to 0, constant, or step decay at fractions of training."""
  check_config(optim_config)
  peak = peak_learning_rate(optim_config, batch_size)
  warmup_steps = min(int(round(optim_config.warmup_epochs * steps_per_epoch)), total_steps)
  name = optim_config.schedule
  if name == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=0.0)
  if name == "constant":
    after_warmup = optax.constant_schedule(peak)
  else:  # "step"
    boundaries = {
        int(fraction * total_steps) - warmup_steps: optim_config.step_decay
        for fraction in optim_config.step_boundaries
    }
    after_warmup = optax.piecewise_constant_schedule(peak, boundaries)
  if warmup_steps == 0:
    return after_warmup
  warmup = optax.linear_schedule(0.0, peak, warmup_steps)
  return optax.join_schedules([warmup, after_warmup], [warmup_steps])


def decay_mask(params):
  """True for the leaves weight decay applies to: kernels, not BatchNorm scales or biases."""
  flat = flax.traverse_util.flatten_dict(params)
  mask = {path: path[-1] not in ("bias", "scale") for path in flat}
  return flax.traverse_util.unflatten_dict(mask)


def create_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  # Weight decay is added to the gradient before momentum (L2, as torch.optim.SGD does it),
  # which is what the reference ResNet recipes were tuned with.
  return optax.chain(
      optax.add_decayed_weights(optim_config.weight_decay, mask=decay_mask),
      optax.sgd(schedule, momentum=optim_config.momentum or None,
                nesterov=bool(optim_config.nesterov)),
  )
