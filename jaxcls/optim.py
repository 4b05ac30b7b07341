"""The optimizer: optax's SGD (the default), LARS, LAMB or AdamW by name, a learning-rate
schedule, and weight decay on kernels only; for fine-tuning, frozen parameters and a lower
learning rate for the backbone.

Every optimizer leaves BatchNorm scales and every bias out of weight decay, and LARS also out
of its trust ratio (they are small and their gradients large, so the layer-wise ratio would
stall or blow them up; the LARS paper and the MLPerf reference do the same).
"""

import re

import flax
import jax
import optax
from absl import logging

from jaxcls import sharding
from jaxcls.errors import ConfigError, check_at_least, check_choice, check_in_range
from jaxcls.models import whitening

NAMES = ("sgd", "lars", "lamb", "adamw")
SCHEDULES = ("cosine", "constant", "step", "polynomial")
LR_SCALINGS = ("none", "linear")


def check_config(optim_config) -> None:
  """Raises ConfigError for a config.optim that no schedule or optimizer here can build."""
  # .get: the configs of runs written before these keys existed (evaluate, predict)
  check_choice("optim.name", optim_config.get("name", "sgd"), NAMES)
  check_choice("optim.schedule", optim_config.schedule, SCHEDULES)
  check_choice("optim.lr_scaling", optim_config.lr_scaling, LR_SCALINGS)
  for key in ("learning_rate", "warmup_epochs", "weight_decay"):
    check_at_least(f"optim.{key}", optim_config[key], 0.0)
  for key, default in (("end_learning_rate", 0.0), ("eps", 1e-8)):
    check_at_least(f"optim.{key}", optim_config.get(key, default), 0.0)
  for key, default in (("polynomial_power", 2.0), ("trust_coefficient", 0.001)):
    check_at_least(f"optim.{key}", optim_config.get(key, default), 0.0, inclusive=False)
  check_at_least("optim.base_batch_size", optim_config.base_batch_size, 1, integer=True)
  check_in_range("optim.momentum", optim_config.momentum, 0.0, 1.0, high_inclusive=False)
  for key, default in (("b1", 0.9), ("b2", 0.999)):
    check_in_range(f"optim.{key}", optim_config.get(key, default), 0.0, 1.0,
                   high_inclusive=False)
  check_in_range("optim.label_smoothing", optim_config.label_smoothing, 0.0, 1.0,
                 high_inclusive=False)
  if optim_config.learning_rate == 0:
    logging.log_first_n(logging.WARNING, "config.optim.learning_rate=0: the parameters will "
                        "not change (BatchNorm statistics still do).", 1)
  for key in ("freeze", "head_params"):
    try:
      re.compile(optim_config.get(key, ""))
    except re.error as e:
      raise ConfigError(f"config.optim.{key}={optim_config[key]!r} is not a regular "
                        f"expression: {e}.") from None
  check_in_range("optim.backbone_lr_scale", optim_config.get("backbone_lr_scale", 1.0), 0.0, 1.0)


def peak_learning_rate(optim_config, batch_size: int) -> float:
  """The configured peak LR, scaled linearly with the batch size when asked (Goyal et al.)."""
  lr = float(optim_config.learning_rate)
  if optim_config.lr_scaling == "linear":
    lr *= batch_size / optim_config.base_batch_size
  return lr


def create_schedule(optim_config, batch_size: int, total_steps: int,
                    steps_per_epoch: int) -> optax.Schedule:
  """Linear warmup from 0, then cosine to 0, constant, step decay at fractions of training,
  or polynomial decay to end_learning_rate at the last step."""
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
  elif name == "polynomial":
    after_warmup = optax.polynomial_schedule(
        peak, float(optim_config.end_learning_rate), float(optim_config.polynomial_power),
        transition_steps=max(total_steps - warmup_steps, 1))
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


_NOT_DECAYED = ("bias", "scale", whitening.PARAM)


def decay_mask(params):
  """True for the leaves weight decay (and LARS's trust ratio) applies to: kernels, not
  BatchNorm scales, biases or fixed whitening filters (models/whitening.py). The params' own
  tree, so it also serves the partial trees optax.multi_transform hands each group."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: sharding.path_name(path).rsplit("/", 1)[-1] not in _NOT_DECAYED, params)


def param_labels(optim_config):
  """params -> the same tree of 'frozen', 'head' or 'backbone', by regex on 'a/b/kernel'."""
  freeze = re.compile(optim_config.freeze) if optim_config.freeze else None
  head = re.compile(optim_config.head_params)

  def labels(params):
    names = flax.traverse_util.flatten_dict(params, sep="/")
    found = {name: "frozen" if freeze and freeze.search(name) else
             "head" if head.search(name) else "backbone" for name in names}
    if freeze and "frozen" not in found.values():  # a typo would silently train everything
      raise ConfigError(f"config.optim.freeze={optim_config.freeze!r} matches no parameter; "
                        f"their names look like {', '.join(list(names)[:3])}.")
    return flax.traverse_util.unflatten_dict(found, sep="/")

  return labels


def _sgd(optim_config, schedule):
  return optax.sgd(schedule, momentum=optim_config.momentum or None,
                   nesterov=bool(optim_config.nesterov))


def _named(optim_config, schedule) -> optax.GradientTransformation:
  """lars, lamb or adamw from optax, weight decay included (on kernels only)."""
  name, decay = optim_config.name, float(optim_config.weight_decay)
  if name == "lars":
    return optax.lars(schedule, weight_decay=decay, weight_decay_mask=decay_mask,
                      trust_coefficient=float(optim_config.trust_coefficient),
                      eps=float(optim_config.eps), trust_ratio_mask=decay_mask,
                      momentum=float(optim_config.momentum),
                      nesterov=bool(optim_config.nesterov))
  adam_args = dict(b1=float(optim_config.b1), b2=float(optim_config.b2),
                   eps=float(optim_config.eps), weight_decay=decay, mask=decay_mask)
  if name == "lamb":
    return optax.lamb(schedule, **adam_args)
  return optax.adamw(schedule, **adam_args)


def _groups(optim_config, schedule, make) -> optax.GradientTransformation:
  """make(schedule) for every parameter, or per fine-tuning group: the head at the
  schedule, the backbone at backbone_lr_scale of it, frozen parameters not at all."""
  scale = float(optim_config.get("backbone_lr_scale", 1.0))
  if not optim_config.get("freeze") and scale == 1.0:
    return make(schedule)  # one group: the plain state
  return optax.multi_transform(
      {"head": make(schedule),
       "backbone": make(lambda step: schedule(step) * scale),
       "frozen": optax.set_to_zero()},
      param_labels(optim_config))


def create_optimizer(optim_config, schedule: optax.Schedule) -> optax.GradientTransformation:
  name = optim_config.get("name", "sgd")
  check_choice("optim.name", name, NAMES)
  if name != "sgd":
    return _groups(optim_config, schedule, lambda lr: _named(optim_config, lr))
  # Weight decay is added to the gradient before momentum (L2, as torch.optim.SGD does it),
  # which is what the reference ResNet recipes were tuned with.
  decay = optax.add_decayed_weights(optim_config.weight_decay, mask=decay_mask)
  return optax.chain(decay, _groups(optim_config, schedule, lambda lr: _sgd(optim_config, lr)))
