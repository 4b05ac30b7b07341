"""Per-example decode and augmentation on the host, in numpy and PIL.

Elements are dicts; decoding turns "image" into pixels, checks "label" and drops "id"; the
other transforms change only "image" and keep other keys. Images stay
uint8 HxWx3 (RGB): normalization happens on the device, where it is free and the host-to-device
copy is 4x smaller. Random transforms are grain `RandomMap`s: grain hands each element a
generator seeded from the pipeline seed and the element's position, so augmentation is
reproducible and independent of worker count.
"""

import math

import grain
import numpy as np
from PIL import Image

from jaxcls.data import augment
from jaxcls.data import images
from jaxcls.errors import ConfigError, check_at_least, check_choice

TRAIN_AUGMENTS = ("pad_crop_flip", "random_resized_crop_flip", "none")

_BILINEAR = Image.Resampling.BILINEAR


def check_config(data_config) -> None:
  """The crop and normalization keys of config.data."""
  check_choice("data.train_augment", data_config.train_augment, TRAIN_AUGMENTS)
  check_at_least("data.image_size", data_config.image_size, 1, integer=True)
  check_at_least("data.crop_padding", data_config.crop_padding, 0, integer=True)
  if data_config.eval_resize < data_config.image_size:
    raise ConfigError(f"config.data.eval_resize={data_config.eval_resize} must be at least "
                      f"config.data.image_size={data_config.image_size}: evaluation resizes the "
                      "shorter side to it, then crops the center image_size square.")
  for key in ("mean", "std"):
    if len(data_config[key]) != 3:
      raise ConfigError(f"config.data.{key} needs 3 values (R, G, B), got {data_config[key]}.")


def resize_shorter_side(image: np.ndarray, size: int, resample=_BILINEAR) -> np.ndarray:
  """Resizes (antialiased when shrinking) so that the shorter side is `size`."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new_size = (max(size, round(w * scale)), max(size, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(new_size, resample))


def resize_center_crop(image: np.ndarray, size: int, resize: int) -> np.ndarray:
  """Resizes the shorter side to `resize`, then crops the central size x size square."""
  if image.shape[0] == image.shape[1] == size:
    return image
  image = resize_shorter_side(image, max(resize, size))
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def pad_crop_flip(image: np.ndarray, size: int, padding: int,
                  rng: np.random.Generator) -> np.ndarray:
  """Random size x size crop of the image zero-padded by `padding`, flipped with p=0.5.

  Copies only the part of the crop that overlaps the image instead of padding the whole image.
  """
  h, w = image.shape[:2]
  dy, dx, flip = rng.integers(0, (h + 2 * padding - size + 1, w + 2 * padding - size + 1, 2))
  y0, x0 = dy - padding, dx - padding  # crop origin in image coordinates; may be negative
  ys, ye = max(y0, 0), min(y0 + size, h)
  xs, xe = max(x0, 0), min(x0 + size, w)
  out = np.zeros((size, size, image.shape[2]), image.dtype)
  out[ys - y0:ye - y0, xs - x0:xe - x0] = image[ys:ye, xs:xe]
  return out[:, ::-1] if flip else out


def random_resized_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                             attempts: int = 10) -> np.ndarray:
  """Inception-style crop: random area fraction and aspect ratio, resized to size, flipped."""
  h, w = image.shape[:2]
  area = h * w
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target_area = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    cw = round(math.sqrt(target_area * aspect))
    ch = round(math.sqrt(target_area / aspect))
    if 0 < cw <= w and 0 < ch <= h:
      top = int(rng.integers(0, h - ch + 1))
      left = int(rng.integers(0, w - cw + 1))
      break
  else:  # Rare (extreme aspect ratios): the central crop, aspect clamped to `ratio`.
    aspect = w / h
    if aspect < ratio[0]:
      cw, ch = w, round(w / ratio[0])
    elif aspect > ratio[1]:
      cw, ch = round(h * ratio[1]), h
    else:
      cw, ch = w, h
    top, left = (h - ch) // 2, (w - cw) // 2
  # One PIL call crops and resizes (antialiased when shrinking).
  out = np.asarray(Image.fromarray(image).resize(
      (size, size), _BILINEAR, box=(left, top, left + cw, top + ch)))
  return out[:, ::-1] if rng.integers(2) else out


class Decode(grain.transforms.Map):
  """Decodes "image" (see images.decode_image), checks "label" and makes it int32.

  A label outside [0, num_classes) is an error here: one_hot on the device would turn it into
  an all-zero target without a word.
  """

  def __init__(self, num_classes: int):
    self.num_classes = num_classes

  def map(self, element):
    element = dict(element)
    name = element.pop("id", None)
    label = int(element["label"])
    if not 0 <= label < self.num_classes:
      raise ValueError(f"{name or 'An example'} has label {label}, outside [0, "
                       f"{self.num_classes}) (config.data.num_classes={self.num_classes}).")
    try:
      element["image"] = images.decode_image(element["image"], name)
    except images.CorruptImageError as e:
      raise images.CorruptImageError(
          f"{e}. To leave out (and list) the images that do not decode, set "
          "config.data.skip_corrupt=True.") from None
    element["label"] = np.int32(label)
    return element


class ResizeCenterCrop(grain.transforms.Map):
  """Deterministic resize + center crop (eval; also makes train images image_size square)."""

  def __init__(self, size: int, resize: int):
    self.size, self.resize = size, resize

  def map(self, element):
    return {**element, "image": resize_center_crop(element["image"], self.size, self.resize)}


class PadCropFlip(grain.transforms.RandomMap):
  """CIFAR-style augmentation; see `pad_crop_flip`."""

  def __init__(self, size: int, padding: int):
    self.size, self.padding = size, padding

  def random_map(self, element, rng: np.random.Generator):
    image = pad_crop_flip(element["image"], self.size, self.padding, rng)
    return {**element, "image": image}


class RandomResizedCropFlip(grain.transforms.RandomMap):
  """ImageNet-style augmentation; see `random_resized_crop_flip`."""

  def __init__(self, size: int):
    self.size = size

  def random_map(self, element, rng: np.random.Generator):
    return {**element, "image": random_resized_crop_flip(element["image"], self.size, rng)}


def eval_transforms(data_config) -> list[grain.transforms.Map]:
  return [Decode(data_config.num_classes),
          ResizeCenterCrop(data_config.image_size, data_config.eval_resize)]


def _crop(data_config) -> list:
  """Decode and the crop `config.data.train_augment` names: size x size images."""
  size = data_config.image_size
  crop = data_config.train_augment
  if crop == "pad_crop_flip":
    # Images not already size x size are first fitted to it (a no-op for CIFAR).
    return [Decode(data_config.num_classes), ResizeCenterCrop(size, size),
            PadCropFlip(size, data_config.crop_padding)]
  if crop == "random_resized_crop_flip":
    return [Decode(data_config.num_classes), RandomResizedCropFlip(size)]
  return eval_transforms(data_config)  # "none": what eval sees


def train_transforms(data_config) -> list:
  """Decode, crop (config.data.train_augment), then the optional policies on the crop."""
  check_config(data_config)
  ts = _crop(data_config)
  if data_config.auto_augment != "none":
    ts.append(augment.AutoAugment(data_config.auto_augment, data_config.randaugment_num_ops,
                                  data_config.randaugment_magnitude))
  if data_config.random_erasing > 0:
    ts.append(augment.RandomErasing(data_config.random_erasing))
  return ts
