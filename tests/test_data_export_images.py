"""Exporting a source as an image folder: the original bytes, or PNGs of decoded images."""

import pathlib

import numpy as np
from PIL import Image
import pytest

from jaxcls.data import export_images
from jaxcls.data import image_folder
from jaxcls.data import sources
from helpers import small_data_config


def test_export_images_writes_an_image_folder_with_the_original_bytes(tmp_path):
  bundle = sources.create_source(small_data_config(source="bundled"), "test")
  counts = export_images.export_images(bundle, str(tmp_path / "test"), per_class=2)
  assert counts == {name: 2 for name in bundle.class_names}
  folder_source = image_folder.create(
      small_data_config(source="image_folder", path=str(tmp_path / "test")), "train")
  assert folder_source.class_names == bundle.class_names and len(folder_source) == 20
  for i in range(len(folder_source)):
    element = folder_source[i]
    index = int(pathlib.Path(element["id"]).stem)  # the file is named after the bundle index
    original = bundle[index]
    assert element["label"] == original["label"]
    assert bytes(element["image"]) == original["image"].tobytes()
  with pytest.raises(ValueError, match="not empty"):
    export_images.export_images(bundle, str(tmp_path / "test"))


def test_export_images_encodes_decoded_images_as_png(tmp_path):
  synthetic = sources.create_source(small_data_config(source="synthetic", synthetic_size=6,
                                                num_classes=3), "train")
  export_images.export_images(synthetic, str(tmp_path / "out"))
  files = sorted((tmp_path / "out").rglob("*.png"))
  assert len(files) == 6
  np.testing.assert_array_equal(np.asarray(Image.open(files[0])), synthetic[0]["image"])
