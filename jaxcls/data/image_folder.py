"""Image folders laid out as `root/<class_name>/<file>`, like torchvision's ImageFolder.

Classes are the sub-folders of root, sorted by name; their files are found recursively, in
sorted order. Hidden files and folders (names starting with ".") are ignored, and so are files
whose extension (any case) is not one of images.IMAGE_EXTENSIONS. The eval split is either
a second root with the same class folders (config.data.eval_path) or a seeded, per-class
fraction of the train root (config.data.eval_fraction).
"""

import os
import pathlib
from typing import Any

import numpy as np

from jaxcls.data import images


def _visible(name: str) -> bool:
  return not name.startswith(".")


def class_folders(root: str) -> list[str]:
  """The sorted class names under root; errors name the folder."""
  if not os.path.isdir(root):
    what = "is not a directory" if os.path.exists(root) else "does not exist"
    raise ValueError(f"Image folder {root!r} {what}.")
  names = sorted(e.name for e in os.scandir(root) if _visible(e.name) and e.is_dir())
  if not names:
    loose = sum(1 for e in os.scandir(root) if e.is_file() and images.is_image_file(e.name))
    hint = f"; it holds {loose} images directly, which need class folders" if loose else ""
    raise ValueError(f"Image folder {root!r} has no class folders (expected "
                     f"{root}/<class_name>/<image>){hint}.")
  return names


def _walk(folder: str):
  """Every visible file under folder, recursively, in sorted order: (relative path, is image)."""
  for parent, dirs, files in os.walk(folder, followlinks=True):
    dirs[:] = sorted(d for d in dirs if _visible(d))
    rel = os.path.relpath(parent, folder)
    for f in sorted(filter(_visible, files)):
      yield (f if rel == "." else os.path.join(rel, f)), images.is_image_file(f)


def _class_files(folder: str) -> tuple[list[str], int]:
  """-> (sorted image paths relative to folder, number of other visible files)."""
  walked = list(_walk(folder))
  found = [path for path, is_image in walked if is_image]
  return found, len(walked) - len(found)


def find_images(paths) -> list[str]:
  """Image files given directly, or found in folders as the image-folder source finds them."""
  found = []
  for path in paths:
    if os.path.isdir(path):
      found += [os.path.join(path, rel) for rel, is_image in _walk(path) if is_image]
    elif os.path.isfile(path):
      found.append(path)
    else:
      raise FileNotFoundError(f"{path} is neither an image file nor a folder.")
  if not found:
    raise FileNotFoundError(f"No image files in {', '.join(paths)}.")
  return found


def scan(root: str) -> tuple[list[str], list[str], np.ndarray]:
  """-> (class names, file paths relative to root, int32 labels)."""
  class_names = class_folders(root)
  files, labels = [], []
  for label, name in enumerate(class_names):
    found, others = _class_files(os.path.join(root, name))
    if not found:
      note = f" (only {others} files of other types)" if others else ""
      raise ValueError(
          f"Class folder {os.path.join(root, name)!r} has no images{note}. Images need one "
          f"of the extensions {', '.join(images.IMAGE_EXTENSIONS)} (any case); remove the "
          "folder or add images.")
    files += [os.path.join(name, f) for f in found]
    labels += [label] * len(found)
  return class_names, files, np.asarray(labels, np.int32)


def holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded per-class split -> (train indices, eval indices), each sorted.

  Each class gives round(fraction * its size) examples to eval, so class balance is kept.
  """
  rng = np.random.default_rng(seed)
  train, held = [], []
  for label in range(int(labels.max()) + 1):
    members = rng.permutation(np.flatnonzero(labels == label))
    cut = int(round(fraction * len(members)))
    if cut == len(members):
      raise ValueError(f"config.data.eval_fraction={fraction} leaves class {label} with no "
                       f"training images ({len(members)} in all); lower it.")
    held.append(members[:cut])
    train.append(members[cut:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


class ImageFolderSource:
  """Reads the files on access; the paths are packed into one array, cheap to pickle."""

  def __init__(self, root: str, class_names: list[str], files: list[str], labels: np.ndarray,
               name: str):
    self.root = root
    self.class_names = class_names
    self.num_classes = len(class_names)
    self.name = name
    encoded = [f.encode() for f in files]
    self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
    self._paths = np.frombuffer(b"".join(encoded), np.uint8)
    self._labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._labels)

  def path(self, index: int) -> str:
    start, end = self._offsets[index], self._offsets[index + 1]
    return os.path.join(self.root, self._paths[start:end].tobytes().decode())

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.path(index)
    data = pathlib.Path(path).read_bytes()
    return {"image": np.frombuffer(data, np.uint8), "label": int(self._labels[index]),
            "id": path}

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.name}, n={len(self)})"


def create(data_config, split: str) -> ImageFolderSource:
  """The source for `split`: the train root, the eval root, or a held-out part of the train root."""
  root = data_config.path
  if not root:
    raise ValueError("config.data.source='image_folder' needs config.data.path: the folder "
                     "holding <class_name>/<image> sub-folders.")
  if split not in (data_config.train_split, data_config.eval_split):
    raise ValueError(
        f"Split {split!r} is neither config.data.train_split={data_config.train_split!r} nor "
        f"config.data.eval_split={data_config.eval_split!r}.")
  fraction = data_config.eval_fraction
  if fraction > 0:
    class_names, files, labels = scan(root)
    train, held = holdout(labels, fraction, data_config.eval_fraction_seed)
    keep = train if split == data_config.train_split else held
    files = [files[i] for i in keep]
    return ImageFolderSource(root, class_names, files, labels[keep],
                             name=f"{root} ({split}: {fraction:g} held out)")
  if split == data_config.train_split:
    return ImageFolderSource(root, *scan(root), name=root)
  eval_root = data_config.eval_path
  if not eval_root:
    raise ValueError(
        "config.data.source='image_folder' evaluates on config.data.eval_path (a folder with "
        "the same class folders as config.data.path) or, with config.data.eval_fraction > 0, "
        "on a held-out part of config.data.path; set one of them.")
  class_names, files, labels = scan(eval_root)
  train_classes = class_folders(root)
  if class_names != train_classes:
    missing = sorted(set(train_classes) - set(class_names))
    extra = sorted(set(class_names) - set(train_classes))
    raise ValueError(
        f"The eval folder {eval_root!r} and the train folder {root!r} need the same class "
        f"folders (labels follow their sorted names); the eval folder lacks {missing} and has "
        f"{extra} in addition.")
  return ImageFolderSource(eval_root, class_names, files, labels, name=eval_root)
