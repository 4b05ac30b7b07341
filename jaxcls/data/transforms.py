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
  """The crop, normalization and pixel-limit keys of config.data."""
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
  limit = data_config.max_image_pixels
  if not isinstance(limit, int) or limit < 0:
    raise ConfigError(f"config.data.max_image_pixels={limit!r}: use a whole number of pixels "
                      f"(default PIL's {images.MAX_PIXELS:,}), or 0 for no limit.")


def max_pixels(data_config) -> int:
  """config.data.max_image_pixels; a run saved before the key existed gets the default."""
  return data_config.get("max_image_pixels", images.MAX_PIXELS)


def resize_shorter_side(image: np.ndarray, size: int, resample=_BILINEAR) -> np.ndarray:
  """Resizes (antialiased when shrinking) so that the shorter side is `size`."""
  h, w = image.shape[:2]
  if min(h, w) == size:
    return image
  scale = size / min(h, w)
  new_size = (max(size, round(w * scale)), max(size, round(h * scale)))
  return np.asarray(Image.fromarray(image).resize(new_size, resample))


def resize_box(image: np.ndarray, box, size: int) -> np.ndarray:
  """The (left, top, right, bottom) box of `image` (float pixel coordinates) resized to
  size x size, bilinear, antialiased when shrinking: what PIL's resize(box=...) gives.

  Only the box and the filter's reach around it are handed to PIL, not the whole image.
  """
  h, w = image.shape[:2]
  left, top, right, bottom = box
  # Bilinear taps reach max(1, scale) input pixels from an output pixel's centre.
  reach_x = math.ceil(max(1.0, (right - left) / size)) + 1
  reach_y = math.ceil(max(1.0, (bottom - top) / size)) + 1
  x0, x1 = max(0, math.floor(left) - reach_x), min(w, math.ceil(right) + reach_x)
  y0, y1 = max(0, math.floor(top) - reach_y), min(h, math.ceil(bottom) + reach_y)
  part = Image.fromarray(image[y0:y1, x0:x1])
  return np.asarray(part.resize(
      (size, size), _BILINEAR, box=(left - x0, top - y0, right - x0, bottom - y0)))


def center_crop_box(height: int, width: int, size: int, resize: int) -> tuple[float, ...]:
  """The box (left, top, right, bottom) of a height x width image that resizing its shorter
  side to `resize` (at least `size`) and cropping the central size x size square keeps."""
  target = max(resize, size)
  if min(height, width) == target:
    new_w, new_h = width, height
  else:
    scale = target / min(height, width)
    new_w, new_h = max(target, round(width * scale)), max(target, round(height * scale))
  top, left = (new_h - size) // 2, (new_w - size) // 2
  sx, sy = width / new_w, height / new_h
  return (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def resize_center_crop(image: np.ndarray, size: int, resize: int) -> np.ndarray:
  """Resizes the shorter side to `resize`, then crops the central size x size square.

  The crop is taken first and only it is resized (the same pixels): an image of extreme
  shape (1 x 1,000,000) never becomes a huge intermediate.
  """
  h, w = image.shape[:2]
  if h == w == size:
    return image
  box = center_crop_box(h, w, size, resize)
  if box[2] - box[0] == box[3] - box[1] == size:  # no resize: a plain crop
    left, top = int(box[0]), int(box[1])
    return image[top:top + size, left:left + size]
  return resize_box(image, box, size)


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


def random_resized_crop_box(height: int, width: int, rng: np.random.Generator,
                            scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            attempts: int = 10) -> tuple[int, int, int, int]:
  """Inception-style crop box (left, top, crop width, crop height): a random area fraction
  and aspect ratio; after `attempts` misses, the central crop with the aspect clamped."""
  h, w = height, width
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
      return left, top, cw, ch
  aspect = w / h  # rare (extreme aspect ratios)
  if aspect < ratio[0]:
    cw, ch = w, round(w / ratio[0])
  elif aspect > ratio[1]:
    cw, ch = round(h * ratio[1]), h
  else:
    cw, ch = w, h
  return (w - cw) // 2, (h - ch) // 2, cw, ch


def _flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  return image[:, ::-1] if rng.integers(2) else image


def random_resized_crop_flip(image: np.ndarray, size: int, rng: np.random.Generator,
                             **box_args) -> np.ndarray:
  """random_resized_crop_box, resized to size x size (antialiased when shrinking), flipped
  with p=0.5."""
  left, top, cw, ch = random_resized_crop_box(*image.shape[:2], rng, **box_args)
  return _flip(resize_box(image, (left, top, left + cw, top + ch), size), rng)


# Decoding fused with the crop: a JPEG decodes at 1/2, 1/4 or 1/8 of its size when the crop,
# drawn from its header's size, stays at least `size` pixels wide and high at that scale
# (libjpeg-turbo's DCT scaling; 7/8 to 5/8 decode slower than 1/1, so they are not used).
# The box in the original image's coordinates, and the random draws, are those of the
# full-decode path. How close the pixels stay, on 8 real photographs (benchmarks/decode.py,
# 224 px crops): where a reduction applies (1024x768: 128 of 160 train crops, every eval
# crop) the crops differ from a full decode's by a mean absolute 0.54 of 255 (PSNR 47.8 dB);
# where none does (every 500x375 train crop: a 224 px crop needs 448 px for 1/2) they are the
# same bit for bit. tests/test_data_transforms.py holds them to <= 1.5 and >= 35 dB.


def _reduced_box_resize(data, header, box, size: int, name) -> np.ndarray:
  left, top, right, bottom = box
  reduction = images.reduction_for(right - left, bottom - top, size, size)
  image, reduction = images.decode_jpeg_reduced(data, header, reduction, name)
  return resize_box(image, tuple(v / reduction for v in box), size)


def decode_random_resized_crop_flip(data, size: int, rng: np.random.Generator,
                                    name: str | None = None,
                                    max_pixels: int = images.MAX_PIXELS) -> np.ndarray:
  """images.decode_image + random_resized_crop_flip, the same box and flip for the same
  rng, decoding a plain JPEG at the largest reduction the crop allows."""
  header = images.plain_jpeg_header(data, name, max_pixels)
  if header is None:
    return random_resized_crop_flip(images.decode_image(data, name, max_pixels), size, rng)
  left, top, cw, ch = random_resized_crop_box(header.height, header.width, rng)
  out = _reduced_box_resize(data, header, (left, top, left + cw, top + ch), size, name)
  return _flip(out, rng)


def decode_resize_center_crop(data, size: int, resize: int, name: str | None = None,
                              max_pixels: int = images.MAX_PIXELS) -> np.ndarray:
  """images.decode_image + resize_center_crop, decoding a plain JPEG at the largest
  reduction that keeps the crop at least size x size."""
  header = images.plain_jpeg_header(data, name, max_pixels)
  if header is None:
    return resize_center_crop(images.decode_image(data, name, max_pixels), size, resize)
  box = center_crop_box(header.height, header.width, size, resize)
  if images.reduction_for(box[2] - box[0], box[3] - box[1], size, size) == 1:
    return resize_center_crop(images.decode_image(data, name, max_pixels), size, resize)
  return _reduced_box_resize(data, header, box, size, name)


def decode_element(element, num_classes: int, decode) -> dict:
  """Checks and converts "label", drops "id" and sets "image" to decode(image, id).

  A label outside [0, num_classes) is an error here: one_hot on the device would turn it into
  an all-zero target without a word.
  """
  element = dict(element)
  name = element.pop("id", None)
  label = int(element["label"])
  if not 0 <= label < num_classes:
    raise ValueError(f"{name or 'An example'} has label {label}, outside [0, "
                     f"{num_classes}) (config.data.num_classes={num_classes}).")
  try:
    element["image"] = decode(element["image"], name)
  except images.CorruptImageError as e:
    raise type(e)(f"{e}. To leave out (and list) the images that do not decode, set "
                  "config.data.skip_corrupt=True.") from None
  element["label"] = np.int32(label)
  return element


class DecodeResizeCenterCrop(grain.transforms.Map):
  """Decode + resize + center crop (eval; also fits train images to image_size squares)."""

  def __init__(self, num_classes: int, size: int, resize: int,
               max_pixels: int = images.MAX_PIXELS):
    self.num_classes, self.size, self.resize, self.max_pixels = (num_classes, size, resize,
                                                                 max_pixels)

  def map(self, element):
    return decode_element(element, self.num_classes, lambda image, name: (
        decode_resize_center_crop(image, self.size, self.resize, name, self.max_pixels)))


class PadCropFlip(grain.transforms.RandomMap):
  """CIFAR-style augmentation; see `pad_crop_flip`."""

  def __init__(self, size: int, padding: int):
    self.size, self.padding = size, padding

  def random_map(self, element, rng: np.random.Generator):
    image = pad_crop_flip(element["image"], self.size, self.padding, rng)
    return {**element, "image": image}


class DecodeRandomResizedCropFlip(grain.transforms.RandomMap):
  """Decode + ImageNet-style augmentation; see `decode_random_resized_crop_flip`."""

  def __init__(self, num_classes: int, size: int, max_pixels: int = images.MAX_PIXELS):
    self.num_classes, self.size, self.max_pixels = num_classes, size, max_pixels

  def random_map(self, element, rng: np.random.Generator):
    return decode_element(element, self.num_classes, lambda image, name: (
        decode_random_resized_crop_flip(image, self.size, rng, name, self.max_pixels)))


def eval_transforms(data_config) -> list[grain.transforms.Map]:
  return [DecodeResizeCenterCrop(data_config.num_classes, data_config.image_size,
                                 data_config.eval_resize, max_pixels(data_config))]


def _crop(data_config) -> list:
  """Decode and the crop `config.data.train_augment` names: size x size images."""
  size = data_config.image_size
  crop = data_config.train_augment
  if crop == "pad_crop_flip":
    # Images not already size x size are first fitted to it (a no-op for CIFAR).
    return [DecodeResizeCenterCrop(data_config.num_classes, size, size, max_pixels(data_config)),
            PadCropFlip(size, data_config.crop_padding)]
  if crop == "random_resized_crop_flip":
    return [DecodeRandomResizedCropFlip(data_config.num_classes, size, max_pixels(data_config))]
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
