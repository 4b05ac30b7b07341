"""Tests of the file sources (image folder, TFDS, ArrayRecord), the converter, bad inputs and
skip_corrupt. Every fixture is written in a tmp dir; nothing is downloaded."""

import importlib.resources
import io
import json
import os
import pathlib
import subprocess
import sys

from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from jaxcls.config import base_config
from jaxcls.data import convert
from jaxcls.data import corrupt
from jaxcls.data import export_images
from jaxcls.data import image_folder
from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import records
from jaxcls.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]


def data_config(**overrides):
  config = base_config().data
  config.update(dict(num_workers=0, image_size=8, eval_resize=8, train_augment="none"))
  config.update(overrides)
  return config


def color(i: int) -> tuple[int, int, int]:
  """A colour that spells i, to trace an image through a pipeline."""
  return (i % 256, i // 256, 7)


def write_image(path: pathlib.Path, i: int, fmt: str | None = None, size=(8, 8)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, color(i)).save(path, format=fmt)


def index_of(image: np.ndarray) -> int:
  return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


# Formats by extension, any case; hidden files and folders and other files are ignored.
LAYOUT = {
    "cat/a.png": "PNG", "cat/b.PNG": "PNG", "cat/sub/c.bmp": "BMP", "cat/d.webp": "WEBP",
    "dog/e.gif": "GIF", "dog/f.JPEG": "JPEG", "dog/g.jpg": "JPEG",
    "zebra/h.png": "PNG",
}
IGNORED = ["cat/.hidden.png", ".git/x.png", "dog/.cache/y.png"]


@pytest.fixture
def folder(tmp_path) -> pathlib.Path:
  root = tmp_path / "train"
  for i, (name, fmt) in enumerate(LAYOUT.items()):
    write_image(root / name, i, fmt, size=(8 + i, 8))
  for name in IGNORED:
    write_image(root / name, 99, "PNG")
  (root / "cat" / "notes.txt").write_text("not an image")
  return root


def folder_config(root, **overrides):
  return data_config(**{"source": "image_folder", "path": str(root), "num_classes": 3,
                        **overrides})


# Image folders.


def test_image_folder_reads_the_layout(folder):
  source = sources.create_source(folder_config(folder), "train")
  assert source.class_names == ["cat", "dog", "zebra"] and source.num_classes == 3
  assert len(source) == len(LAYOUT)
  names = [os.path.relpath(source[i]["id"], folder) for i in range(len(source))]
  assert names == sorted(names, key=lambda n: (n.split("/")[0], n)) and set(names) == set(LAYOUT)
  for i in range(len(source)):
    element = source[i]
    name = os.path.relpath(element["id"], folder)
    assert element["label"] == ["cat", "dog", "zebra"].index(name.split("/")[0])
    image = images.decode_image(element["image"], element["id"])
    if LAYOUT[name] != "JPEG":
      assert index_of(image) == list(LAYOUT).index(name)


def test_image_folder_separate_eval_root(folder, tmp_path):
  for i, name in enumerate(["cat/1.png", "dog/2.png", "zebra/3.png", "zebra/4.png"]):
    write_image(tmp_path / "val" / name, 100 + i)
  config = folder_config(folder, eval_path=str(tmp_path / "val"), eval_split="val")
  source = sources.create_source(config, "val")
  assert len(source) == 4 and [source[i]["label"] for i in range(4)] == [0, 1, 2, 2]
  batches = list(pipeline.create_eval_dataset(config, source, 3, process_index=0,
                                              process_count=1))
  assert sum(b["mask"].sum() for b in batches) == 4


def test_image_folder_eval_root_needs_the_same_classes(folder, tmp_path):
  write_image(tmp_path / "val" / "cat" / "1.png", 0)
  write_image(tmp_path / "val" / "horse" / "1.png", 0)
  config = folder_config(folder, eval_path=str(tmp_path / "val"))
  with pytest.raises(ValueError, match=r"lacks \['dog', 'zebra'\] and has \['horse'\]"):
    sources.create_source(config, "test")
  with pytest.raises(ValueError, match=r"config\.data\.eval_path.*config\.data\.eval_fraction"):
    sources.create_source(folder_config(folder), "test")


def test_image_folder_held_out_fraction_is_seeded_and_per_class(tmp_path):
  root = tmp_path / "all"
  for i in range(30):
    write_image(root / ("a" if i < 20 else "b") / f"{i:02d}.png", i)
  config = data_config(source="image_folder", path=str(root), num_classes=2, eval_fraction=0.2)

  def ids(split, **overrides):
    config.update(overrides)
    source = sources.create_source(config, split)
    return [index_of(images.decode_image(source[i]["image"])) for i in range(len(source))]

  train, held = ids("train"), ids("test")
  assert len(held) == 6 and len(train) == 24  # 4 of class a, 2 of class b
  assert sum(i < 20 for i in held) == 4
  assert sorted(train + held) == list(range(30))
  assert ids("test") == held
  assert ids("test", eval_fraction_seed=1) != held


@pytest.mark.parametrize("case,message", [
    ("missing", r"Image folder '.*nowhere' does not exist"),
    ("empty_class", r"Class folder '.*dog' has no images"),
    ("only_text", r"Class folder '.*dog' has no images \(only 1 files of other types\)"),
    ("no_classes", r"has no class folders .*it holds 2 images directly"),
    ("num_classes", r"config\.data\.num_classes=5, but .* has 2 classes"),
])
def test_image_folder_errors_name_the_folder(tmp_path, case, message):
  root = tmp_path / "data"
  num_classes = 2
  if case == "missing":
    root = tmp_path / "nowhere"
  elif case == "no_classes":
    write_image(root / "1.png", 0)
    write_image(root / "2.png", 1)
  else:
    write_image(root / "cat" / "1.png", 0)
    (root / "dog").mkdir()
    if case == "only_text":
      (root / "dog" / "readme.txt").write_text("x")
    if case == "num_classes":
      write_image(root / "dog" / "1.png", 0)
      num_classes = 5
  with pytest.raises(ValueError, match=message):
    sources.create_source(folder_config(root, num_classes=num_classes), "train")


def test_image_folder_train_pipeline(folder):
  config = folder_config(folder, image_size=8, eval_resize=8, train_augment="pad_crop_flip")
  source = sources.create_source(config, "train")
  batch = next(iter(pipeline.create_train_dataset(config, source, 4, seed=0, process_index=0,
                                                  process_count=1)))
  assert batch["image"].shape == (4, 8, 8, 3) and set(batch) == {"image", "label"}


# Bad images: an error naming the file, or with skip_corrupt a recorded, deterministic skip.

BAD_FILES = {
    "cat/zero.jpg": b"",
    "cat/text.png": b"label,file\n1,foo.png\n",
    "dog/truncated.jpg": None,
}


@pytest.fixture
def damaged(tmp_path) -> pathlib.Path:
  root = tmp_path / "damaged"
  for i in range(12):
    write_image(root / ("cat" if i % 2 else "dog") / f"{i:02d}.png", i)
  for name, data in BAD_FILES.items():
    if data is None:
      buffer = io.BytesIO()
      Image.new("RGB", (32, 32), (9, 9, 9)).save(buffer, format="JPEG")
      data = buffer.getvalue()[:200]
    (root / name).write_bytes(data)
  return root


def test_bad_image_stops_the_pipeline_with_its_name(damaged):
  config = folder_config(damaged, num_classes=2)
  source = sources.create_source(config, "train")
  ds = pipeline.create_eval_dataset(config, source, 5, process_index=0, process_count=1)
  with pytest.raises(images.CorruptImageError,
                     match=r"cat/text\.png: not an image.*config\.data\.skip_corrupt=True"):
    list(ds)


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


# TFDS: a dataset prepared in the test by TFDS's own builder machinery (ArrayRecord files,
# dataset_info.json, features.json). Images are given already encoded, which needs no
# TensorFlow; reading goes through tfds.data_source's builder exactly as for cifar10.


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
      buffer = io.BytesIO()
      Image.new("RGB", (8 + i, 8), color(offset + i)).save(buffer, format="PNG")
      yield i, {"picture": buffer.getvalue(), "category": i % 3, "tag": f"t{i}"}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  JaxclsTestImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def tfds_config(data_dir, **overrides):
  return data_config(**{"source": "tfds", "tfds_name": "jaxcls_test_images", "path": data_dir,
                        "tfds_image_key": "picture", "tfds_label_key": "category",
                        "num_classes": 3, **overrides})


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
  copy = __import__("pickle").loads(__import__("pickle").dumps(source))
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


# ArrayRecord: the converter and its source.


def array_record_config(path, **overrides):
  return data_config(**{"source": "array_record", "path": str(path), "num_classes": 3,
                        **overrides})


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
  original = sources.create_source(data_config(), "test")
  source = sources.create_source(data_config(source="array_record", path=str(tmp_path)), "test")
  assert len(source) == 2000
  for i in range(0, 2000, 37):
    assert source[i]["label"] == original[i]["label"]
    np.testing.assert_array_equal(source[i]["image"], original[i]["image"])


def test_convert_command_line_with_worker_processes(folder, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "jaxcls.data.convert", "--src", str(folder), "--dst",
       str(tmp_path / "ar"), "--workers", "2"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
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


def write_records(directory: pathlib.Path, labels, class_names, **meta_overrides):
  directory.mkdir(parents=True, exist_ok=True)
  writer = ArrayRecordWriter(str(directory / "train-00000-of-00001.array_record"),
                             records.WRITER_OPTIONS)
  for i, label in enumerate(labels):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color(i)).save(buffer, format="PNG")
    writer.write(records.encode_record(label, f"img{i}.png", buffer.getvalue()))
  writer.close()
  meta = dict(format=records.FORMAT, split="train", num_examples=len(labels),
              class_names=class_names, class_counts=[1] * len(class_names),
              shards=["train-00000-of-00001.array_record"])
  meta.update(meta_overrides)
  (directory / "train.json").write_text(json.dumps(meta))


def test_array_record_label_outside_the_classes_is_an_error(tmp_path):
  write_records(tmp_path, [0, 1, 5], ["a", "b", "c"])
  config = array_record_config(tmp_path)
  source = sources.create_source(config, "train")
  ds = pipeline.create_eval_dataset(config, source, 3, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"train\[2\] \(img2\.png\) has label 5, outside \[0, 3\)"):
    list(ds)


@pytest.mark.parametrize("change,split,message", [
    ({}, "test", r"Split 'test' .* has no .*test\.json; splits written there .*\['train'\]"),
    (dict(format="other"), "train", r"is not a jaxcls-array-record-1 file"),
    (dict(class_counts=[2, 1]), "train", r"class_counts \[2, 1\] do not fit 3 class names"),
    (dict(num_examples=4, class_counts=[2, 1, 1]), "train", r"the shards hold 3 records, .* 4"),
    (dict(shards=["gone.array_record"]), "train", r"Shard .*gone\.array_record .* is missing"),
])
def test_array_record_errors(tmp_path, change, split, message):
  write_records(tmp_path, [0, 1, 2], ["a", "b", "c"], **change)
  with pytest.raises(ValueError, match=message):
    sources.create_source(array_record_config(tmp_path), split)


def test_array_record_path_errors(tmp_path):
  with pytest.raises(ValueError, match=r"config\.data\.path='.*nowhere' is not a directory"):
    sources.create_source(array_record_config(tmp_path / "nowhere"), "train")
  with pytest.raises(ValueError, match=r"source='array_record' needs config\.data\.path"):
    sources.create_source(array_record_config(""), "train")


# End to end: train.run on an image folder with a bad file and every augmentation.


def test_training_run_on_an_image_folder(tmp_path):
  from jaxcls import train  # pylint: disable=g-import-not-at-top
  root = tmp_path / "images"
  for i in range(40):
    write_image(root / ("ant" if i % 2 else "bee") / f"{i:02d}.png", i, size=(12, 10))
  (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  config = base_config()
  config.data.update(dict(
      source="image_folder", path=str(root), eval_fraction=0.2, num_classes=2, image_size=8,
      eval_resize=8, train_augment="random_resized_crop_flip", auto_augment="randaugment",
      random_erasing=0.5, mixup_alpha=0.2, cutmix_alpha=1.0, skip_corrupt=True,
      max_corrupt_fraction=0.05, num_workers=0))
  config.model.update(dict(name="resnet_tiny", width=4))
  config.update(dict(batch_size=16, eval_batch_size=16, num_train_steps=2, log_every_steps=1))
  results = train.run(config, str(tmp_path / "run"))
  assert results["eval"]["num_examples"] == 8  # 4 held out of each class; the bad file in train
  skipped = json.loads((tmp_path / "run" / "skipped_examples.json").read_text())
  assert skipped["train"]["skipped"] == 1 and skipped["test"]["skipped"] == 0
  assert "broken.jpg" in skipped["train"]["examples"][0]


def test_export_images_writes_an_image_folder_with_the_original_bytes(tmp_path):
  bundle = sources.create_source(data_config(source="bundled"), "test")
  counts = export_images.export_images(bundle, str(tmp_path / "test"), per_class=2)
  assert counts == {name: 2 for name in bundle.class_names}
  folder_source = image_folder.create(
      data_config(source="image_folder", path=str(tmp_path / "test")), "train")
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
  synthetic = sources.create_source(data_config(source="synthetic", synthetic_size=6,
                                                num_classes=3), "train")
  export_images.export_images(synthetic, str(tmp_path / "out"))
  files = sorted((tmp_path / "out").rglob("*.png"))
  assert len(files) == 6
  np.testing.assert_array_equal(np.asarray(Image.open(files[0])), synthetic[0]["image"])
