"""Sources: the bundled CIFAR-10 sample, .npz bundles, synthetic images; the registry's errors."""

import pickle

import numpy as np
from PIL import Image
import pytest

from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
from helpers import data_config, encode


@pytest.mark.parametrize("split,size", [("train", 10_000), ("test", 2_000)])
def test_bundled_source(split, size):
  source = sources.create_source(data_config(), split)
  assert len(source) == size
  assert source.num_classes == 10 and len(source.class_names) == 10
  assert source.class_names[0] == "airplane"
  labels = np.array([source[i]["label"] for i in range(len(source))])
  assert labels.min() >= 0 and labels.max() < 10
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [size // 10] * 10)
  image = images.decode_image(source[0]["image"])
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_bundled_source_pickles_without_its_arrays():
  source = sources.create_source(data_config(), "test")
  blob = pickle.dumps(source)
  assert len(blob) < 10_000  # the worker re-reads the file
  copy = pickle.loads(blob)
  np.testing.assert_array_equal(copy[5]["image"], source[5]["image"])


def test_synthetic_source_is_decoded_and_seeded():
  config = data_config(source="synthetic", synthetic_size=50, image_size=16, num_classes=5)
  source = sources.create_source(config, "train")
  assert len(source) == 50 and source.num_classes == 5
  item = source[7]
  assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.uint8
  assert item["label"] == 7 % 5
  np.testing.assert_array_equal(sources.create_source(config, "train")[7]["image"],
                                item["image"])
  assert not np.array_equal(sources.create_source(config, "test")[7]["image"], item["image"])
  batch = next(iter(pipeline.create_train_dataset(config, source, 10, seed=0,
                                                  process_index=0, process_count=1)))
  assert batch["image"].shape == (10, 16, 16, 3)


def test_unknown_source():
  with pytest.raises(ValueError, match=r"config\.data\.source='nope'.*bundled"):
    sources.create_source(data_config(source="nope"), "train")


def test_unknown_split():
  with pytest.raises(ValueError, match=r"'valid'.*config\.data\.train_split.*'test', 'train'"):
    sources.create_source(data_config(), "valid")


def test_num_classes_mismatch():
  with pytest.raises(ValueError, match=r"config\.data\.num_classes=100.*10 classes"):
    sources.create_source(data_config(num_classes=100), "test")


def write_bundle(path, labels, class_names):
  blob = np.frombuffer(encode(Image.new("RGB", (4, 4)), "JPEG"), np.uint8)
  np.savez(path, jpeg=np.tile(blob, len(labels)),
           offsets=np.arange(len(labels) + 1, dtype=np.int64) * len(blob),
           labels=np.asarray(labels, np.int32), class_names=np.asarray(class_names))


def test_npz_source_reads_a_directory(tmp_path):
  write_bundle(tmp_path / "train.npz", [0, 1, 1], ["a", "b"])
  source = sources.create_source(data_config(source="npz", path=str(tmp_path),
                                             num_classes=2), "train")
  assert len(source) == 3 and source.class_names == ["a", "b"]
  assert images.decode_image(source[2]["image"]).shape == (4, 4, 3)


def test_labels_out_of_range(tmp_path):
  write_bundle(tmp_path / "train.npz", [0, 2, 1], ["a", "b"])
  with pytest.raises(ValueError, match=r"train\.npz.*labels outside \[0, 2\)"):
    sources.create_source(data_config(source="npz", path=str(tmp_path), num_classes=2),
                          "train")
