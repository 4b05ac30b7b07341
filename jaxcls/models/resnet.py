"""ResNet v1.5 (torchvision layout) for NHWC inputs.

Basic blocks for ResNet-18/34, bottleneck blocks for 50/101/152 with the
stride on the 3x3 conv. Parameter counts match torchvision with the
'imagenet' stem, width 64 and 1000 classes.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

# torchvision: kaiming_normal_(mode='fan_out', nonlinearity='relu'), untruncated.
conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')

STEMS = ('imagenet', 'small')


def _pad(kernel_size: int):
  # Symmetric padding like PyTorch; 'SAME' would pad (0, 1) at stride 2.
  p = kernel_size // 2
  return ((p, p), (p, p))


class _Common(nn.Module):
  """Conv/BN factories shared by blocks and the network."""

  dtype: Any = jnp.float32
  bn_momentum: float = 0.9
  # Mesh axes to average BatchNorm statistics over; set (by clone) only inside the shard_map
  # of gradient accumulation (jaxcls/steps.py), where each device sees its own examples.
  bn_axis_name: Any = None

  def conv(self, features, kernel_size, strides=1, name=None):
    return nn.Conv(
        features,
        (kernel_size, kernel_size),
        strides=(strides, strides),
        padding=_pad(kernel_size),
        use_bias=False,  # BatchNorm follows every conv.
        kernel_init=conv_init,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        name=name,
    )

  def norm(self, train, zero_scale=False, name=None):
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=self.bn_momentum,
        epsilon=1e-5,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        axis_name=self.bn_axis_name,
        scale_init=nn.initializers.zeros if zero_scale else nn.initializers.ones,
        name=name,
    )

  def shortcut(self, x, out_ch, strides, train):
    """Identity, or a 1x1 conv + BN projection when the shape changes."""
    if strides == 1 and x.shape[-1] == out_ch:
      return x
    x = self.conv(out_ch, 1, strides, name='proj_conv')(x)
    return self.norm(train, name='proj_bn')(x)


class BasicBlock(_Common):
  """Two 3x3 convs; output channels = features."""

  features: int = 64
  strides: int = 1
  zero_init_residual: bool = False
  expansion = 1

  @nn.compact
  def __call__(self, x, train: bool):
    out_ch = self.features * self.expansion
    y = self.conv(self.features, 3, self.strides, name='conv1')(x)
    y = nn.relu(self.norm(train, name='bn1')(y))
    y = self.conv(self.features, 3, name='conv2')(y)
    y = self.norm(train, self.zero_init_residual, name='bn2')(y)
    return nn.relu(y + self.shortcut(x, out_ch, self.strides, train))


class BottleneckBlock(_Common):
  """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand; output = 4 * features."""

  features: int = 64
  strides: int = 1
  zero_init_residual: bool = False
  expansion = 4

  @nn.compact
  def __call__(self, x, train: bool):
    out_ch = self.features * self.expansion
    y = self.conv(self.features, 1, name='conv1')(x)
    y = nn.relu(self.norm(train, name='bn1')(y))
    y = self.conv(self.features, 3, self.strides, name='conv2')(y)
    y = nn.relu(self.norm(train, name='bn2')(y))
    y = self.conv(out_ch, 1, name='conv3')(y)
    y = self.norm(train, self.zero_init_residual, name='bn3')(y)
    return nn.relu(y + self.shortcut(x, out_ch, self.strides, train))


class ResNet(_Common):
  """ResNet classifier: stem, stages of residual blocks, avg pool, Dense."""

  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  block_cls: Any = BasicBlock
  num_classes: int = 1000
  width: int = 64
  stem: str = 'imagenet'
  zero_init_residual: bool = False

  @nn.compact
  def __call__(self, x, train: bool):
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = self.conv(self.width, 7, 2, name='stem_conv')(x)
      x = nn.relu(self.norm(train, name='stem_bn')(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=_pad(3))
    elif self.stem == 'small':
      # CIFAR-size inputs: keep full resolution into the first stage.
      x = self.conv(self.width, 3, 1, name='stem_conv')(x)
      x = nn.relu(self.norm(train, name='stem_bn')(x))
    else:
      raise ValueError(f'config.model.stem: unknown stem {self.stem!r}; '
                       f'known: {list(STEMS)}')

    for i, num_blocks in enumerate(self.stage_sizes):
      for j in range(num_blocks):
        x = self.block_cls(
            features=self.width * 2**i,
            strides=2 if i > 0 and j == 0 else 1,
            zero_init_residual=self.zero_init_residual,
            dtype=self.dtype,
            bn_momentum=self.bn_momentum,
            bn_axis_name=self.bn_axis_name,
            name=f'stage{i + 1}_block{j + 1}',
        )(x, train)

    # Pool and classify in float32 so low-precision compute cannot hurt logits.
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = nn.Dense(
        self.num_classes,
        kernel_init=nn.initializers.zeros,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        name='head',
    )(x)
    return x


resnet_tiny = functools.partial(ResNet, stage_sizes=(1, 1), block_cls=BasicBlock)
resnet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
resnet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
resnet50 = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BottleneckBlock)
resnet101 = functools.partial(
    ResNet, stage_sizes=(3, 4, 23, 3), block_cls=BottleneckBlock)
resnet152 = functools.partial(
    ResNet, stage_sizes=(3, 8, 36, 3), block_cls=BottleneckBlock)
