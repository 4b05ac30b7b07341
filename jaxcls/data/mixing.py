"""Mixup and CutMix on the device, one draw per batch, inside the jitted train step.

Mixup (Zhang et al., 2018) blends two images and their targets with lambda ~ Beta(a, a);
CutMix (Yun et al., 2019) pastes a box of the other image covering 1 - lambda of the area,
and weighs the targets by the box's actual area. Each example is paired with its neighbour
(the batch rolled by one): on a sharded batch that moves one example across each device
boundary, where a random permutation would move nearly all of them.
"""

import jax
import jax.numpy as jnp

from jaxcls.errors import ConfigError, check_in_range


def check_config(data_config) -> None:
  """The mixing keys of config.data: mixup_alpha, cutmix_alpha, mix_prob."""
  for key in ("mixup_alpha", "cutmix_alpha"):
    if data_config[key] < 0:
      raise ConfigError(f"config.data.{key}={data_config[key]} must not be negative.")
  check_in_range("data.mix_prob", data_config.mix_prob, 0.0, 1.0)


def enabled(data_config) -> bool:
  return data_config.mixup_alpha > 0 or data_config.cutmix_alpha > 0


def _cutmix_mask(rng, lam, height: int, width: int):
  """-> (bool [H, W], True inside the pasted box; the fraction of the area outside it)."""
  cut = jnp.sqrt(1.0 - lam)
  center = jax.random.uniform(rng, (2,)) * jnp.array([height, width])
  half = cut * jnp.array([height, width]) / 2
  low = jnp.clip(jnp.round(center - half), 0, jnp.array([height, width]))
  high = jnp.clip(jnp.round(center + half), 0, jnp.array([height, width]))
  rows = jnp.arange(height)[:, None]
  cols = jnp.arange(width)[None, :]
  mask = (rows >= low[0]) & (rows < high[0]) & (cols >= low[1]) & (cols < high[1])
  box_area = jnp.prod(high - low)
  return mask, 1.0 - box_area / (height * width)


def mix_batch(rng, images, targets, data_config):
  """images float [B, H, W, C], targets float [B, K] -> (mixed images, mixed targets).

  With probability config.data.mix_prob the batch is mixed: by cutmix or mixup, whichever
  has an alpha > 0, or one of them at random (50/50) when both have.
  """
  mixup_alpha, cutmix_alpha = float(data_config.mixup_alpha), float(data_config.cutmix_alpha)
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, targets
  apply_key, switch_key, lam_key, box_key = jax.random.split(rng, 4)
  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = jax.random.bernoulli(switch_key)
  else:
    use_cutmix = jnp.asarray(cutmix_alpha > 0)
  alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
  lam = jax.random.beta(lam_key, alpha, alpha)
  lam = jnp.where(jax.random.uniform(apply_key) < data_config.mix_prob, lam, 1.0)

  other_images = jnp.roll(images, 1, axis=0)
  other_targets = jnp.roll(targets, 1, axis=0)
  if mixup_alpha > 0:
    mixed = lam * images + (1.0 - lam) * other_images
  if cutmix_alpha > 0:
    mask, box_lam = _cutmix_mask(box_key, lam, images.shape[1], images.shape[2])
    pasted = jnp.where(mask[None, :, :, None], other_images, images)
    mixed = jnp.where(use_cutmix, pasted, mixed) if mixup_alpha > 0 else pasted
    lam = jnp.where(use_cutmix, box_lam, lam)
  lam = lam.astype(targets.dtype)
  return mixed.astype(images.dtype), lam * targets + (1.0 - lam) * other_targets


def mix_train_batch(rng, batch: dict, data_config) -> dict:
  """A train batch -> the same with "image" mixed (float32, still 0-255: normalization is
  affine, so mixing before it equals mixing after) and soft targets in "target"."""
  targets = jax.nn.one_hot(batch["label"], data_config.num_classes)
  images, targets = mix_batch(rng, batch["image"].astype(jnp.float32), targets, data_config)
  return {**batch, "image": images, "target": targets}
