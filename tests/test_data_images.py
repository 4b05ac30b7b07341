"""Tests of jaxcls.data.images: every input becomes RGB uint8, bad files raise a named error."""

import io
import re
import subprocess
import sys

import cv2
import numpy as np
from PIL import Image, ImageFile
import pytest
import simplejpeg

from jaxcls.data import images
from jaxcls.data import sources
from jaxcls.data import transforms
from helpers import data_config, encode, flat_gray_jpeg
from runner import REPO


def decode(data: bytes, name="x.png") -> np.ndarray:
  out = images.decode_image(np.frombuffer(data, np.uint8), name)
  assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[-1] == 3
  return out


def gradient(mode="RGB", size=(6, 4)) -> Image.Image:
  w, h = size
  x, y = np.meshgrid(np.arange(w) * 40, np.arange(h) * 60)
  rgb = np.stack([x, y, np.full((h, w), 90)], -1)
  return Image.fromarray(rgb.astype(np.uint8)).convert(mode)


# Every (format, mode) pair that PIL writes.
_WRITABLE = [(fmt, mode) for fmt in ("PNG", "GIF") for mode in ("RGB", "L", "P", "RGBA", "LA", "1")]
_WRITABLE += [("BMP", m) for m in ("RGB", "L", "P", "RGBA", "1")]
_WRITABLE += [("WEBP", m) for m in ("RGB", "RGBA")] + [("JPEG", m) for m in ("RGB", "L", "1")]


@pytest.mark.parametrize("fmt,mode", _WRITABLE)
def test_every_format_and_mode_becomes_rgb(fmt, mode):
  image = gradient(mode)
  out = decode(encode(image, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
  assert out.shape == (4, 6, 3)
  if fmt in ("PNG", "BMP", "WEBP") and mode in ("RGB", "L", "RGBA"):
    np.testing.assert_array_equal(out, np.asarray(image.convert("RGB")))


def test_palette_with_transparency():
  image = Image.new("P", (3, 2))
  image.putpalette([255, 0, 0, 0, 255, 0])
  out = decode(encode(image, "PNG", transparency=0))
  np.testing.assert_array_equal(out[0, 0], [255, 0, 0])


def test_cmyk_jpeg():
  out = decode(encode(Image.new("CMYK", (4, 4), (0, 255, 255, 0)), "JPEG", quality=95))
  assert out.shape == (4, 4, 3)
  assert out[..., 0].min() > 240 and out[..., 1:].max() < 15  # red


def test_16_bit_png_is_scaled_not_clipped():
  gray = np.array([[0, 257 * 100, 65535, 1000]], np.uint16)
  out = decode(encode(Image.fromarray(gray), "PNG"))
  np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 4])
  assert (out == out[..., :1]).all()
  rgb = np.zeros((1, 2, 3), np.uint16)
  rgb[0, :, 0] = [257 * 200, 65535]
  rgb[0, :, 2] = 257 * 50
  ok, png = cv2.imencode(".png", rgb[..., ::-1])  # cv2 writes BGR
  assert ok
  np.testing.assert_array_equal(decode(png.tobytes())[0], [[200, 0, 50], [255, 0, 50]])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt):
  pixels = np.zeros((4, 8, 3), np.uint8)
  pixels[:, :4] = 255  # left half white
  exif = Image.Exif()
  exif[0x0112] = 6  # stored rotated: display turns it 90 degrees clockwise
  data = encode(Image.fromarray(pixels), fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
  out = decode(data)
  assert out.shape == (8, 4, 3)
  assert out[:3].mean() > 200 and out[-3:].mean() < 50  # the white half is now on top


def test_jpeg_fast_path_matches_pil():
  bundle = sources.create_source(data_config(), "test")
  for i in range(0, 2000, 97):
    data = bundle[i]["image"].tobytes()
    np.testing.assert_array_equal(decode(data),
                                  np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"name,label\nfoo,1\n", "not an image"),
    (None, "cannot decode"),  # truncated JPEG
    ("png", "cannot decode"),  # truncated PNG
])
def test_bad_files_raise_with_name_and_reason(data, reason):
  if data is None:
    data = encode(gradient(size=(64, 64)), "JPEG")[:300]
  elif data == "png":
    data = encode(gradient(size=(64, 64)), "PNG")[:100]
  with pytest.raises(images.CorruptImageError, match=rf"^photos/cat\.jpg: {reason}"):
    images.decode_image(np.frombuffer(data, np.uint8), "photos/cat.jpg")


def test_decoded_arrays_pass_through_and_gray_arrays_get_3_channels():
  rgb = np.zeros((3, 4, 3), np.uint8)
  assert images.decode_image(rgb) is rgb
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4, 1)
  np.testing.assert_array_equal(images.decode_image(gray), np.repeat(gray, 3, -1))
  assert images.decode_image(gray[..., 0]).shape == (3, 4, 3)


def test_image_extensions_any_case():
  for name in ("a.jpg", "b.JPEG", "c.Png", "d.bmp", "e.WEBP", "f.gif"):
    assert images.is_image_file(name)
  for name in ("a.txt", "b.jpg.txt", "c.tiff", "jpg"):
    assert not images.is_image_file(name)


# Decompression bombs (issue #18): refused from the header, never decoded.


@pytest.fixture
def bombs(tmp_path):
  """The two files of issue #18, written here: a 1 x 1,000,000 PNG (1 KB) and a 20000 x
  20000 JPEG of flat grey (4.7 MB)."""
  wide, big = tmp_path / "wide.png", tmp_path / "big.jpg"
  Image.new("L", (1_000_000, 1), 77).save(wide)
  big.write_bytes(flat_gray_jpeg(20_000, 20_000))
  return wide, big


def _no_decoding(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("decoded")
  monkeypatch.setattr(cv2, "imdecode", refuse)
  monkeypatch.setattr(simplejpeg, "decode_jpeg", refuse)
  monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_pixel_limit_is_checked_from_the_header_on_every_decoder_path(bombs, monkeypatch):
  wide, big = bombs
  _no_decoding(monkeypatch)
  cases = [(big, images.MAX_PIXELS, r"20000 x 20000 = 400,000,000 pixels, more than the "
            r"limit of 89,478,485 \(config\.data\.max_image_pixels\); not decoded"),
           (wide, 500_000, r"1000000 x 1 = 1,000,000 pixels, more than the limit of 500,000")]
  for path, limit, message in cases:
    data = np.frombuffer(path.read_bytes(), np.uint8)
    name = re.escape(str(path))
    for call in (lambda: images.decode_image(data, str(path), limit),
                 lambda: images.image_size(data, str(path), limit),
                 lambda: transforms.decode_random_resized_crop_flip(
                     data, 224, np.random.default_rng(0), str(path), limit),
                 lambda: transforms.decode_resize_center_crop(data, 224, 256, str(path), limit)):
      with pytest.raises(images.ImageTooLargeError, match=rf"^{name}: {message}"):
        call()
  # The flat JPEG is a real one: at a size under the limit it decodes to its grey.
  monkeypatch.undo()
  assert (decode(flat_gray_jpeg(24, 16), "a.jpg") == 128).all()


def test_extreme_shapes_within_the_limit_never_make_a_huge_image(bombs):
  """The 1 x 1,000,000 PNG is under PIL's limit: each crop (the default 32 px pad-crop-flip,
  ImageNet's random-resized crop and eval crop) takes its box first, so the peak memory of the
  whole chain stays near the process's own (it was 10 GB and 130 s before the fix)."""
  wide, _ = bombs
  script = f"""
import re, numpy as np
from jaxcls.config import base_config
from jaxcls.data import transforms
data = np.frombuffer(open({str(wide)!r}, "rb").read(), np.uint8)
shapes = []
for augment, size in (("pad_crop_flip", 32), ("random_resized_crop_flip", 224), ("none", 224)):
  config = base_config().data
  config.train_augment, config.image_size, config.eval_resize = augment, size, 256
  element = {{"image": data, "label": 0}}
  for t in transforms.train_transforms(config):
    element = (t.random_map(element, np.random.default_rng(0))
               if hasattr(t, "random_map") else t.map(element))
  shapes.append(element["image"].shape)
# VmHWM, the peak of this process's own memory (ru_maxrss would count the parent's, from
# before exec).
peak_kb = int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
print(shapes, peak_kb // 1024)
"""
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=REPO, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  shapes, peak_mb = result.stdout.rsplit(" ", 1)
  assert shapes == "[(32, 32, 3), (224, 224, 3), (224, 224, 3)]"
  assert int(peak_mb) < 1000  # the import of jax and numpy takes ~300 MB; 32 x 32M is 3 GB
