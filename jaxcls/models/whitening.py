"""Patch whitening: a first layer fixed from the training images, not learned (airbench).

The layer convolves the normalized image with the PCA whitening filters of its k x k patches
(k = 2: 12 filters for RGB) and with their negatives, so the ReLU that follows keeps both signs
of each component: 2 * k * k * 3 output channels, no padding (32px in, 31px out). The filters
decorrelate the input's patches, which lets the next layers learn faster in a short run;
on the bundled CIFAR-10 sample this stem trains to a higher accuracy than the 3x3 conv stem
with less compute (benchmarks/README.md, "The default run").

The filters are a parameter named `whitening` so that checkpoints, exports and sharding carry
them like any other, but no gradient reaches them (stop_gradient) and weight decay skips them
(optim.decay_mask). They are computed once, when a run starts from scratch
(`build.create_train_state` calls `initialize`), from a fixed sample of the training split
that every process reads alike; a resumed run restores them from its checkpoint.
"""

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

PARAM = "whitening"  # the leaf name of the filters, in every model that has them
SAMPLE_SIZE = 5000  # training images the statistics are computed from
EPSILON = 5e-4  # added to the eigenvalues: keeps the filters of near-constant directions finite


class PatchWhitening(nn.Module):
  """Fixed k x k whitening filters and their negatives, a learned bias per channel."""

  patch_size: int = 2
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k, channels = self.patch_size, x.shape[-1]
    # Zeros until `initialize` writes the data's filters (shape-only uses never need them).
    filters = self.param(PARAM, nn.initializers.zeros, (k, k, channels, 2 * k * k * channels),
                         jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (2 * k * k * channels,), jnp.float32)
    y = jax.lax.conv_general_dilated(
        jnp.asarray(x, self.dtype), jax.lax.stop_gradient(filters).astype(self.dtype),
        window_strides=(1, 1), padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + bias.astype(self.dtype)


def patch_whitening_filters(images: np.ndarray, patch_size: int,
                            epsilon: float = EPSILON) -> np.ndarray:
  """float images [n, h, w, c] (normalized as the model sees them) -> HWIO filters
  [k, k, c, 2 * k * k * c]: the eigenvectors of the covariance of all k x k patches, each
  divided by the square root of its eigenvalue (+ epsilon), then the same negated."""
  k = patch_size
  n, height, width, channels = images.shape
  if n == 0 or height < k or width < k:
    raise ValueError(f"patch whitening needs images of at least {k}x{k}; got {images.shape}.")
  patches = np.lib.stride_tricks.sliding_window_view(images, (k, k), axis=(1, 2))
  # (n, h', w', c, k, k) -> rows of (k, k, c), the order of an HWIO kernel's first three axes.
  patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * channels)
  patches = patches.astype(np.float64)
  patches -= patches.mean(axis=0)
  covariance = patches.T @ patches / len(patches)
  eigenvalues, eigenvectors = np.linalg.eigh(covariance)
  filters = eigenvectors.T / np.sqrt(np.maximum(eigenvalues, 0.0) + epsilon)[:, None]
  filters = filters.reshape(-1, k, k, channels).transpose(1, 2, 3, 0)  # -> HWIO
  return np.concatenate([filters, -filters], axis=-1).astype(np.float32)


def has_whitening(params) -> bool:
  return any(name[-1] == PARAM for name in flax.traverse_util.flatten_dict(params))


def sample_indices(num_examples: int, sample_size: int = SAMPLE_SIZE) -> np.ndarray:
  """Evenly spaced indices over the split: the same on every process and run, and spread over
  the classes of a split stored class by class (image folders)."""
  return np.unique(np.linspace(0, num_examples - 1, min(sample_size, num_examples)).astype(int))


def initialize(params, images: np.ndarray):
  """params with every `whitening` leaf set to the filters of `images` (normalized floats)."""
  flat = flax.traverse_util.flatten_dict(params)
  for name, value in flat.items():
    if name[-1] == PARAM:
      filters = patch_whitening_filters(images, value.shape[0])
      if filters.shape != value.shape:
        raise ValueError(f"{'/'.join(name)}: filters of shape {filters.shape} do not fit the "
                         f"parameter's {value.shape}.")
      flat[name] = filters
  return flax.traverse_util.unflatten_dict(flat)
