"""TFDS sources, on a dataset prepared in the test by TFDS's own builder machinery (ArrayRecord
files, dataset_info.json, features.json). Images are given already encoded, which needs no
TensorFlow; reading goes through tfds.data_source's builder exactly as for cifar10."""

import pickle

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
from helpers import color, encode, index_of, small_data_config


class JaxclsTestImages(tfds.core.GeneratorBasedBuilder):
  """3 classes; train has 10 PNGs of growing width (one grayscale), test 5."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "picture": tfds.features.Image(shape=(None, None, 3)),
        "category": tfds.features.ClassLabel(names=["x", "y", "z"]),
        "tag": tfds.features.Text(),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(10, 0), "test": self._generate_examples(5, 100)}

  def _generate_examples(self, n, offset):
    for i in range(n):
      picture = encode(Image.new("RGB", (8 + i, 8), color(offset + i)), "PNG")
      yield i, {"picture": picture, "category": i % 3, "tag": f"t{i}"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  JaxclsTestImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def tfds_config(data_dir, **overrides):
  return small_data_config(**{"source": "tfds", "tfds_name": "jaxcls_test_images",
                              "path": data_dir, "tfds_image_key": "picture",
                              "tfds_label_key": "category", "num_classes": 3, **overrides})


def test_tfds_source(tfds_dir):
  config = tfds_config(tfds_dir)
  source = sources.create_source(config, "train")
  assert len(source) == 10 and source.class_names == ["x", "y", "z"]
  # TFDS shuffles examples when it writes them: compare as sets.
  seen = {}
  for i in range(len(source)):
    element = source[i]
    assert element["image"].dtype == np.uint8 and element["image"].ndim == 1  # still encoded
    seen[index_of(images.decode_image(element["image"]))] = element["label"]
  assert seen == {i: i % 3 for i in range(10)}
  copy = pickle.loads(pickle.dumps(source))
  np.testing.assert_array_equal(copy[3]["image"], source[3]["image"])
  assert len(sources.create_source(config, "train[:40%]")) == 4

  test = sources.create_source(config, "test")
  batches = list(pipeline.create_eval_dataset(config, test, 4, process_index=0, process_count=1))
  labels = sorted(index_of(b["image"][k]) for b in batches for k in np.flatnonzero(b["mask"]))
  assert labels == list(range(100, 105))


@pytest.mark.parametrize("overrides,split,message", [
    (dict(tfds_image_key="image"), "train", r"no feature 'image' \(config\.data\.tfds_image_key\)"),
    (dict(tfds_label_key="tag"), "train", r"'tag' .* is a Text, not a ClassLabel"),
    ({}, "validation", r"Split 'validation' .* available splits: \['test', 'train'\]"),
    (dict(num_classes=10), "train", r"config\.data\.num_classes=10, but .* has 3 classes"),
    (dict(tfds_name="cifar10"), "train", r"'cifar10' is not prepared in .*tfds build cifar10 "
                                         r"--file_format=array_record"),
    (dict(path="/nonexistent/tfds"), "train", r"config\.data\.path='/nonexistent/tfds'"),
    (dict(tfds_name=""), "train", r"needs config\.data\.tfds_name"),
])
def test_tfds_errors(tfds_dir, overrides, split, message):
  with pytest.raises(ValueError, match=message):
    sources.create_source(tfds_config(tfds_dir, **overrides), split)
