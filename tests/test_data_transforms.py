"""Host transforms: decode, the train crops and policies (seeded), the eval resize and crop,
and a bad file's error naming it."""

import grain
import numpy as np
from PIL import Image
import pytest

from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
from jaxcls.data import transforms
import helpers
from helpers import data_config, folder_config


def apply(transform_list, element, seed):
  for t in transform_list:
    if isinstance(t, grain.transforms.RandomMap):
      element = t.random_map(element, np.random.default_rng(seed))
    else:
      element = t.map(element)
  return element


@pytest.mark.parametrize("augment", transforms.TRAIN_AUGMENTS)
@pytest.mark.parametrize("input_shape", [(32, 32, 3), (45, 60, 3)])
def test_train_augment(augment, input_shape):
  config = data_config(train_augment=augment)
  ts = transforms.train_transforms(config)
  images = np.random.default_rng(0).integers(0, 256, (4, *input_shape), np.uint8)
  outputs = {}
  for seed in (1, 1, 2):
    out = [apply(ts, {"image": im, "label": 3}, seed) for im in images]
    for o in out:
      assert o["image"].shape == (32, 32, 3) and o["image"].dtype == np.uint8
      assert o["label"] == 3 and o["label"].dtype == np.int32
    outputs.setdefault(seed, []).append(np.stack([o["image"] for o in out]))
  np.testing.assert_array_equal(outputs[1][0], outputs[1][1])
  if augment != "none":
    assert not np.array_equal(outputs[1][0], outputs[2][0])


def test_pad_crop_flip_is_a_window_of_the_padded_image():
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  windows = [w for y in range(9) for x in range(9)
             for w in (padded[y:y + 32, x:x + 32], padded[y:y + 32, x:x + 32][:, ::-1])]
  rng = np.random.default_rng(1)
  matched = set()
  for _ in range(30):
    out = transforms.pad_crop_flip(image, 32, 4, rng)
    hits = [i for i, w in enumerate(windows) if np.array_equal(out, w)]
    assert len(hits) == 1
    matched.add(hits[0])
  assert len(matched) > 20  # offsets and flips vary


def test_eval_resize_center_crop():
  config = data_config(eval_resize=36)
  ts = transforms.eval_transforms(config)
  image = np.full((40, 80, 3), 7, np.uint8)
  out = apply(ts, {"image": image, "label": 0}, 0)["image"]
  assert out.shape == (32, 32, 3) and (out == 7).all()


def test_unknown_augment():
  with pytest.raises(ValueError, match=r"config\.data\.train_augment='cutout'"):
    transforms.train_transforms(data_config(train_augment="cutout"))


def test_config_adds_the_policies_after_the_crop():
  config = data_config(auto_augment="trivialaugment", random_erasing=0.25)
  ts = transforms.train_transforms(config)
  assert [type(t).__name__ for t in ts] == ["DecodeResizeCenterCrop", "PadCropFlip",
                                            "AutoAugment", "RandomErasing"]
  source = sources.create_source(config, "test")

  def first(config, seed):
    ds = pipeline.create_train_dataset(config, source, 16, seed, process_index=0,
                                       process_count=1)
    return next(iter(ds))["image"]

  np.testing.assert_array_equal(first(config, 0), first(config, 0))
  assert not np.array_equal(first(config, 0), first(data_config(), 0))
  ra = data_config(auto_augment="randaugment", randaugment_num_ops=3, randaugment_magnitude=5)
  assert first(ra, 1).shape == (16, 32, 32, 3)


def test_bad_image_stops_the_pipeline_with_its_name(damaged):
  config = folder_config(damaged, num_classes=2)
  source = sources.create_source(config, "train")
  ds = pipeline.create_eval_dataset(config, source, 5, process_index=0, process_count=1)
  with pytest.raises(images.CorruptImageError,
                     match=r"cat/text\.png: not an image.*config\.data\.skip_corrupt=True"):
    list(ds)


# Decoding fused with the crop, on real photographs (scikit-image's and scikit-learn's).


def photo_jpegs(size, quality=90, count=4):
  import skimage.data  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]
  photos.append(datasets.load_sample_images().images[0])
  return [helpers.encode(Image.fromarray(p).resize(size, Image.Resampling.BICUBIC), "JPEG",
                         quality=quality) for p in photos[:count]]


def old_resize_center_crop(image, size, resize):
  """The eval transform as a whole-image resize, then the crop (what it means); an image
  already size x size is kept as it is."""
  if image.shape[0] == image.shape[1] == size:
    return image
  image = transforms.resize_shorter_side(image, max(resize, size))
  h, w = image.shape[:2]
  top, left = (h - size) // 2, (w - size) // 2
  return image[top:top + size, left:left + size]


def psnr(a, b):
  mse = np.mean((a.astype(np.float64) - b) ** 2)
  return np.inf if mse == 0 else 10 * np.log10(255 ** 2 / mse)


def test_resize_box_is_pils_resize_of_the_whole_image():
  image = images.decode_image(photo_jpegs((300, 200), count=1)[0])
  pil = Image.fromarray(image)
  rng = np.random.default_rng(0)
  for _ in range(20):
    left, top, cw, ch = transforms.random_resized_crop_box(200, 300, rng)
    box = (left, top, left + cw, top + ch)
    expected = np.asarray(pil.resize((40, 40), Image.Resampling.BILINEAR, box=box))
    np.testing.assert_array_equal(transforms.resize_box(image, box, 40), expected)


@pytest.mark.parametrize("shape", [(375, 500), (500, 375), (256, 300), (40, 80), (224, 224),
                                   (1, 3000)])
def test_resize_center_crop_crops_first_with_the_same_pixels(shape):
  image = np.random.default_rng(1).integers(0, 256, (*shape, 3), np.uint8)
  out = transforms.resize_center_crop(image, 32 if shape[0] < 100 else 224, 256)
  want = old_resize_center_crop(image, out.shape[0], 256)
  assert out.shape == want.shape
  assert np.abs(out.astype(int) - want).max() <= 1  # PIL's fixed-point rounding at most


def test_reduced_decode_same_boxes_and_draws_close_pixels():
  """Where no reduction applies (500x375 at 224 px) the crops are the full decode's, bit for
  bit; where one does (1024x768) they stay within the tolerance of the module's note."""
  for size, tolerance in (((500, 375), 0.0), ((1024, 768), 1.5)):
    reduced = 0
    for data in photo_jpegs(size):
      full = images.decode_image(data)
      for seed in range(6):
        rng_new, rng_full = np.random.default_rng(seed), np.random.default_rng(seed)
        new = transforms.decode_random_resized_crop_flip(data, 224, rng_new, "a.jpg")
        old = transforms.random_resized_crop_flip(full, 224, rng_full)
        assert rng_new.bit_generator.state == rng_full.bit_generator.state  # same draws
        error = np.abs(new.astype(int) - old).mean()
        assert error <= tolerance, (size, seed, error)
        if error:
          reduced += 1
          assert psnr(new, old) >= 35
      new_eval = transforms.decode_resize_center_crop(data, 224, 256, "a.jpg")
      assert np.abs(new_eval.astype(int) - old_resize_center_crop(full, 224, 256)).mean() <= (
          tolerance + 0.01)
    assert (reduced > 0) == (size[0] == 1024)


def test_reduced_decode_at_full_size_is_opencvs_decode():
  for data in photo_jpegs((320, 240)):
    header = images.jpeg_header(data)
    assert header.plain and (header.width, header.height) == (320, 240)
    image, reduction = images.decode_jpeg_reduced(data, header, 1)
    assert reduction == 1
    np.testing.assert_array_equal(image, images.decode_image(data))
    half, reduction = images.decode_jpeg_reduced(data, header, 2)
    assert half.shape == (120, 160, 3) and reduction == 2


def test_the_reduction_never_leaves_the_crop_smaller_than_the_output():
  assert images.reduction_for(447, 900, 224, 224) == 1
  assert images.reduction_for(448, 900, 224, 224) == 2
  assert images.reduction_for(1800, 1792, 224, 224) == 8
  assert images.reduction_for(100, 100, 224, 224) == 1


def test_exif_rotated_jpeg_takes_the_full_decode_path():
  image = Image.fromarray(images.decode_image(photo_jpegs((1024, 768), count=1)[0]))
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 degrees clockwise
  data = helpers.encode(image, "JPEG", quality=90, exif=exif.tobytes())
  assert images.jpeg_header(data).orientation == 6 and not images.jpeg_header(data).plain
  assert images.image_size(data) == (768, 1024)
  new = transforms.decode_random_resized_crop_flip(data, 224, np.random.default_rng(3))
  old = transforms.random_resized_crop_flip(images.decode_image(data), 224,
                                            np.random.default_rng(3))
  np.testing.assert_array_equal(new, old)
