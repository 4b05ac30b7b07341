"""Model registry: `config.model.name` -> constructor.

Every constructor takes keyword arguments num_classes, width, stem, dtype,
zero_init_residual and bn_momentum (the cnn also CNN_OPTIONS) and returns a flax.linen.Module whose
`__call__(x, train)` maps float32 NHWC images to float32 logits. A model with BatchNorm has a
`bn_axis_name` field (default None) that its BatchNorm layers pass on as `axis_name`: gradient
accumulation (jaxcls/steps.py) sets it to average the statistics over the devices.
"""

import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcls import workdir
from jaxcls.errors import ConfigError
from jaxcls.models import cnn
from jaxcls.models import resnet

MODELS: dict[str, Callable[..., nn.Module]] = {
    'cnn': cnn.cnn,
    'resnet_tiny': resnet.resnet_tiny,
    'resnet18': resnet.resnet18,
    'resnet34': resnet.resnet34,
    'resnet50': resnet.resnet50,
    'resnet101': resnet.resnet101,
    'resnet152': resnet.resnet152,
}

STEMS = {'cnn': cnn.STEMS}  # config.model.stem by model; the ResNets take resnet.STEMS
# config.model keys only the cnn takes, with the value a config without them means; the
# ResNets ignore them.
CNN_OPTIONS = {'identity_init': False, 'downsample': cnn.DOWNSAMPLES[0]}


def downsample_of(model_config) -> str:
  """The cnn layout (models/cnn.py) a config, or an export's saved model dict, means: the
  default where the key is absent (written before it existed) or the model is not the cnn."""
  default = CNN_OPTIONS['downsample']
  return model_config.get('downsample', default) if model_config.get('name') == 'cnn' else default


DTYPES = {
    'float32': jnp.float32,
    'bfloat16': jnp.bfloat16,
    'float16': jnp.float16,
}
# 'auto': bfloat16 where the chip has fast bf16 arithmetic, float32 elsewhere (CPUs emulate it).
AUTO_DTYPE_PLATFORMS = ('gpu', 'tpu')


def resolve_dtype(name: str, platform: str | None = None):
  """`config.model.dtype` -> jnp dtype; 'auto' looks at the default backend (or `platform`)."""
  if name == 'auto':
    platform = platform or jax.default_backend()
    return jnp.bfloat16 if platform in AUTO_DTYPE_PLATFORMS else jnp.float32
  return DTYPES[name]


def check_config(model_config) -> None:
  """Raises ConfigError for a bad `config.model`; builds and compiles nothing."""
  if model_config.name not in MODELS:
    raise ConfigError(
        f'config.model.name: unknown model {model_config.name!r}; '
        f'known: {sorted(MODELS)}')
  if model_config.dtype != 'auto' and model_config.dtype not in DTYPES:
    raise ConfigError(
        f'config.model.dtype: unsupported compute dtype {model_config.dtype!r}; '
        f"known: {['auto', *DTYPES]}")
  stems = STEMS.get(model_config.name, resnet.STEMS)
  if model_config.stem not in stems:
    raise ConfigError(
        f'config.model.stem: unknown stem {model_config.stem!r} for '
        f'{model_config.name}; known: {list(stems)} (configs/default.py gives its cnn '
        f"'whiten': add --config.model.stem=small when switching it to a ResNet)")
  downsample = model_config.get('downsample', CNN_OPTIONS['downsample'])
  if model_config.name == 'cnn' and downsample not in cnn.DOWNSAMPLES:
    raise ConfigError(
        f'config.model.downsample: unknown {downsample!r}; known: {list(cnn.DOWNSAMPLES)}')
  width = model_config.width
  if isinstance(width, bool) or not isinstance(width, int) or width < 1:
    raise ConfigError(
        f'config.model.width: must be a positive int, got {width!r}')
  if not 0.0 <= model_config.bn_momentum < 1.0:
    raise ConfigError(
        f'config.model.bn_momentum: must be in [0, 1), got '
        f'{model_config.bn_momentum!r}')


def check_init_from(model_config) -> None:
  """`config.model.init_from`: an export directory, or a .safetensors file for a ResNet.

  Apart from check_config, which create_model runs: a finished run's model is still built
  for evaluation when the file it started from is gone.
  """
  path = model_config.get("init_from", "")  # runs written before the key existed
  if not path:
    return
  key = f"config.model.init_from={path!r}"
  if os.path.isdir(path):
    if not os.path.isfile(workdir.export_info_path(path)):
      raise ConfigError(f"{key} is a directory without a jaxcls export in it (a run's "
                        "export/ folder, or what `python -m jaxcls.weights import` wrote).")
  elif not path.endswith(".safetensors"):
    raise ConfigError(f"{key}: use an export directory or a .safetensors file; convert a "
                      ".pth once with `python -m jaxcls.weights import`.")
  elif not os.path.isfile(path):
    raise ConfigError(f"{key}: no such file.")
  elif getattr(MODELS[model_config.name], "func", None) is not resnet.ResNet:
    raise ConfigError(f"{key}: a torchvision / timm state dict fits the ResNets only, not "
                      f"config.model.name={model_config.name!r}.")


def create_model(model_config, num_classes: int) -> nn.Module:
  """Builds the (unbound) model named by `config.model.name`."""
  check_config(model_config)
  # Passed only to the cnn (ResNets start their blocks as identities through
  # zero_init_residual instead).
  extra = ({key: model_config.get(key, default) for key, default in CNN_OPTIONS.items()}
           if model_config.name == 'cnn' else {})
  return MODELS[model_config.name](
      **extra,
      num_classes=num_classes,
      width=model_config.width,
      stem=model_config.stem,
      dtype=resolve_dtype(model_config.dtype),
      zero_init_residual=bool(model_config.zero_init_residual),
      bn_momentum=float(model_config.bn_momentum),
  )
