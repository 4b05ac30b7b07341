"""A small plain CNN for fast CPU training on 32px images.

Layout: a stem, then three stages that each halve the resolution and apply two conv-BN-ReLU
layers with twice the channels (32 -> 16 -> 8 -> 4; 2w, 4w, 8w), a global pool and a Dense
head. The stem is one full-resolution 3x3 conv-BN-ReLU of width channels ('small'), or fixed
2x2 patch whitening filters and a ReLU ('whiten', models/whitening.py: 24 channels, 31px out,
so the stages run at 15, 7 and 3 px).

`downsample` says where each stage halves the resolution:
- 'pool_then_conv': a 2x2 max-pool before the stage's first conv; global average pool. Most
  of the arithmetic runs at the lower resolution.
- 'conv_then_pool' (airbench's layout): the first conv runs at the incoming resolution, then
  max-pool, BN, ReLU; global max pool. Each stage's first conv costs 4x as much, so the same
  compute buys half the width: at the default config's compute, width 8 for 8.5 epochs
  reached 74.0% with TTA on three seeds against the default's 73.8% (benchmarks/README.md,
  "Fifth session of the search").
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxcls.models import resnet
from jaxcls.models import whitening

STEMS = ('small', 'whiten')
DOWNSAMPLES = ('pool_then_conv', 'conv_then_pool')  # see the module docstring


def identity_init(base):
  """A conv kernel initializer: with n = min(in, out), output channel o < n starts as the
  identity on input channel o (a 1 at the kernel's centre, 0 from the other first n inputs:
  airbench's dirac init, which trains faster in short runs); the rest of the kernel (other
  outputs, and inputs >= n where a conv narrows) as `base` draws it."""

  def init(key, shape, dtype=jnp.float32):
    height, width, inputs, outputs = shape
    n = min(inputs, outputs)
    identity = jnp.zeros((height, width, n, n), dtype)
    identity = identity.at[height // 2, width // 2, jnp.arange(n), jnp.arange(n)].set(1)
    return base(key, shape, dtype).at[:, :, :n, :n].set(identity)

  return init


class CNN(nn.Module):
  """Plain conv-BN-ReLU network; `width` is the channels of the first conv."""

  num_classes: int = 10
  width: int = 32
  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  bn_axis_name: Any = None  # see resnet._Common
  stem: str = 'small'
  identity_init: bool = False  # see identity_init
  downsample: str = 'pool_then_conv'  # see the module docstring

  def _conv(self, x, features, name):
    return nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=False,  # BatchNorm follows.
        kernel_init=identity_init(resnet.conv_init) if self.identity_init else resnet.conv_init,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=f'{name}_conv',
    )(x)

  def _bn_relu(self, x, train, name):
    x = nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        axis_name=self.bn_axis_name,
        name=f'{name}_bn',
    )(x)
    return nn.relu(x)

  def _block(self, x, features, train, name, pool_after_conv=False):
    x = self._conv(x, features, name)
    if pool_after_conv:
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return self._bn_relu(x, train, name)

  @nn.compact
  def __call__(self, x, train: bool):
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'whiten':
      x = nn.relu(whitening.PatchWhitening(dtype=self.dtype, name='stem_whitening')(x))
    elif self.stem == 'small':
      x = self._block(x, self.width, train, 'stem')
    else:
      raise ValueError(f'config.model.stem: unknown stem {self.stem!r} for cnn; '
                       f'known: {list(STEMS)}')
    if self.downsample not in DOWNSAMPLES:
      raise ValueError(f'config.model.downsample: unknown {self.downsample!r}; '
                       f'known: {list(DOWNSAMPLES)}')
    conv_first = self.downsample == 'conv_then_pool'
    for i in range(3):
      if not conv_first:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for j in range(2):
        x = self._block(x, self.width * 2**(i + 1), train, f'stage{i + 1}_layer{j + 1}',
                        pool_after_conv=conv_first and j == 0)
    # Pool and classify in float32 so low-precision compute cannot hurt logits.
    x = x.astype(jnp.float32)
    x = jnp.max(x, axis=(1, 2)) if conv_first else jnp.mean(x, axis=(1, 2))
    return nn.Dense(
        self.num_classes,
        kernel_init=nn.initializers.zeros,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name='head',
    )(x)


def cnn(*, num_classes, width, dtype, bn_momentum, stem='small', zero_init_residual=None,
        identity_init=False, downsample='pool_then_conv'):
  """Registry constructor; `zero_init_residual` does not apply (no residual blocks)."""
  del zero_init_residual
  return CNN(num_classes=num_classes, width=width, dtype=dtype, bn_momentum=bn_momentum,
             stem=stem, identity_init=identity_init, downsample=downsample)
