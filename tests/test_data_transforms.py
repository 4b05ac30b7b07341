"""Host transforms: decode, the train crops and policies (seeded), the eval resize and crop,
and a bad file's error naming it."""

import grain
import numpy as np
import pytest

from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
from jaxcls.data import transforms
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
