"""Per-image policies on uint8 RGB images: RandAugment, TrivialAugment, random erasing.

RandAugment (Cubuk et al., 2019) applies `num_ops` operations drawn uniformly, each at one
fixed magnitude; TrivialAugment (Muller and Hutter, 2021) applies one operation at a magnitude
drawn uniformly, over wider ranges. Magnitude is on a 0-10 scale where 10 is an operation's
maximum (the scale of timm's `rand-m9`). Geometric operations fill with grey (128).
Random erasing (Zhong et al., 2017) replaces a random rectangle with uniform noise; it works
on uint8 pixels here, before the on-device normalization.
"""

import math

import grain
import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from jaxcls.errors import ConfigError, check_choice, check_in_range

AUTO_AUGMENTS = ("none", "randaugment", "trivialaugment")

_FILL = (128, 128, 128)


def check_config(data_config) -> None:
  """The policy keys of config.data: auto_augment and its settings, random_erasing."""
  check_choice("data.auto_augment", data_config.auto_augment, AUTO_AUGMENTS)
  check_in_range("data.randaugment_magnitude", data_config.randaugment_magnitude, 0.0, 10.0)
  if data_config.randaugment_num_ops < 0:
    raise ConfigError(f"config.data.randaugment_num_ops={data_config.randaugment_num_ops} "
                      "must not be negative.")
  check_in_range("data.random_erasing", data_config.random_erasing, 0.0, 1.0)


def _affine(image, coefficients):
  return image.transform(image.size, Image.Transform.AFFINE, coefficients,
                         Image.Resampling.BILINEAR, fillcolor=_FILL)


def _enhance(cls):
  return lambda image, amount: cls(image).enhance(1.0 + amount)


# name -> (op(image, amount), is signed). `amount` is the magnitude times the op's maximum.
_OPS = {
    "identity": (lambda image, amount: image, False),
    "auto_contrast": (lambda image, amount: ImageOps.autocontrast(image), False),
    "equalize": (lambda image, amount: ImageOps.equalize(image), False),
    "rotate": (lambda image, amount: image.rotate(amount, Image.Resampling.BILINEAR,
                                                  fillcolor=_FILL), True),
    "solarize": (lambda image, amount: ImageOps.solarize(image, 256 - amount), False),
    "posterize": (lambda image, amount: ImageOps.posterize(image, 8 - int(round(amount))), False),
    "color": (_enhance(ImageEnhance.Color), True),
    "contrast": (_enhance(ImageEnhance.Contrast), True),
    "brightness": (_enhance(ImageEnhance.Brightness), True),
    "sharpness": (_enhance(ImageEnhance.Sharpness), True),
    "shear_x": (lambda image, amount: _affine(image, (1, amount, 0, 0, 1, 0)), True),
    "shear_y": (lambda image, amount: _affine(image, (1, 0, 0, amount, 1, 0)), True),
    "translate_x": (lambda image, amount: _affine(image, (1, 0, amount * image.size[0], 0, 1, 0)),
                    True),
    "translate_y": (lambda image, amount: _affine(image, (1, 0, 0, 0, 1, amount * image.size[1])),
                    True),
}
OP_NAMES = tuple(_OPS)

# Each op's maximum: RandAugment's ranges, and TrivialAugment's wider ones. Translation is a
# fraction of the image side, rotation in degrees, posterize in bits removed (of 8).
_RANDAUGMENT_MAX = dict(rotate=30, solarize=256, posterize=4, color=0.9, contrast=0.9,
                        brightness=0.9, sharpness=0.9, shear_x=0.3, shear_y=0.3,
                        translate_x=0.45, translate_y=0.45)
_TRIVIALAUGMENT_MAX = dict(rotate=135, solarize=256, posterize=6, color=0.99, contrast=0.99,
                           brightness=0.99, sharpness=0.99, shear_x=0.99, shear_y=0.99,
                           translate_x=0.32, translate_y=0.32)


def apply_op(image: Image.Image, name: str, magnitude: float, maximum: dict,
             rng: np.random.Generator) -> Image.Image:
  """Applies op `name` at `magnitude` in [0, 1] of its maximum; signed ops flip a coin."""
  op, signed = _OPS[name]
  amount = magnitude * maximum.get(name, 0.0)
  if signed and rng.integers(2):
    amount = -amount
  return op(image, amount)


def rand_augment(image: np.ndarray, num_ops: int, magnitude: float,
                 rng: np.random.Generator) -> np.ndarray:
  """`num_ops` ops drawn with replacement, each at `magnitude` (0-10)."""
  pil = Image.fromarray(image)
  for index in rng.integers(0, len(OP_NAMES), num_ops):
    pil = apply_op(pil, OP_NAMES[index], magnitude / 10, _RANDAUGMENT_MAX, rng)
  return np.asarray(pil)


def trivial_augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """One op drawn uniformly, at a magnitude drawn uniformly from [0, 1] of its wide maximum."""
  name = OP_NAMES[rng.integers(len(OP_NAMES))]
  magnitude = rng.uniform()
  return np.asarray(apply_op(Image.fromarray(image), name, magnitude, _TRIVIALAUGMENT_MAX, rng))


def random_erasing(image: np.ndarray, probability: float, rng: np.random.Generator,
                   area=(0.02, 1 / 3), ratio=(0.3, 3.3), attempts: int = 10) -> np.ndarray:
  """With `probability`, fills a random rectangle (area fraction and aspect in the ranges)
  with uniform noise; otherwise, or when no rectangle fits in `attempts`, returns the image."""
  if rng.uniform() >= probability:
    return image
  h, w, c = image.shape
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(attempts):
    target = h * w * rng.uniform(*area)
    aspect = math.exp(rng.uniform(*log_ratio))
    eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
    if 0 < eh < h and 0 < ew < w:
      top, left = rng.integers(0, h - eh + 1), rng.integers(0, w - ew + 1)
      out = image.copy()
      out[top:top + eh, left:left + ew] = rng.integers(0, 256, (eh, ew, c), np.uint8)
      return out
  return image


class AutoAugment(grain.transforms.RandomMap):
  """RandAugment or TrivialAugment on "image"."""

  def __init__(self, kind: str, num_ops: int = 2, magnitude: float = 9):
    check_choice("data.auto_augment", kind, AUTO_AUGMENTS[1:])
    self.kind, self.num_ops, self.magnitude = kind, num_ops, magnitude

  def random_map(self, element, rng: np.random.Generator):
    if self.kind == "randaugment":
      image = rand_augment(element["image"], self.num_ops, self.magnitude, rng)
    else:
      image = trivial_augment(element["image"], rng)
    return {**element, "image": image}


class RandomErasing(grain.transforms.RandomMap):

  def __init__(self, probability: float):
    self.probability = probability

  def random_map(self, element, rng: np.random.Generator):
    return {**element, "image": random_erasing(element["image"], self.probability, rng)}
