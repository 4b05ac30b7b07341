"""Encoded image -> RGB uint8 array, whatever the file's format and mode.

Every image reaches the augmentations as HxWx3 uint8: grayscale, palette, RGBA (alpha
dropped, as torchvision's ImageFolder does), CMYK and 16-bit images are converted, 16-bit
values scaled (not clipped) to 8 bits, and the EXIF orientation applied. A file that cannot
be decoded raises `CorruptImageError` naming it and the reason.

Complete JPEGs (the common case) decode with OpenCV, pixel-identical to PIL for RGB and
grayscale JPEGs and 1.6x (500x375) to 4x (32x32) faster; everything else goes through PIL,
truncated JPEGs included (some OpenCV versions decode those grey-filled, with only a warning).

Every path reads the image's size from its header first and refuses one of more than
`max_pixels` pixels (config.data.max_image_pixels, default PIL's Image.MAX_IMAGE_PIXELS)
before decoding a byte of it: `ImageTooLargeError` names the file and its size. PIL keeps its
own check too, so a limit above twice PIL's needs PIL.Image.MAX_IMAGE_PIXELS raised as well.

`decode_jpeg_reduced` decodes a plain JPEG at 1/2, 1/4 or 1/8 of its size (libjpeg-turbo's
DCT scaling, through simplejpeg): the crops in transforms.py use it when the crop they will
take stays at least as large as their output.
"""

import io
import warnings
from typing import Any, NamedTuple

import cv2
import numpy as np
from PIL import Image, ImageOps
import simplejpeg

from jaxcls.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif")

_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.11 decodes to RGB directly
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# PIL's own default, read at import: the limit of config.data.max_image_pixels.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
REDUCTIONS = (8, 4, 2, 1)  # libjpeg-turbo's DCT scaling; 7/8 .. 5/8 decode slower than 1/1


class CorruptImageError(DataError):
  """An image that cannot be decoded; the message names it and says why."""


class ImageTooLargeError(CorruptImageError):
  """An image whose header gives more pixels than the limit; it was not decoded."""


def check_pixels(width: int, height: int, max_pixels: int) -> None:
  """Raises ImageTooLargeError when width x height is over max_pixels (0: no limit)."""
  if max_pixels and width * height > max_pixels:
    raise ImageTooLargeError(
        f"{width} x {height} = {width * height:,} pixels, more than the limit of "
        f"{max_pixels:,} (config.data.max_image_pixels); not decoded")


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


def _decode_pil(data, max_pixels: int) -> np.ndarray:
  if len(data) == 0:
    raise CorruptImageError("empty file (0 bytes)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # e.g. PIL's DecompressionBombWarning
      with Image.open(io.BytesIO(data)) as pil:  # reads the header only
        check_pixels(*pil.size, max_pixels)
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


def is_decoded(image: Any) -> bool:
  return isinstance(image, np.ndarray) and image.ndim >= 2


def _is_complete_jpeg(data) -> bool:
  return data[:2] == _JPEG_START and data[-2:] == _JPEG_END


def decode_image(image: Any, name: str | None = None, max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """Encoded bytes (1-D uint8 array or bytes) -> RGB uint8 HxWx3; decoded arrays pass through.

  Raises CorruptImageError with `name` (a file path or record id) in the message, and its
  subclass ImageTooLargeError, before decoding, for more than `max_pixels` pixels.
  """
  if is_decoded(image):
    if image.ndim == 2:
      image = image[..., None]
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
  data = _as_bytes(image)
  try:
    if _is_complete_jpeg(data):
      header = jpeg_header(data)
      if header is not None:
        check_pixels(header.width, header.height, max_pixels)
        decoded = _decode_jpeg(data)
        if decoded is not None:
          return decoded
    return _decode_pil(data, max_pixels)
  except CorruptImageError as e:
    raise type(e)(f"{name or 'image'}: {e}") from None


class JpegHeader(NamedTuple):
  width: int  # as stored, before any EXIF rotation
  height: int
  plain: bool  # YCbCr / grayscale and no EXIF rotation: decode_jpeg_reduced may take it
  orientation: int  # EXIF orientation, 0 when none


def jpeg_header(data) -> JpegHeader | None:
  """The size of a complete JPEG from its header, without decoding; None if not a readable
  JPEG (then PIL's decode names the problem)."""
  if not _is_complete_jpeg(data):
    return None
  try:
    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
  except ValueError:
    return None
  orientation = _exif_orientation(data)
  return JpegHeader(width, height, colorspace in ("YCbCr", "Gray") and orientation in (0, 1),
                    orientation)


def image_size(image: Any, name: str | None = None,
               max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
  """(width, height) of an image as decode_image returns it (EXIF rotation applied), read
  from the header only; raises ImageTooLargeError (or CorruptImageError) naming `name`."""
  if is_decoded(image):
    return image.shape[1], image.shape[0]
  data = _as_bytes(image)
  try:
    header = jpeg_header(data)
    if header is not None:
      width, height, orientation = header.width, header.height, header.orientation
      check_pixels(width, height, max_pixels)
    else:
      with Image.open(io.BytesIO(data)) as pil:
        check_pixels(*pil.size, max_pixels)  # first: a PNG's getexif() decodes it
        (width, height), orientation = pil.size, pil.getexif().get(0x0112, 0)
  except CorruptImageError as e:
    raise type(e)(f"{name or 'image'}: {e}") from None
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise CorruptImageError(f"{name or 'image'}: cannot read the header: {e}") from None
  return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def plain_jpeg_header(data: Any, name: str | None,
                      max_pixels: int = MAX_PIXELS) -> JpegHeader | None:
  """The header of a plain JPEG (see JpegHeader) within the pixel limit; None for anything
  else (decoded arrays, other formats, CMYK, EXIF-rotated), which decode_image takes.

  Raises ImageTooLargeError naming `name` for a JPEG over the limit.
  """
  if is_decoded(data):
    return None
  header = jpeg_header(_as_bytes(data))
  if header is None or not header.plain:
    return None
  try:
    check_pixels(header.width, header.height, max_pixels)
  except ImageTooLargeError as e:
    raise ImageTooLargeError(f"{name or 'image'}: {e}") from None
  return header


def _exif_orientation(data) -> int:
  """The EXIF orientation tag of a JPEG (0 when it has none), read from the APP1 segment."""
  pos, n = 2, len(data)
  while pos + 4 <= n and data[pos] == 0xFF:
    marker = data[pos + 1]
    if marker == 0xDA:  # start of scan: no more header segments
      break
    length = int.from_bytes(data[pos + 2:pos + 4], "big")
    if marker == 0xE1 and bytes(data[pos + 4:pos + 10]) == b"Exif\0\0":
      return _tiff_orientation(bytes(data[pos + 10:pos + 2 + length]))
    pos += 2 + length
  return 0


def _tiff_orientation(tiff: bytes) -> int:
  order = {b"II": "little", b"MM": "big"}.get(tiff[:2])
  if order is None or len(tiff) < 8:
    return 0
  read = lambda at, size: int.from_bytes(tiff[at:at + size], order)
  ifd = read(4, 4)
  for k in range(read(ifd, 2) if ifd + 2 <= len(tiff) else 0):
    entry = ifd + 2 + 12 * k
    if entry + 12 > len(tiff):
      break
    if read(entry, 2) == 0x0112:
      return read(entry + 8, 2)
  return 0


def reduction_for(crop_width: float, crop_height: float, out_width: int,
                  out_height: int) -> int:
  """The largest DCT reduction (1, 2, 4 or 8) that keeps a crop at least out_* pixels."""
  return next(r for r in REDUCTIONS if r == 1 or (crop_width / r >= out_width
                                                  and crop_height / r >= out_height))


def decode_jpeg_reduced(data, header: JpegHeader, reduction: int,
                        name: str | None = None) -> tuple[np.ndarray, int]:
  """-> (RGB image, reduction): a plain JPEG (header.plain) decoded at 1/reduction of its
  size, ceil(width / reduction) x ceil(height / reduction); pixel (x, y) of it covers
  [x * reduction, (x + 1) * reduction) of the original. Reduction 1 is a full decode,
  pixel-identical to decode_image's.

  The caller checked the pixel limit on `header`. A JPEG that libjpeg-turbo reports any
  problem with goes through decode_image instead, at full size (reduction 1), which names it.
  """
  try:
    return simplejpeg.decode_jpeg(
        _as_bytes(data), "RGB", min_width=-(-header.width // reduction),
        min_height=-(-header.height // reduction)), reduction
  except ValueError:
    return decode_image(data, name, max_pixels=0), 1
