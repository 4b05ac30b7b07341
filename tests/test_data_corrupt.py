"""skip_corrupt: bad images found up front, dropped the same way on every start, counted and
listed in the run's skip report; too many is an error."""

import json
import pathlib

import numpy as np
import pytest

from jaxcls.data import corrupt
from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
from helpers import BAD_FILES, flat_gray_jpeg, folder_config, index_of


def test_skip_corrupt_drops_counts_and_lists(damaged, tmp_path):
  config = folder_config(damaged, num_classes=2, skip_corrupt=True, max_corrupt_fraction=0.25)
  source = sources.create_source(config, "train")
  assert len(source) == 12 and source.num_scanned == 15 and len(source.skipped) == 3
  reasons = list(source.skipped.values())
  for name, reason in zip(sorted(BAD_FILES), reasons):
    assert reason.startswith(str(damaged / name))
  assert "not an image" in reasons[0] and "empty file" in reasons[1]
  assert "truncated" in reasons[2]
  again = sources.create_source(config, "train")
  assert again.skipped == source.skipped
  batches = list(pipeline.create_eval_dataset(config, source, 5, process_index=0,
                                              process_count=1))
  seen = sorted(index_of(b["image"][k]) for b in batches for k in np.flatnonzero(b["mask"]))
  assert seen == list(range(12))

  path = corrupt.write_skip_report(str(tmp_path), {"train": source, "test": again})
  report = json.loads(pathlib.Path(path).read_text())
  assert report["train"]["skipped"] == 3 and report["train"]["checked"] == 15
  assert report["train"]["examples"] == reasons
  assert corrupt.write_skip_report(str(tmp_path), {"train": sources.create_source(
      folder_config(damaged, num_classes=2), "train")}) is None


def test_skip_corrupt_above_the_fraction_is_an_error(damaged):
  config = folder_config(damaged, num_classes=2, skip_corrupt=True)  # default 1%
  with pytest.raises(ValueError, match=r"3 of the 15 examples .* \(20\.00%\) cannot be decoded, "
                                       r"more than config\.data\.max_corrupt_fraction=0\.01"):
    sources.create_source(config, "train")


def test_an_image_over_the_pixel_limit_is_skipped_or_stops_the_run_named(folder):
  """Issue #18's 20000 x 20000 JPEG: skip_corrupt lists it with its size; without it the
  pipeline stops at it, naming it. Either way from its header, never decoded."""
  big = folder / "cat" / "big.jpg"
  big.write_bytes(flat_gray_jpeg(20_000, 20_000))
  config = folder_config(folder, skip_corrupt=True, max_corrupt_fraction=0.5)
  source = sources.create_source(config, "train")
  assert list(source.skipped.values()) == [
      f"{big}: 20000 x 20000 = 400,000,000 pixels, more than the limit of 89,478,485 "
      "(config.data.max_image_pixels); not decoded"]
  # The limit is config: at 80 pixels, the layout's 8x8, 9x8 and 10x8 images stay.
  lower = sources.create_source(folder_config(folder, skip_corrupt=True, max_corrupt_fraction=1,
                                              max_image_pixels=80), "train")
  assert len(lower) == 3 and lower.num_scanned == 9
  assert all(r.endswith("more than the limit of 80 (config.data.max_image_pixels); not decoded")
             for r in lower.skipped.values())
  config = folder_config(folder)
  source = sources.create_source(config, "train")
  with pytest.raises(images.ImageTooLargeError, match=rf"{big}: 20000 x 20000 .* set "
                     r"config\.data\.skip_corrupt=True"):
    list(pipeline.create_eval_dataset(config, source, 4, process_index=0, process_count=1))
