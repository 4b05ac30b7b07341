"""Image folders: one folder a class, any format and case, hidden files ignored; a separate
eval root or a seeded held-out fraction; errors naming the folder. Hostile folders: links out
of a class or into a loop, a named pipe, names that are not UTF-8, a single class."""

import json
import os
import pathlib
import sys

import ml_collections
import pytest

from jaxcls.data import image_folder
from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
from jaxcls.errors import ConfigError, DataError
from runner import run_command, run_main
from helpers import LAYOUT, folder_config, index_of, small_data_config, write_image


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
  config = small_data_config(source="image_folder", path=str(root), num_classes=2,
                             eval_fraction=0.2)

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


# Reads an image folder in a subprocess, so a read that blocks ends in a timeout, not a hang
# (a thread blocked in open() would keep the test process alive).
_READ_FOLDER = """
import sys
from jaxcls import config
from jaxcls.data import image_folder, sources
data = config.base_config().data
data.update(source="image_folder", path=sys.argv[1], num_classes=2, num_workers=0,
            skip_corrupt=sys.argv[2] == "True")
source = sources.create_source(data, "train")
print(len(source))
print("\\n".join(source.not_read))
try:
  image_folder.read_file(sys.argv[1] + "/dog/pipe.png")
except ValueError as e:
  print(e)
"""


def two_classes(root):
  for i, name in enumerate(["cat/1.png", "cat/2.png", "dog/3.png", "dog/4.png"]):
    write_image(root / name, i)
  return root


def bytes_name(folder, name: bytes) -> pathlib.Path:
  """folder/name for a name that is not valid UTF-8 (Linux keeps file names as bytes)."""
  return pathlib.Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


def relative_ids(source, root):
  return [os.path.relpath(source[i]["id"], root) for i in range(len(source))]


def test_links_out_of_a_class_folder_or_into_a_loop_are_not_followed(tmp_path, caplog):
  root = two_classes(tmp_path / "data")
  write_image(tmp_path / "outside" / "5.png", 5)
  (root / "cat" / "loop").symlink_to("..")  # the whole root again, as cat
  (root / "cat" / "dogs").symlink_to("../dog")  # dog images labelled cat
  (root / "cat" / "ext").symlink_to(tmp_path / "outside")
  (tmp_path / "outside" / "again").symlink_to(tmp_path / "outside")  # a loop outside
  (root / "cat" / "six.png").symlink_to(root / "dog" / "4.png")  # a file: read, as cat
  (root / "cat" / "gone.png").symlink_to("nowhere.png")
  source = sources.create_source(folder_config(root, num_classes=2), "train")
  assert relative_ids(source, root) == ["cat/1.png", "cat/2.png", "cat/six.png", "dog/3.png",
                                        "dog/4.png"]
  assert [source[i]["label"] for i in range(5)] == [0, 0, 0, 1, 1]
  reasons = dict(line.split(": ", 1) for line in source.not_read)
  assert set(reasons) == {str(root / "cat" / n) for n in ("dogs", "ext", "gone.png", "loop")}
  assert "(a loop)" in reasons[str(root / "cat" / "loop")]
  assert "inside the image folder" in reasons[str(root / "cat" / "dogs")]
  assert "config.data.follow_links=True" in reasons[str(root / "cat" / "ext")]
  assert "4 entries not read" in caplog.text and str(root / "cat" / "loop") in caplog.text

  followed = sources.create_source(folder_config(root, num_classes=2, follow_links=True),
                                   "train")
  assert relative_ids(followed, root) == ["cat/1.png", "cat/2.png", "cat/six.png",
                                          "cat/ext/5.png", "dog/3.png", "dog/4.png"]
  assert any(line.startswith(str(root / "cat" / "ext" / "again") + ": the folder")
             for line in followed.not_read)
  # A class folder that is a link to a folder outside: a class only when asked.
  linked = tmp_path / "linked"
  write_image(linked / "cat" / "1.png", 1)
  (linked / "dog").symlink_to(tmp_path / "outside")
  with pytest.raises(DataError, match=r"has one class folder \('cat'\).*\n  not read: "
                     rf"{linked / 'dog'}: a link to the folder {tmp_path / 'outside'}, outside"):
    sources.create_source(folder_config(linked, num_classes=2), "train")
  assert len(sources.create_source(folder_config(linked, num_classes=2, follow_links=True),
                                   "train")) == 2
  with pytest.raises(ConfigError, match=r"config\.data\.follow_links='yes'"):
    image_folder.check_config(ml_collections.ConfigDict({"follow_links": "yes"}))


@pytest.mark.parametrize("skip_corrupt", [False, True])
def test_a_named_pipe_is_listed_not_read(tmp_path, skip_corrupt):
  root = two_classes(tmp_path / "data")
  os.mkfifo(root / "dog" / "pipe.png")  # no writer: opening it to read would block forever
  result = run_command([sys.executable, "-c", _READ_FOLDER, root, str(skip_corrupt)],
                       devices=1, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  pipe = root / "dog" / "pipe.png"
  assert result.stdout.splitlines() == [
      "4", f"{pipe}: a named pipe, not a regular file; only regular files are read",
      f"{pipe}: a named pipe, not a regular file; only regular files are read."]


def test_a_file_name_that_is_not_utf8_is_read_and_named_escaped(tmp_path):
  root = two_classes(tmp_path / "data")
  write_image(bytes_name(root / "cat", b"caf\xe9.png"), 7)
  bytes_name(root / "dog", b"bad\xff.png").write_bytes(b"not an image")
  source = sources.create_source(folder_config(root, num_classes=2), "train")
  ids = relative_ids(source, root)
  assert ids == ["cat/1.png", "cat/2.png", "cat/caf\\xe9.png", "dog/3.png", "dog/4.png",
                 "dog/bad\\xff.png"]
  assert index_of(images.decode_image(source[2]["image"], source[2]["id"])) == 7
  with pytest.raises(images.CorruptImageError, match=r"dog/bad\\xff\.png: not an image"):
    images.decode_image(source[5]["image"], source[5]["id"])
  filtered = sources.create_source(
      folder_config(root, num_classes=2, skip_corrupt=True, max_corrupt_fraction=0.5), "train")
  assert len(filtered) == 5 and "bad\\xff.png: not an image" in filtered.skipped[5]


def test_a_single_class_folder_is_an_error(tmp_path):
  for i in range(3):
    write_image(tmp_path / "data" / "cat" / f"{i}.png", i)
  with pytest.raises(DataError, match=r"has one class folder \('cat'\); a classifier needs at "
                     "least two classes"):
    sources.create_source(folder_config(tmp_path / "data", num_classes=1), "train")


def test_training_on_a_hostile_folder_reads_what_it_can_and_says_what_not(tmp_path):
  root = tmp_path / "data"
  for i in range(16):
    write_image(root / ("cat" if i < 8 else "dog") / f"{i}.png", i)
  write_image(bytes_name(root / "cat", b"caf\xe9.png"), 16)
  (root / "cat" / "loop").symlink_to("..")
  os.mkfifo(root / "dog" / "pipe.png")
  result = run_main(tmp_path / "run", "--config.data.source=image_folder",
                    f"--config.data.path={root}", "--config.data.eval_fraction=0.25",
                    "--config.data.num_classes=2", "--config.data.num_workers=0",
                    "--config.batch_size=8", "--config.eval_batch_size=8",
                    "--config.num_train_steps=2", "--config.model.name=resnet_tiny", "--config.model.stem=small",
                    "--config.model.width=8", devices=1, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "(13 train / 4 eval)" in result.stdout  # 17 images: 16 and caf\xe9.png
  assert result.stderr.count("2 entries not read") == 1
  report = json.loads((tmp_path / "run" / "skipped_examples.json").read_text())
  assert report["train"]["not_read"] == [
      f"{root / 'cat' / 'loop'}: a link to {root}, which holds the image folder (a loop); not "
      "followed",
      f"{root / 'dog' / 'pipe.png'}: a named pipe, not a regular file; only regular files are "
      "read"]
