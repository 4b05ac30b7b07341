"""Image folders: one folder a class, any format and case, hidden files ignored; a separate
eval root or a seeded held-out fraction; errors naming the folder."""

import os

import pytest

from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
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
