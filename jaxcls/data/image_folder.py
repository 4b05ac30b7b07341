"""Image folders laid out as `root/<class_name>/<file>`, like torchvision's ImageFolder.

Classes are the sub-folders of root, sorted by name (at least two); their files are found
recursively, in sorted order. Hidden files and folders (names starting with ".") are ignored,
and so are files whose extension (any case) is not one of images.IMAGE_EXTENSIONS. The eval
split is either a second root with the same class folders (config.data.eval_path) or a
seeded, per-class fraction of the train root (config.data.eval_fraction).

Links: a link to a file is read. A link to a folder inside root, or to one that holds root
(a loop), is never followed: its images would be read twice or under another class. A link
to a folder outside root is followed only with config.data.follow_links=True, each folder
once. Only regular files are read (a named pipe would block the reader forever). What the
scan leaves out that has an image's name is logged and kept in `ImageFolderSource.not_read`,
which the run directory's skip report lists. File names need not be UTF-8: messages show
the bytes that are not as escapes (caf\\xe9.png).
"""

import os
import stat
from typing import Any

from absl import logging
import numpy as np

from jaxcls import storage
from jaxcls.data import images
from jaxcls.errors import ConfigError, DataError

_MAX_LOGGED = 10  # skipped entries named in the log line; the skip report has them all


def check_config(data_config) -> None:
  """The image-folder keys of config.data that need no data to check."""
  if not isinstance(data_config.follow_links, bool):
    raise ConfigError(f"config.data.follow_links={data_config.follow_links!r} must be True or "
                      "False.")


def display(path) -> str:
  """A path as text for messages: bytes that are not UTF-8 shown as escapes, never an error."""
  return os.fsencode(path).decode("utf-8", "backslashreplace")


def _visible(name: str) -> bool:
  return not name.startswith(".")


def _kind(mode: int) -> str:
  for test, name in ((stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket"),
                     (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                     (stat.S_ISDIR, "a folder")):
    if test(mode):
      return name
  return "not a regular file"


def _contains(folder: str, path: str) -> bool:
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def read_file(path: str) -> bytes:
  """The bytes of a regular file; anything else (a named pipe, a device) is a DataError.
  In a bucket (predict's gs:// images), the object's bytes."""
  if storage.is_remote(path):
    return storage.as_path(path).read_bytes()
  # O_NONBLOCK: opening a named pipe with no writer would otherwise block forever.
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  try:
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
      raise DataError(f"{display(path)}: {_kind(mode)}, not a regular file; only regular "
                      "files are read.")
    with os.fdopen(fd, "rb", closefd=False) as f:
      return f.read()
  finally:
    os.close(fd)


def _not_read(lines: list[str]) -> str:
  return "".join(f"\n  not read: {line}" for line in lines[:_MAX_LOGGED])


class _Scanner:
  """Finds the files under one root by the rules above; collects what it leaves out."""

  def __init__(self, root: str, follow_links: bool):
    self.root = root
    self.real_root = os.path.realpath(root)
    self.follow_links = follow_links
    self.skipped: list[str] = []  # "<path>: <reason>"
    self._read: dict[str, str] = {}  # real path of each folder a walk started at -> its path

  def _skip(self, path: str, reason: str) -> None:
    self.skipped.append(f"{display(path)}: {reason}")

  def _folder_link(self, path: str, target: str) -> bool:
    """Whether to go into the folder a link at `path` points to (else it is recorded)."""
    if _contains(target, self.real_root):
      self._skip(path, f"a link to {display(target)}, which holds the image folder (a loop); "
                 "not followed")
    elif _contains(self.real_root, target):
      self._skip(path, f"a link to {display(target)}, inside the image folder; not followed, "
                 "so no image is read twice or under another class")
    elif not self.follow_links:
      self._skip(path, f"a link to the folder {display(target)}, outside the image folder; not "
                 "followed (config.data.follow_links=True reads it)")
    else:
      return True
    return False

  def classify(self, entry: os.DirEntry) -> str:
    """'dir' (go in), 'file' (a regular file, through a link or not) or 'skip'."""
    if entry.is_symlink():
      try:
        mode = os.stat(entry.path).st_mode
      except OSError as e:  # a dangling link, or a loop of links
        if images.is_image_file(entry.name):
          self._skip(entry.path, f"a link that leads to no file ({e.strerror})")
        return "skip"
      if stat.S_ISDIR(mode):
        target = os.path.realpath(entry.path)
        return "dir" if self._folder_link(entry.path, target) else "skip"
    else:
      mode = entry.stat(follow_symlinks=False).st_mode
      if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
      return "file"
    if images.is_image_file(entry.name):
      self._skip(entry.path, f"{_kind(mode)}, not a regular file; only regular files are read")
    return "skip"

  def entries(self, folder: str) -> tuple[list[str], list[str]]:
    """-> (sorted names of the regular files, sorted names of the folders to go into)."""
    files, dirs = [], []
    with os.scandir(folder) as it:
      for entry in sorted((e for e in it if _visible(e.name)), key=lambda e: e.name):
        kind = self.classify(entry)
        if kind != "skip":
          (dirs if kind == "dir" else files).append(entry.name)
    return files, dirs

  def walk(self, folder: str, rel: str = "", start: bool = True):
    """Every regular file under folder, files before sub-folders, each sorted: (relative
    path, is image). A walk starts at a class folder and at each link followed; one that
    would overlap a folder read already is left out."""
    if start:
      real = os.path.realpath(folder)
      for done, path in self._read.items():
        if _contains(done, real) or _contains(real, done):
          self._skip(folder, f"the folder {display(real)}, read already as {display(path)}")
          return
      self._read[real] = folder
    files, dirs = self.entries(folder)
    for f in files:
      yield os.path.join(rel, f), images.is_image_file(f)
    for d in dirs:
      sub = os.path.join(folder, d)
      yield from self.walk(sub, os.path.join(rel, d), start=os.path.islink(sub))

  def class_folders(self) -> list[str]:
    """The sorted class folder names under root; errors name the folder."""
    root = self.root
    if not os.path.isdir(root):
      what = "is not a directory" if os.path.exists(root) else "does not exist"
      raise ValueError(f"Image folder {display(root)!r} {what}.")
    files, names = self.entries(root)
    if not names:
      loose = sum(1 for f in files if images.is_image_file(f))
      hint = f"; it holds {loose} images directly, which need class folders" if loose else ""
      raise ValueError(f"Image folder {display(root)!r} has no class folders (expected "
                       f"{display(root)}/<class_name>/<image>){hint}.{self.left_out(root)}")
    return names

  def left_out(self, folder: str) -> str:
    """The entries under folder the scan left out, for an error that finds too little there."""
    prefix = display(folder).rstrip(os.sep) + os.sep
    return _not_read([line for line in self.skipped if line.startswith(prefix)])

  def log_skipped(self) -> None:
    if self.skipped:
      shown = "\n  ".join(self.skipped[:_MAX_LOGGED])
      more = (f"\n  ... and {len(self.skipped) - _MAX_LOGGED} more"
              if len(self.skipped) > _MAX_LOGGED else "")
      logging.warning("Image folder %s: %d entries not read:\n  %s%s", display(self.root),
                      len(self.skipped), shown, more)


def find_images(paths) -> tuple[list[str], list[str]]:
  """Image files given directly, or found in folders as the image-folder source finds them
  (no links to folders outside them) -> (paths, "<path>: <reason>" for each one left out)."""
  found, skipped = [], []
  for path in paths:
    if storage.is_remote(path):
      found += _bucket_images(path)
    elif os.path.isdir(path):
      scanner = _Scanner(path, follow_links=False)
      found += [os.path.join(path, rel) for rel, is_image in scanner.walk(path) if is_image]
      skipped += scanner.skipped
    elif os.path.exists(path):
      found.append(path)  # read_file names it if it is not a regular file
    else:
      raise FileNotFoundError(f"{display(path)} is neither an image file nor a folder.")
  if not found:
    raise FileNotFoundError(
        f"No image files in {', '.join(map(display, paths))}.{_not_read(skipped)}")
  return found, skipped


def _bucket_images(path: str) -> list[str]:
  """An image object, or the image objects under a bucket folder (sorted; names starting with
  "." left out, as locally); a bucket has no links or special files to leave out."""
  base = storage.as_path(path)
  if not base.is_dir():
    if not base.exists():
      raise FileNotFoundError(f"{path} is neither an image file nor a folder.")
    return [path]
  found = []
  for relative in storage.files_under(base):  # one listing (epath's gs:// has no rglob)
    parts = relative.split("/")
    if images.is_image_file(parts[-1]) and all(map(_visible, parts)):
      found.append(f"{base}/{relative}")
  return sorted(found)


def _scan(root: str, follow_links: bool,
          log: bool = True) -> tuple[list[str], list[str], np.ndarray, list[str]]:
  """-> (class names, file paths relative to root, int32 labels, entries not read)."""
  scanner = _Scanner(root, follow_links)
  folders = scanner.class_folders()
  if len(folders) < 2:
    raise DataError(
        f"Image folder {display(root)!r} has one class folder ({display(folders[0])!r}); a "
        "classifier needs at least two classes, each a folder of images: "
        f"{display(root)}/<class_name>/<image>.{scanner.left_out(root)}")
  files, labels = [], []
  for label, name in enumerate(folders):
    found, others = [], 0
    for path, is_image in scanner.walk(os.path.join(root, name)):
      if is_image:
        found.append(path)
      else:
        others += 1
    if not found:
      folder = os.path.join(root, name)
      note = f" (only {others} files of other types)" if others else ""
      raise ValueError(
          f"Class folder {display(folder)!r} has no images{note}. Images need one of the "
          f"extensions {', '.join(images.IMAGE_EXTENSIONS)} (any case); remove the folder or "
          f"add images.{scanner.left_out(folder)}")
    files += [os.path.join(name, f) for f in found]
    labels += [label] * len(found)
  if log:
    scanner.log_skipped()
  return ([display(f) for f in folders], files, np.asarray(labels, np.int32),
          scanner.skipped)


def scan(root: str, follow_links: bool = False) -> tuple[list[str], list[str], np.ndarray]:
  """-> (class names, file paths relative to root, int32 labels); logs what it left out."""
  return _scan(root, follow_links)[:3]


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
  """Reads the files on access; the paths are packed into one array, cheap to pickle.

  `not_read` lists what the scan left out ("<path>: <reason>"), for the skip report.
  """

  def __init__(self, root: str, class_names: list[str], files: list[str], labels: np.ndarray,
               name: str, not_read: list[str] = ()):
    self.root = root
    self.class_names = class_names
    self.num_classes = len(class_names)
    self.name = name
    self.not_read = list(not_read)
    encoded = [os.fsencode(f) for f in files]  # names need not be UTF-8
    self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
    self._paths = np.frombuffer(b"".join(encoded), np.uint8)
    self._labels = np.asarray(labels, np.int32)

  def __len__(self) -> int:
    return len(self._labels)

  def path(self, index: int) -> str:
    start, end = self._offsets[index], self._offsets[index + 1]
    return os.path.join(self.root, os.fsdecode(self._paths[start:end].tobytes()))

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.path(index)
    return {"image": np.frombuffer(read_file(path), np.uint8),
            "label": int(self._labels[index]), "id": display(path)}

  def __repr__(self) -> str:
    return f"ImageFolderSource({self.name}, n={len(self)})"


def create(data_config, split: str) -> ImageFolderSource:
  """The source for `split`: the train root, the eval root, or a held-out part of the train root."""
  root = data_config.path
  if not root:
    raise ValueError("config.data.source='image_folder' needs config.data.path: the folder "
                     "holding <class_name>/<image> sub-folders.")
  for key in ("path", "eval_path"):  # the scan follows local links and file types
    storage.require_local(data_config[key], f"config.data.{key}", "the image-folder source")
  if split not in (data_config.train_split, data_config.eval_split):
    raise ValueError(
        f"Split {split!r} is neither config.data.train_split={data_config.train_split!r} nor "
        f"config.data.eval_split={data_config.eval_split!r}.")
  follow = data_config.follow_links
  fraction = data_config.eval_fraction
  if fraction > 0:
    # Both splits scan the one root; the train split says what it left out.
    class_names, files, labels, not_read = _scan(root, follow,
                                                 log=split == data_config.train_split)
    train, held = holdout(labels, fraction, data_config.eval_fraction_seed)
    keep = train if split == data_config.train_split else held
    files = [files[i] for i in keep]
    return ImageFolderSource(root, class_names, files, labels[keep],
                             name=f"{display(root)} ({split}: {fraction:g} held out)",
                             not_read=not_read)
  if split == data_config.train_split:
    class_names, files, labels, not_read = _scan(root, follow)
    return ImageFolderSource(root, class_names, files, labels, name=display(root),
                             not_read=not_read)
  eval_root = data_config.eval_path
  if not eval_root:
    raise ValueError(
        "config.data.source='image_folder' evaluates on config.data.eval_path (a folder with "
        "the same class folders as config.data.path) or, with config.data.eval_fraction > 0, "
        "on a held-out part of config.data.path; set one of them.")
  class_names, files, labels, not_read = _scan(eval_root, follow)
  train_classes = [display(f) for f in _Scanner(root, follow).class_folders()]
  if class_names != train_classes:
    missing = sorted(set(train_classes) - set(class_names))
    extra = sorted(set(class_names) - set(train_classes))
    raise ValueError(
        f"The eval folder {display(eval_root)!r} and the train folder {display(root)!r} need "
        f"the same class folders (labels follow their sorted names); the eval folder lacks "
        f"{missing} and has {extra} in addition.")
  return ImageFolderSource(eval_root, class_names, files, labels, name=display(eval_root),
                           not_read=not_read)
