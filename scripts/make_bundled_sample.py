r"""Writes the class-balanced CIFAR-10 sample that ships inside the package.

Reads {train,test}.npz in the JPEG-bundle format (keys `jpeg`, `offsets`,
`labels`, `class_names`, `filenames`) and writes a seeded random sample in the
same format to jaxcls/data/bundled/cifar10_sample_{train,test}.npz.

Run from the repository root:
    python scripts/make_bundled_sample.py \
        --source_dir=/work/shared/data/cifar10_jpeg
"""

import os

from absl import app
from absl import flags
import numpy as np

_SOURCE_DIR = flags.DEFINE_string(
    "source_dir", "/work/shared/data/cifar10_jpeg",
    "Directory holding train.npz and test.npz.")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir",
    os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "jaxcls",
                                  "data", "bundled")),
    "Where the sample files go.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the per-class sampling.")
_TRAIN_PER_CLASS = flags.DEFINE_integer("train_per_class", 1000, "")
_TEST_PER_CLASS = flags.DEFINE_integer("test_per_class", 200, "")
_MAX_TOTAL_MB = flags.DEFINE_float(
    "max_total_mb", 12.0, "Fail if the written files exceed this (1e6 bytes).")


def sample_indices(labels: np.ndarray, per_class: int,
                   rng: np.random.Generator) -> np.ndarray:
  """Returns `per_class` random indices of each class, in ascending order."""
  chosen = []
  for c in np.unique(labels):
    members = np.flatnonzero(labels == c)
    if len(members) < per_class:
      raise ValueError(f"class {c} has {len(members)} < {per_class} examples")
    chosen.append(rng.choice(members, size=per_class, replace=False))
  return np.sort(np.concatenate(chosen))


def subset(data, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Returns the arrays of the JPEG bundle restricted to `indices`."""
  offsets = data["offsets"]
  starts, ends = offsets[indices], offsets[indices + 1]
  sizes = ends - starts
  new_offsets = np.zeros(len(indices) + 1, np.int64)
  np.cumsum(sizes, out=new_offsets[1:])
  jpeg = data["jpeg"]
  new_jpeg = np.concatenate([jpeg[s:e] for s, e in zip(starts, ends)])
  return {
      "jpeg": new_jpeg.astype(np.uint8),
      "offsets": new_offsets,
      "labels": data["labels"][indices].astype(np.int32),
      "class_names": data["class_names"],
      # ASCII bytes instead of UTF-32 keep the pair under 12 MB; read them
      # back with `.astype(str)`.
      "filenames": data["filenames"][indices].astype(np.bytes_),
  }


def main(argv):
  del argv
  rng = np.random.default_rng(_SEED.value)
  os.makedirs(_OUTPUT_DIR.value, exist_ok=True)
  total = 0
  for split, per_class in (("train", _TRAIN_PER_CLASS.value),
                           ("test", _TEST_PER_CLASS.value)):
    with np.load(os.path.join(_SOURCE_DIR.value, f"{split}.npz")) as data:
      indices = sample_indices(data["labels"], per_class, rng)
      arrays = subset(data, indices)
    path = os.path.join(_OUTPUT_DIR.value, f"cifar10_sample_{split}.npz")
    np.savez(path, **arrays)  # JPEG bytes do not compress further.
    size = os.path.getsize(path)
    total += size
    counts = np.bincount(arrays["labels"])
    print(f"{path}: {len(indices)} images, per class {counts.tolist()}, "
          f"{size / 1e6:.2f} MB")
  print(f"total {total / 1e6:.2f} MB")
  if total > _MAX_TOTAL_MB.value * 1e6:
    raise SystemExit(f"sample is {total / 1e6:.2f} MB > "
                     f"{_MAX_TOTAL_MB.value} MB")


if __name__ == "__main__":
  app.run(main)
