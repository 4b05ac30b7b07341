"""config.data.decoder='dali': its config and import errors, and the host's half (the crop
boxes it hands DALI are the CPU path's). No GPU here, so DALI itself never runs in the suite;
scripts/gpu_benchmark.sh runs it where one is present."""

import importlib.util
import sys

import numpy as np
import pytest

from jaxcls import config as config_lib
from jaxcls.data import dali
from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
from jaxcls.data import transforms
from jaxcls.errors import ConfigError, DataError
from helpers import data_config, flat_gray_jpeg, folder_config


def imagenet_data(**overrides):
  return data_config(decoder="dali", train_augment="random_resized_crop_flip", image_size=16,
                     eval_resize=18, **overrides)


def test_unknown_decoder_and_unsupported_augmentations_are_config_errors():
  with pytest.raises(ConfigError,
                     match=r"config\.data\.decoder='gpu' is not known; use one of cpu, dali"):
    dali.check_config(data_config(decoder="gpu"))
  with pytest.raises(ConfigError, match=r"train_augment='pad_crop_flip'; use decoder='cpu'"):
    dali.check_config(data_config(decoder="dali", train_augment="pad_crop_flip"))
  with pytest.raises(ConfigError, match=r"auto_augment='randaugment', random_erasing=0\.0"):
    dali.check_config(imagenet_data(auto_augment="randaugment"))
  dali.check_config(data_config())  # the default, 'cpu', needs nothing


def test_dali_not_installed_or_no_gpu_is_a_clear_config_error(monkeypatch):
  config = config_lib.base_config()
  config.data.update(decoder="dali", train_augment="random_resized_crop_flip")
  installed = importlib.util.find_spec("nvidia.dali") if importlib.util.find_spec(
      "nvidia") else None
  if installed is None:
    with pytest.raises(ConfigError, match=r"needs NVIDIA DALI, which is not installed: pip "
                       r"install 'jaxcls\[dali\]'"):
      config_lib.check_config(config, num_devices=8)
  # With DALI present (pretended here), JAX on CPU is the next error.
  monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
  with pytest.raises(ConfigError, match=r"decodes on NVIDIA GPUs; JAX runs on 'cpu'"):
    config_lib.check_config(config, num_devices=8)


def test_the_host_plans_the_cpu_paths_boxes_and_checks_the_pixel_limit(folder):
  config = folder_config(folder, decoder="dali", train_augment="random_resized_crop_flip",
                         image_size=4, eval_resize=6)
  source = sources.create_source(config, "train")
  batch = next(iter(pipeline.create_train_dataset(config, source, 4, seed=3, process_index=0,
                                                  process_count=1)))
  assert isinstance(batch, dali.PlannedBatch) and len(batch) == 4
  # The same boxes and flips as transforms.py draws from the same per-example generator.
  for t in dali.train_transforms(config):
    element = t.random_map(dict(source[0]), np.random.default_rng(5))
  width, height = images.image_size(source[0]["image"])
  rng = np.random.default_rng(5)
  np.testing.assert_array_equal(element["box"], np.float32(
      transforms.random_resized_crop_box(height, width, rng)))
  assert element["flip"] == rng.integers(2) and element["size"] == 4
  assert images.decode_image(element["image"]).shape == (height, width, 3)  # still encoded
  # Eval: the center box, and the padding as a PNG of zeros.
  eval_batch = next(iter(pipeline.create_eval_dataset(config, source, 12, process_index=0,
                                                      process_count=1)))
  assert [e["mask"] for e in eval_batch].count(False) == 12 - len(source)
  padding = next(e for e in eval_batch if not e["mask"])
  assert (images.decode_image(padding["image"]) == 0).all()
  # 4x4 zeros resized to 6x6, its central 4x4: in the original, 2/3 in and 8/3 across.
  np.testing.assert_allclose(padding["box"], (2 / 3, 2 / 3, 8 / 3, 8 / 3), rtol=1e-6)
  # A bomb is refused on the host, from its header, before DALI sees it.
  plan = dali.eval_transforms(config)[0]
  with pytest.raises(images.ImageTooLargeError, match=r"^big\.jpg: 20000 x 20000"):
    plan.random_map({"image": flat_gray_jpeg(20_000, 20_000), "label": 0, "id": "big.jpg"},
                    np.random.default_rng(0))


def test_without_dali_the_gpu_half_names_the_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "nvidia", None)  # as if not installed
  with pytest.raises(DataError, match=r"cannot import NVIDIA DALI .*pip install 'jaxcls\[dali\]'"):
    dali._dali()  # pylint: disable=protected-access
