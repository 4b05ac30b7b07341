"""Encoded image -> RGB uint8 array, whatever the file's format and mode.

Every image reaches the augmentations as HxWx3 uint8: grayscale, palette, RGBA (alpha
dropped, as torchvision's ImageFolder does), CMYK and 16-bit images are converted, 16-bit
values scaled (not clipped) to 8 bits, and the EXIF orientation applied. A file that cannot
be decoded raises `CorruptImageError` naming it and the reason.

Complete JPEGs (the common case) decode with OpenCV, pixel-identical to PIL for RGB and
grayscale JPEGs and 1.6x (500x375) to 4x (32x32) faster; everything else goes through PIL,
truncated JPEGs included (some OpenCV versions decode those grey-filled, with only a warning).
"""

import io
import warnings
from typing import Any

import cv2
import numpy as np
from PIL import Image, ImageOps

from jaxcls.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11 decodes to RGB directly
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class CorruptImageError(DataError):
  """An image that cannot be decoded; the message names it and says why."""


def is_image_file(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _as_bytes(data: Any) -> bytes | memoryview:
  if isinstance(data, np.ndarray):
    return memoryview(np.ascontiguousarray(data, np.uint8)).cast("B")
  return data


def _pil_to_rgb(pil: Image.Image) -> np.ndarray:
  ImageOps.exif_transpose(pil, in_place=True)
  if pil.mode == "RGB":
    return np.asarray(pil)
  if pil.mode in _SIXTEEN_BIT_MODES:
    # 16-bit grayscale: convert("RGB") would clip every value above 255.
    wide = np.asarray(pil).astype(np.uint32)
    gray = ((np.clip(wide, 0, 65535) + 128) // 257).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)
  if pil.mode in ("P", "PA"):
    pil = pil.convert("RGBA")  # applies palette transparency without PIL's warning
  if pil.mode in ("F", "I;32"):
    raise CorruptImageError(f"unsupported pixel mode {pil.mode!r} (floating point or 32-bit)")
  return np.asarray(pil.convert("RGB"))


def _decode_pil(data) -> np.ndarray:
  if len(data) == 0:
    raise CorruptImageError("empty file (0 bytes)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. PIL's DecompressionBombWarning
      with Image.open(io.BytesIO(data)) as pil:
        pil.load()
        return _pil_to_rgb(pil)
  except Image.UnidentifiedImageError:
    head = bytes(data[:8])
    raise CorruptImageError(f"not an image in a known format ({len(data)} bytes, starting "
                            f"{head!r})") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    if isinstance(e, CorruptImageError):
      raise
    raise CorruptImageError(f"cannot decode: {type(e).__name__}: {e}") from None


def _decode_jpeg(data) -> np.ndarray | None:
  """OpenCV's decode (EXIF orientation applied); None where it fails."""
  buffer = np.frombuffer(data, np.uint8)
  if _IMREAD_RGB is not None:
    return cv2.imdecode(buffer, _IMREAD_RGB)
  decoded = cv2.imdecode(buffer, cv2.IMREAD_COLOR)  # BGR
  return None if decoded is None else np.ascontiguousarray(decoded[..., ::-1])


def decode_image(image: Any, name: str | None = None) -> np.ndarray:
  """Encoded bytes (1-D uint8 array or bytes) -> RGB uint8 HxWx3; decoded arrays pass through.

  Raises CorruptImageError with `name` (a file path or record id) in the message.
  """
  if isinstance(image, np.ndarray) and image.ndim >= 2:
    if image.ndim == 2:
      image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
  data = _as_bytes(image)
  try:
    if data[:2] == _JPEG_START and data[-2:] == _JPEG_END:
      decoded = _decode_jpeg(data)
      if decoded is not None:
        return decoded
    return _decode_pil(data)
  except CorruptImageError as e:
    raise CorruptImageError(f"{name or 'image'}: {e}") from None
