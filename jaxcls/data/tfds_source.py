"""TFDS datasets prepared once as ArrayRecord files, read with random access and no TensorFlow.

`tfds.data_source` reads them; images come back still encoded (SkipDecoding), so they decode
in the pipeline's workers like every other source, with the same errors for bad files.
Prepare a dataset once, on a machine with TensorFlow:
`tfds build NAME --file_format=array_record --data_dir=DIR` (see docs/guide.md).
"""

import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from jaxcls import storage


def _load(name: str, split: str, data_dir: str | None, image_key: str):
  """-> (tfds data source, its DatasetInfo); errors say how to prepare the dataset."""
  if data_dir and not os.path.isdir(data_dir):
    raise ValueError(f"config.data.path={data_dir!r} (the TFDS data_dir) is not a directory.")
  where = data_dir or "the default TFDS data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # an unknown name: tfds raises several types
    first_line = str(e).strip().split("\n")[0]
    raise ValueError(f"TFDS dataset {name!r} (config.data.tfds_name) was not found in "
                     f"{where}: {first_line}") from None
  if not builder.is_prepared():
    raise ValueError(
        f"TFDS dataset {name!r} is not prepared in {where}. Prepare it once with `tfds build "
        f"{name} --file_format=array_record --data_dir=DIR` and set config.data.path=DIR.")
  info = builder.info
  if split.split("[")[0] not in info.splits:
    raise ValueError(
        f"Split {split!r} (config.data.train_split / config.data.eval_split) does not exist in "
        f"TFDS dataset {name!r}; available splits: {sorted(info.splits)}.")
  features = info.features
  decoders = None
  if image_key in features and isinstance(features[image_key], tfds.features.Image):
    decoders = {image_key: tfds.decode.SkipDecoding()}
  try:
    return builder.as_data_source(split=split, decoders=decoders), info
  except NotImplementedError as e:  # prepared as TFRecord: no random access
    raise ValueError(f"TFDS dataset {name!r} in {where} has no ArrayRecord files; prepare it "
                     f"with --file_format=array_record. ({e})") from None


class TfdsSource:
  """`tfds_name`'s `split`, as {"image": encoded bytes, "label": int}.

  Pickling (grain worker processes) sends only the arguments; the worker reopens the files.
  """

  def __init__(self, tfds_name: str, split: str, data_dir: str, image_key: str,
               label_key: str):
    self._args = (tfds_name, split, data_dir, image_key, label_key)
    self.name = f"tfds:{tfds_name}/{split}"
    self._open()
    features = self._info.features
    for key, config_key in ((image_key, "tfds_image_key"), (label_key, "tfds_label_key")):
      if key not in features:
        raise ValueError(f"TFDS dataset {tfds_name!r} has no feature {key!r} "
                         f"(config.data.{config_key}); its features: {sorted(features)}.")
    label = features[label_key]
    if not isinstance(label, tfds.features.ClassLabel):
      raise ValueError(f"Feature {label_key!r} of TFDS dataset {tfds_name!r} is a "
                       f"{type(label).__name__}, not a ClassLabel (config.data.tfds_label_key).")
    self.class_names = list(label.names)
    self.num_classes = label.num_classes

  def _open(self) -> None:
    name, split, data_dir, image_key, _ = self._args
    self._source, self._info = _load(name, split, data_dir or None, image_key)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_source", "_info")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    _, _, _, image_key, label_key = self._args
    example = self._source[index]
    image = example[image_key]
    if isinstance(image, bytes):
      image = np.frombuffer(image, np.uint8)
    return {"image": image, "label": int(example[label_key]), "id": f"{self.name}[{index}]"}

  def __repr__(self) -> str:
    return f"TfdsSource({self.name}, n={len(self)})"


def create(data_config, split: str) -> TfdsSource:
  if not data_config.tfds_name:
    raise ValueError("config.data.source='tfds' needs config.data.tfds_name, e.g. 'cifar10' or "
                     "'imagenet2012'.")
  storage.require_local(data_config.path, "config.data.path (the TFDS data_dir)",
                        "the TFDS ArrayRecord reader")
  return TfdsSource(data_config.tfds_name, split, data_config.path, data_config.tfds_image_key,
                    data_config.tfds_label_key)
