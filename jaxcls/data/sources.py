"""Random-access data sources, chosen by name with `config.data.source`.

Every source has `__len__` and `__getitem__(i) -> {"image": ..., "label": int, "id": str}`
(so grain's `MapDataset.source` takes it) plus `class_names`, `num_classes` and `name`.
"image" is either encoded bytes (a 1-D uint8 array, decoded later in the pipeline) or an
already decoded HxWx3 uint8 array, which the transforms pass through without decoding. "id"
(optional) names the file or record in error messages; decoding drops it.

A new source is a factory `(data_config, split) -> source` added to `SOURCES`. Sources that
read files live in their own modules: image_folder.py, tfds_source.py, records.py.
"""

import importlib.resources
import zlib
from typing import Any, Callable, Protocol

import numpy as np

from jaxcls import storage
from jaxcls.data import corrupt
from jaxcls.data import image_folder
from jaxcls.data import images
from jaxcls.data import records
from jaxcls.data import tfds_source
from jaxcls.errors import check_choice, check_in_range

_BUNDLED_PREFIX = "cifar10_sample_"
_BUNDLE_KEYS = ("jpeg", "offsets", "labels", "class_names")


class Source(Protocol):
  """What the pipeline needs from a source."""

  name: str
  class_names: list[str]
  num_classes: int

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> dict[str, Any]:
    ...


class EncodedBundleSource:
  """Encoded images stored back to back in one .npz file.

  Keys: `jpeg` (uint8, every file's bytes concatenated), `offsets` (int64, n + 1; image i is
  jpeg[offsets[i]:offsets[i + 1]]), `labels` (int32, n), `class_names` (str, num_classes).
  The arrays are read once into memory; pickling (grain worker processes) sends only the
  file's location, and the worker reads the file itself.
  """

  def __init__(self, file: Any, name: str):
    """`file` is an epath.Path (local or in a bucket) or an importlib.resources Traversable."""
    self._file = file
    self.name = name
    self._load()

  def _load(self) -> None:
    with self._file.open("rb") as f, np.load(f) as data:
      missing = [key for key in _BUNDLE_KEYS if key not in data.files]
      if missing:
        raise ValueError(f"{self.name}: missing arrays {missing}; found {data.files}.")
      self._jpeg = data["jpeg"]
      self._offsets = data["offsets"].astype(np.int64)
      self._labels = data["labels"].astype(np.int32)
      self.class_names = [str(c) for c in data["class_names"]]
    self.num_classes = len(self.class_names)
    n = len(self._labels)
    if len(self._offsets) != n + 1 or self._offsets[-1] > len(self._jpeg):
      raise ValueError(f"{self.name}: `offsets` must have len(labels) + 1 = {n + 1} entries "
                       f"ending within `jpeg`; got {len(self._offsets)} entries.")
    bad = np.flatnonzero((self._labels < 0) | (self._labels >= self.num_classes))
    if bad.size:
      raise ValueError(
          f"{self.name}: {bad.size} labels outside [0, {self.num_classes}) (the file lists "
          f"{self.num_classes} class names), e.g. label {self._labels[bad[0]]} at index "
          f"{bad[0]}.")

  def __getstate__(self):
    return {"_file": self._file, "name": self.name}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._load()

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    start, end = self._offsets[index], self._offsets[index + 1]
    return {"image": self._jpeg[start:end], "label": int(self._labels[index]),
            "id": f"{self.name}[{index}]"}

  def __repr__(self) -> str:
    return f"EncodedBundleSource({self.name}, n={len(self)})"


class SyntheticSource:
  """Seeded random images, already decoded; for throughput runs and tests.

  Labels cycle through the classes (balanced). Each class has its own mean colour under the
  noise, so a model can learn something and a smoke run shows a falling loss. Images are made
  on access from (seed, index): nothing is held in memory, any image size is cheap to set up.
  """

  def __init__(self, size: int, image_size: int, num_classes: int, seed: int, name: str):
    if size <= 0:
      raise ValueError(f"{name}: config.data.synthetic_size={size} must be positive.")
    self._size = size
    self._image_size = image_size
    self._seed = seed
    self.name = name
    self.num_classes = num_classes
    self.class_names = [f"class_{i}" for i in range(num_classes)]
    self._colors = np.random.default_rng(seed).integers(
        0, 128, size=(num_classes, 3), dtype=np.uint8)

  def __len__(self) -> int:
    return self._size

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    label = index % self.num_classes
    rng = np.random.default_rng((self._seed, index))
    noise = rng.integers(0, 128, size=(self._image_size, self._image_size, 3), dtype=np.uint8)
    return {"image": noise + self._colors[label], "label": label}

  def __repr__(self) -> str:
    return f"SyntheticSource({self.name}, n={len(self)})"


def _unknown_split(split: str, source_name: str, available) -> ValueError:
  return ValueError(
      f"Split {split!r} (config.data.train_split / config.data.eval_split) does not exist in "
      f"{source_name}; available splits: {sorted(available)}.")


def _bundled(data_config, split: str) -> EncodedBundleSource:
  """The CIFAR-10 sample shipped inside the package (see jaxcls/data/bundled/README.md)."""
  del data_config
  folder = importlib.resources.files("jaxcls.data") / "bundled"
  splits = {p.name[len(_BUNDLED_PREFIX):-len(".npz")]: p for p in folder.iterdir()
            if p.name.startswith(_BUNDLED_PREFIX) and p.name.endswith(".npz")}
  if split not in splits:
    raise _unknown_split(split, "the bundled CIFAR-10 sample", splits)
  return EncodedBundleSource(splits[split], name=f"bundled:{splits[split].name}")


def _npz(data_config, split: str) -> EncodedBundleSource:
  """`{config.data.path}/{split}.npz` in the bundle format, e.g. the full CIFAR-10 JPEGs."""
  if not data_config.path:
    raise ValueError("config.data.source='npz' needs config.data.path: a directory holding "
                     "<split>.npz files.")
  storage.check_reachable(data_config.path, "config.data.path")
  folder = storage.as_path(data_config.path)  # local or in a bucket: read through epath
  if not folder.is_dir():
    raise ValueError(f"config.data.path={data_config.path!r} is not a directory.")
  splits = {p.stem: p for p in folder.glob("*.npz")}
  if split not in splits:
    raise _unknown_split(split, f"config.data.path={data_config.path!r}", splits)
  return EncodedBundleSource(splits[split], name=str(splits[split]))


def _synthetic(data_config, split: str) -> SyntheticSource:
  """Any split name works; each gets its own images."""
  return SyntheticSource(
      size=data_config.get("synthetic_size", 10_000),
      image_size=data_config.image_size,
      num_classes=data_config.num_classes,
      seed=zlib.crc32(split.encode()),
      name=f"synthetic:{split}")


SOURCES: dict[str, Callable[[Any, str], Source]] = {
    "bundled": _bundled,
    "npz": _npz,
    "synthetic": _synthetic,
    "image_folder": image_folder.create,
    "tfds": tfds_source.create,
    "array_record": records.create,
}


def check_config(data_config) -> None:
  """The source keys of config.data that can be checked without reading any data."""
  check_choice("data.source", data_config.source, sorted(SOURCES))
  check_in_range("data.eval_fraction", data_config.eval_fraction, 0.0, 1.0,
                 high_inclusive=False)
  check_in_range("data.max_corrupt_fraction", data_config.max_corrupt_fraction, 0.0, 1.0)


def create_source(data_config, split: str) -> Source:
  """Returns the source `config.data.source` names, for `split`, checked against the config.

  With config.data.skip_corrupt, every example is decoded once first and the ones that fail
  are left out (see corrupt.py); in a multi-process run every process must call this.
  """
  check_config(data_config)
  source = SOURCES[data_config.source](data_config, split)
  if source.num_classes != data_config.num_classes:
    raise ValueError(
        f"config.data.num_classes={data_config.num_classes}, but {source.name} has "
        f"{source.num_classes} classes. Set --config.data.num_classes={source.num_classes}.")
  if data_config.skip_corrupt:
    source = corrupt.drop_corrupt(source, data_config.max_corrupt_fraction,
                                  max_pixels=data_config.get("max_image_pixels",
                                                             images.MAX_PIXELS))
  return source
