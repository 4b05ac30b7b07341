"""The converter to ArrayRecord files: image folders and .npz bundles in, the same bytes out
(or resized), on the command line with worker processes, with bad images named or skipped."""

import importlib.resources
import os

import numpy as np
import pytest

from jaxcls.data import convert
from jaxcls.data import images
from jaxcls.data import sources
from helpers import (array_record_config, flat_gray_jpeg, folder_config, small_data_config,
                     write_image)
from runner import run_tool


def test_convert_image_folder_round_trip(folder, tmp_path):
  meta = convert.convert(str(folder), str(tmp_path / "ar"), workers=0, num_shards=3,
                         progress=False)
  assert meta["split"] == "train" and meta["class_counts"] == [4, 3, 1]
  assert len(list((tmp_path / "ar").glob("train-*-of-00003.array_record"))) == 3
  original = sources.create_source(folder_config(folder), "train")
  source = sources.create_source(array_record_config(tmp_path / "ar"), "train")
  assert len(source) == len(original) and source.class_names == original.class_names
  for i in range(len(source)):
    element, expected = source[i], original[i]
    assert element["label"] == expected["label"]
    assert element["id"].endswith(f"({os.path.relpath(expected['id'], folder)})")
    np.testing.assert_array_equal(element["image"], expected["image"])  # the same bytes


def test_convert_resize_shrinks_only_large_images(tmp_path):
  write_image(tmp_path / "src" / "a" / "big.png", 0, size=(60, 30))
  write_image(tmp_path / "src" / "a" / "small.png", 1, size=(10, 12))
  write_image(tmp_path / "src" / "b" / "wide.jpg", 2, size=(300, 200))
  convert.convert(str(tmp_path / "src"), str(tmp_path / "ar"), "val", resize=16, workers=0,
                  progress=False)
  source = sources.create_source(array_record_config(tmp_path / "ar", num_classes=2), "val")
  shapes = [images.decode_image(source[i]["image"]).shape for i in range(3)]
  assert shapes == [(16, 32, 3), (12, 10, 3), (16, 24, 3)]
  assert source[1]["image"].tobytes() == (tmp_path / "src" / "a" / "small.png").read_bytes()
  assert source[0]["image"][:2].tobytes() == b"\xff\xd8"  # re-encoded as JPEG


def test_convert_npz_round_trip(tmp_path):
  bundle = importlib.resources.files("jaxcls.data") / "bundled" / "cifar10_sample_test.npz"
  with importlib.resources.as_file(bundle) as path:
    convert.convert(str(path), str(tmp_path), "test", workers=0, progress=False)
  original = sources.create_source(small_data_config(), "test")
  source = sources.create_source(small_data_config(source="array_record", path=str(tmp_path)),
                                 "test")
  assert len(source) == 2000
  for i in range(0, 2000, 37):
    assert source[i]["label"] == original[i]["label"]
    np.testing.assert_array_equal(source[i]["image"], original[i]["image"])


def test_convert_command_line_with_worker_processes(folder, tmp_path):
  result = run_tool("jaxcls.data.convert", "--src", folder, "--dst", tmp_path / "ar",
                    "--workers", 2, devices=8, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "Wrote 8 images of 3 classes in 1 shards" in result.stdout
  assert "100%" in result.stderr  # the progress bar
  assert len(sources.create_source(array_record_config(tmp_path / "ar"), "train")) == 8
  with pytest.raises(ValueError, match=r"train\.json exists: .* --overwrite"):
    convert.convert(str(folder), str(tmp_path / "ar"), workers=0, progress=False)
  meta = convert.convert(str(folder), str(tmp_path / "ar"), workers=0, num_shards=2,
                         overwrite=True, progress=False)
  assert sorted(p.name for p in (tmp_path / "ar").iterdir()) == [*meta["shards"], "train.json"]


def test_convert_bad_images(damaged, tmp_path):
  dst = tmp_path / "ar"
  with pytest.raises(images.CorruptImageError, match=r"cat/text\.png: not an image.*--skip_corrupt"):
    convert.convert(str(damaged), str(dst), workers=0, progress=False)
  assert not list(dst.iterdir())  # nothing half-written is left
  with pytest.raises(ValueError, match=r"3 of 15 images \(20\.00%\) do not decode"):
    convert.convert(str(damaged), str(dst), workers=0, skip_corrupt=True, progress=False)
  meta = convert.convert(str(damaged), str(dst), workers=0, skip_corrupt=True,
                         max_corrupt_fraction=0.5, progress=False)
  assert meta["num_examples"] == 12 and len(meta["skipped"]) == 3
  assert meta["skipped"][0].startswith("cat/text.png: not an image")


def test_convert_defaults_suit_imagenet_and_refuse_bombs(tmp_path):
  """By default a photo's shorter side is shrunk to 320 (JPEG quality 90, written in the
  split's metadata), and an image over the pixel limit is named from its header, or skipped."""
  src = tmp_path / "src"
  write_image(src / "a" / "photo.png", 0, size=(500, 375))
  write_image(src / "b" / "small.png", 1, size=(64, 48))
  meta = convert.convert(str(src), str(tmp_path / "ar"), "train", workers=0, progress=False)
  assert (meta["resize"], meta["quality"]) == (320, 90)
  source = sources.create_source(array_record_config(tmp_path / "ar", num_classes=2), "train")
  assert [images.decode_image(source[i]["image"]).shape for i in range(2)] == [
      (320, 427, 3), (48, 64, 3)]
  (src / "b" / "big.jpg").write_bytes(flat_gray_jpeg(20_000, 20_000))
  with pytest.raises(images.CorruptImageError,
                     match=r"^b/big\.jpg: 20000 x 20000 = 400,000,000 pixels.*--skip_corrupt"):
    convert.convert(str(src), str(tmp_path / "ar2"), "train", workers=0, progress=False)
  meta = convert.convert(str(src), str(tmp_path / "ar2"), "train", workers=0, progress=False,
                         skip_corrupt=True, max_corrupt_fraction=0.5)
  assert meta["num_examples"] == 2 and meta["skipped"][0].startswith("b/big.jpg: 20000 x 20000")
