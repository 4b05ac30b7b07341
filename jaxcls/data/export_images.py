"""Writes a split of a data source out as an image folder: `<dst>/<class_name>/<index>.<ext>`.

    python -m jaxcls.data.export_images --split train --dst data/cifar_sample/train
    python -m jaxcls.data.export_images --split test --dst data/cifar_sample/test --per_class 5

The layout is the one `source=image_folder` and `python -m jaxcls.data.convert` read, so
the bundled CIFAR-10 sample (the default `--source`) becomes a small dataset to try the
image-folder and ArrayRecord paths on, and a few files to run `jaxcls.predict` on.
Encoded images (the bundled and .npz JPEGs, ArrayRecord files) keep their original bytes;
decoded ones (synthetic) are written as PNG.
"""

import argparse
import io
import os
import sys

import numpy as np
from PIL import Image

from jaxcls import config as config_lib
from jaxcls.data import sources

_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG", ".png"), (b"GIF8", ".gif"), (b"BM", ".bmp"),
          (b"RIFF", ".webp"))


def _encoded(image) -> tuple[bytes, str]:
  """-> (file bytes, extension) for an element's image, encoded or decoded."""
  if isinstance(image, np.ndarray) and image.ndim == 1:
    data = image.tobytes()
  elif isinstance(image, (bytes, memoryview)):
    data = bytes(image)
  else:
    out = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(out, format="PNG")
    return out.getvalue(), ".png"
  for magic, extension in _MAGIC:
    if data.startswith(magic):
      return data, extension
  raise ValueError(f"Unrecognized image encoding (first bytes {data[:4]!r}).")


def export_images(source, dst: str, per_class: int = 0) -> dict[str, int]:
  """Writes source's examples (the first `per_class` of each class, 0: all) under dst.

  Returns the number of files written per class name. Refuses a non-empty dst.
  """
  if os.path.isdir(dst) and os.listdir(dst):
    raise ValueError(f"--dst {dst!r} is not empty; pick a new folder.")
  counts = {name: 0 for name in source.class_names}
  for name in source.class_names:
    os.makedirs(os.path.join(dst, name), exist_ok=True)
  for index in range(len(source)):
    element = source[index]
    name = source.class_names[element["label"]]
    if per_class and counts[name] >= per_class:
      continue
    data, extension = _encoded(element["image"])
    with open(os.path.join(dst, name, f"{index:06d}{extension}"), "wb") as f:
      f.write(data)
    counts[name] += 1
    if per_class and all(c >= per_class for c in counts.values()):
      break
  return counts


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m jaxcls.data.export_images",
      description="Write a split of a data source as an image folder (<dst>/<class>/<file>).")
  parser.add_argument("--source", default="bundled",
                      help="a config.data.source name (default: the bundled CIFAR-10 sample)")
  parser.add_argument("--path", default="", help="config.data.path for that source")
  parser.add_argument("--split", default="train")
  parser.add_argument("--dst", required=True, help="the image folder to create")
  parser.add_argument("--per_class", type=int, default=0, help="images per class (0: all)")
  args = parser.parse_args(argv)
  data_config = config_lib.base_config().data
  data_config.source, data_config.path = args.source, args.path
  try:
    if args.source not in sources.SOURCES:
      raise ValueError(f"--source {args.source!r} is not known; use one of "
                       f"{sorted(sources.SOURCES)}.")
    source = sources.SOURCES[args.source](data_config, args.split)
    counts = export_images(source, args.dst, args.per_class)
  except (OSError, ValueError) as e:
    sys.exit(f"error: {e}")
  print(f"Wrote {sum(counts.values())} images of {len(counts)} classes to {args.dst}.")


if __name__ == "__main__":
  main()
