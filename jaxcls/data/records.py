"""The ArrayRecord dataset format that `python -m jaxcls.data.convert` writes, and its source.

A directory holds any number of splits. Split `s` is
  - `s-00000-of-0000N.array_record` ... : ArrayRecord shards (group_size 1, for random access),
    one record per example: int32 label and uint32 name length (little-endian), then the
    name (UTF-8, the original file or record), then the encoded image bytes;
  - `s.json`: format, num_examples, class_names, class_counts, shard file names, and what
    the converter did (source, resize, skipped files).
"""

import json
import os
import struct
from typing import Any

import grain
import numpy as np

from jaxcls import storage

FORMAT = "jaxcls-array-record-1"
WRITER_OPTIONS = "group_size:1"  # each record its own chunk: random access reads one record
_HEADER = struct.Struct("<iI")


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.array_record"


def metadata_path(directory: str, split: str) -> str:
  return os.path.join(directory, f"{split}.json")


def encode_record(label: int, name: str, image: bytes) -> bytes:
  encoded_name = name.encode()
  return _HEADER.pack(label, len(encoded_name)) + encoded_name + bytes(image)


def decode_record(record: bytes) -> tuple[int, str, memoryview]:
  """-> (label, name, encoded image) without copying the image bytes."""
  label, name_length = _HEADER.unpack_from(record)
  start = _HEADER.size + name_length
  return label, record[_HEADER.size:start].decode(), memoryview(record)[start:]


def read_metadata(directory: str, split: str) -> dict[str, Any]:
  if not os.path.isdir(directory):
    raise ValueError(f"config.data.path={directory!r} is not a directory.")
  path = metadata_path(directory, split)
  if not os.path.exists(path):
    available = sorted(f[:-len(".json")] for f in os.listdir(directory) if f.endswith(".json"))
    raise ValueError(
        f"Split {split!r} (config.data.train_split / config.data.eval_split) has no {path}; "
        f"splits written there by jaxcls.data.convert: {available}.")
  with open(path) as f:
    meta = json.load(f)
  if meta.get("format") != FORMAT:
    raise ValueError(f"{path} is not a {FORMAT} file (format: {meta.get('format')!r}); write "
                     "the dataset with `python -m jaxcls.data.convert`.")
  counts, names = meta["class_counts"], meta["class_names"]
  if len(counts) != len(names) or sum(counts) != meta["num_examples"]:
    raise ValueError(f"{path}: class_counts {counts} do not fit {len(names)} class names and "
                     f"{meta['num_examples']} examples.")
  return meta


class ArrayRecordSource:
  """One split of a converted dataset: {"image": encoded bytes, "label": int, "id": str}."""

  def __init__(self, directory: str, split: str):
    meta = read_metadata(directory, split)
    self.name = f"{directory}/{split}"
    self.class_names = list(meta["class_names"])
    self.num_classes = len(self.class_names)
    paths = [os.path.join(directory, shard) for shard in meta["shards"]]
    for path in paths:
      if not os.path.exists(path):
        raise ValueError(f"Shard {path} listed in {metadata_path(directory, split)} is missing.")
    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) != meta["num_examples"]:
      raise ValueError(f"{self.name}: the shards hold {len(self._records)} records, "
                       f"{metadata_path(directory, split)} says {meta['num_examples']}.")

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    label, name, image = decode_record(self._records[index])
    return {"image": np.frombuffer(image, np.uint8), "label": label,
            "id": f"{self.name}[{index}] ({name})"}

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.name}, n={len(self)})"


def create(data_config, split: str) -> ArrayRecordSource:
  if not data_config.path:
    raise ValueError("config.data.source='array_record' needs config.data.path: the directory "
                     "that `python -m jaxcls.data.convert --dst` wrote.")
  storage.require_local(data_config.path, "config.data.path", "the ArrayRecord reader")
  return ArrayRecordSource(data_config.path, split)
