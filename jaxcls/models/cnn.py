"""A small plain CNN for fast CPU training on 32px images.

Layout: a stem, then three stages that each halve the
resolution with a 2x2 max-pool first and then apply two conv-BN-ReLU layers with twice the
channels (32 -> 16 -> 8 -> 4; 2w, 4w, 8w), global average pool and a Dense head. The stem
is one full-resolution 3x3 conv-BN-ReLU of width channels ('small'), or fixed 2x2 patch
whitening filters and a ReLU ('whiten', models/whitening.py: 24 channels, 31px out, so the
stages run at 15, 7 and 3 px and cost less). Pooling
before the convs keeps most of the arithmetic at low resolution: on a 2-core CPU this trains
faster and to a higher accuracy per second than convs at full resolution (see
benchmarks/README.md).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxcls.models import resnet
from jaxcls.models import whitening

STEMS = ('small', 'whiten')


def identity_init(base):
  """A conv kernel initializer: output channel o < min(in, out) starts as the identity on input
  channel o (a 1 at the kernel's centre; airbench's dirac init, which trains faster in short
  runs), the other output channels as `base` draws them."""

  def init(key, shape, dtype=jnp.float32):
    height, width, inputs, outputs = shape
    n = min(inputs, outputs)
    identity = jnp.zeros((height, width, inputs, n), dtype)
    identity = identity.at[height // 2, width // 2, jnp.arange(n), jnp.arange(n)].set(1)
    return base(key, shape, dtype).at[..., :n].set(identity)

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

  def _block(self, x, features, train, name):
    x = nn.Conv(
        features,
        (3, 3),
        padding=((1, 1), (1, 1)),
        use_bias=False,  # BatchNorm follows.
        kernel_init=identity_init(resnet.conv_init) if self.identity_init else resnet.conv_init,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=f'{name}_conv',
    )(x)
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
    for i in range(3):
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for j in range(2):
        x = self._block(x, self.width * 2**(i + 1), train, f'stage{i + 1}_layer{j + 1}')
    # Pool and classify in float32 so low-precision compute cannot hurt logits.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(
        self.num_classes,
        kernel_init=nn.initializers.zeros,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name='head',
    )(x)


def cnn(*, num_classes, width, dtype, bn_momentum, stem='small', zero_init_residual=None,
        identity_init=False):
  """Registry constructor; `zero_init_residual` does not apply (no residual blocks)."""
  del zero_init_residual
  return CNN(num_classes=num_classes, width=width, dtype=dtype, bn_momentum=bn_momentum,
             stem=stem, identity_init=identity_init)
