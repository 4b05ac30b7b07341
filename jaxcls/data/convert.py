"""Converts an image folder or a .npz bundle into sharded ArrayRecord files (records.py).

    python -m jaxcls.data.convert --src /data/imagenet/train --dst /data/in1k
    python -m jaxcls.data.convert --src /data/imagenet/val --dst /data/in1k
    python -m jaxcls.data.convert --src cifar10_jpeg/test.npz --dst /data/c10

then train with `--config.data.source=array_record --config.data.path=/data/in1k`. One call
writes one split, named after --src (`train`, `val`, `test`) unless --split says otherwise.
Every image is decoded once to check it (in --workers processes); a bad one is an error
naming it, or with --skip_corrupt is left out and listed in `<split>.json`; so is an image
of more than --max_image_pixels pixels, refused from its header. --resize N re-encodes (JPEG
of --quality, default 90) the images whose shorter side is longer than N, shrunk to N
(bicubic); other images keep their original bytes. The default N = 320 suits ImageNet at
224 px (eval_resize 256, random-resized crops up to the whole image): a 500x375 photo becomes
427x320 and decodes faster (benchmarks/README.md: with 256, the 224 px pipeline ran 1.4-2x
faster). Its cost in accuracy (a second JPEG generation, less detail for the largest crops)
has not been measured here; --resize 0 keeps every original.
"""

import argparse
import concurrent.futures
import io
import math
import multiprocessing
import os
import pathlib
import re
import sys

from array_record.python.array_record_module import ArrayRecordWriter
import numpy as np
from PIL import Image
import tqdm

from jaxcls import storage
from jaxcls import workdir as workdir_lib  # its atomic JSON write
from jaxcls.data import cores
from jaxcls.data import image_folder
from jaxcls.data import images
from jaxcls.data import records
from jaxcls.data import sources
from jaxcls.data import transforms

_EXAMPLES_PER_SHARD = 10_000  # default shard size; any count reads the same
DEFAULT_RESIZE = 320  # shorter side, for ImageNet at 224 px; see the module docstring
DEFAULT_QUALITY = 90
_worker_state = {}  # per process: the open source and the options (see _start_worker)


def open_source(src: str):
  """An image folder (root/<class>/<image>) or a .npz bundle (the bundled format); a bundle
  may be in a bucket (gs://...), an image folder is read locally."""
  path = storage.as_path(src)
  if path.suffix == ".npz" and path.is_file():
    return sources.EncodedBundleSource(path, name=str(path))
  storage.require_local(src, "--src", "the image-folder reader")
  if path.is_dir():
    return image_folder.ImageFolderSource(src, *image_folder.scan(src), name=src)
  raise ValueError(f"--src {src!r} is neither an image folder nor a .npz file.")


def _start_worker(src: str, resize: int, quality: int, max_pixels: int) -> None:
  _worker_state.update(source=open_source(src), resize=resize, quality=quality,
                       max_pixels=max_pixels)


def _prepare(index: int) -> tuple[int, str, bytes | None, str | None]:
  """-> (label, name, bytes to store or None, the reason it does not decode or None)."""
  source = _worker_state["source"]
  element = source[index]
  name = element["id"]
  if isinstance(source, image_folder.ImageFolderSource):
    name = os.path.relpath(name, source.root)
  data = bytes(element["image"])
  try:
    image = images.decode_image(data, name, _worker_state["max_pixels"])
  except images.CorruptImageError as e:
    return element["label"], name, None, str(e)
  resize = _worker_state["resize"]
  if resize and min(image.shape[:2]) > resize:
    image = transforms.resize_shorter_side(image, resize, Image.Resampling.BICUBIC)
    data = _encode_jpeg(image, _worker_state["quality"])
  return element["label"], name, data, None


def _encode_jpeg(image: np.ndarray, quality: int) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format="JPEG", quality=quality)
  return out.getvalue()


def default_split(src: str) -> str:
  return pathlib.Path(src.rstrip("/")).stem


def convert(src: str, dst: str, split: str | None = None, *, resize: int = DEFAULT_RESIZE,
            quality: int = DEFAULT_QUALITY, max_pixels: int = images.MAX_PIXELS,
            num_shards: int = 0, workers: int = -1,
            skip_corrupt: bool = False, max_corrupt_fraction: float = 0.01,
            overwrite: bool = False, progress: bool = True) -> dict:
  """Writes `src` as split `split` of the ArrayRecord dataset in `dst`; returns its metadata."""
  split = split or default_split(src)
  if not re.fullmatch(r"[\w.-]+", split):
    raise ValueError(f"Split name {split!r} may hold only letters, digits, '_', '.' and '-'.")
  storage.require_local(dst, "--dst", "the ArrayRecord writer")
  source = open_source(src)
  n = len(source)
  if n == 0:
    raise ValueError(f"--src {src!r} holds no images.")
  os.makedirs(dst, exist_ok=True)
  meta_path = records.metadata_path(dst, split)
  if os.path.exists(meta_path) and not overwrite:
    raise ValueError(f"{meta_path} exists: split {split!r} was converted before. Pass "
                     "--overwrite to replace it, or --split to name another split.")
  for old in pathlib.Path(dst).glob(f"{split}-*-of-*.array_record"):
    old.unlink()
  if os.path.exists(meta_path):
    os.unlink(meta_path)

  num_shards = min(n, num_shards or math.ceil(n / _EXAMPLES_PER_SHARD))
  shards = [records.shard_name(split, k, num_shards) for k in range(num_shards)]
  shard_starts = {k * n // num_shards: k for k in range(num_shards)}  # first index -> shard
  workers = cores.available_cores() if workers < 0 else workers
  counts = np.zeros(source.num_classes, np.int64)
  skipped = []
  writer = None
  try:
    with _Results(src, n, resize, quality, max_pixels, workers) as results:
      for index, (label, name, data, reason) in enumerate(
          tqdm.tqdm(results, total=n, desc=f"{split} -> {dst}", unit="img", disable=not progress,
                    file=sys.stderr)):
        if index in shard_starts:
          if writer:
            writer.close()
          writer = ArrayRecordWriter(os.path.join(dst, shards[shard_starts[index]]),
                                     records.WRITER_OPTIONS)
        if reason is not None:
          if not skip_corrupt:
            raise images.CorruptImageError(
                f"{reason}. Fix or remove the file, or pass --skip_corrupt to leave such "
                "files out.")
          skipped.append(reason)
          continue
        writer.write(records.encode_record(label, name, data))
        counts[label] += 1
    writer.close()
    writer = None
    if len(skipped) > max_corrupt_fraction * n:
      raise ValueError(f"{len(skipped)} of {n} images ({len(skipped) / n:.2%}) do not decode, "
                       f"more than --max_corrupt_fraction={max_corrupt_fraction}; e.g. "
                       f"{skipped[:3]}.")
  except BaseException:
    if writer:
      writer.close()
    for shard in shards:
      pathlib.Path(dst, shard).unlink(missing_ok=True)
    raise
  meta = {
      "format": records.FORMAT,
      "split": split,
      "num_examples": int(counts.sum()),
      "class_names": list(source.class_names),
      "class_counts": counts.tolist(),
      "shards": shards,
      "source": str(storage.absolute(src)),
      "resize": resize or None,
      "quality": quality if resize else None,
      "skipped": skipped,
  }
  workdir_lib.write_json(meta_path, meta)  # last: its presence marks a complete split
  return meta


class _Results:
  """Context manager: the _prepare results in index order, from a process pool if workers > 0."""

  def __init__(self, src, n, resize, quality, max_pixels, workers):
    self._args = (src, resize, quality, max_pixels)
    self._n, self._workers, self._pool = n, workers, None

  def __enter__(self):
    if self._workers == 0:
      _start_worker(*self._args)
      return map(_prepare, range(self._n))
    self._pool = concurrent.futures.ProcessPoolExecutor(
        self._workers, mp_context=multiprocessing.get_context("spawn"),
        initializer=_start_worker, initargs=self._args)
    chunk = max(1, min(256, self._n // (4 * self._workers)))
    return self._pool.map(_prepare, range(self._n), chunksize=chunk)

  def __exit__(self, *exc):
    if self._pool:
      self._pool.shutdown(cancel_futures=True)
    _worker_state.clear()


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m jaxcls.data.convert",
      description="Write an image folder or .npz bundle as sharded ArrayRecord files.")
  parser.add_argument("--src", required=True, help="image folder (root/<class>/<image>) or .npz")
  parser.add_argument("--dst", required=True, help="output directory (one per dataset)")
  parser.add_argument("--split", help="split name (default: the name of --src)")
  parser.add_argument("--resize", type=int, default=DEFAULT_RESIZE,
                      help="shrink images whose shorter side is longer than this to it "
                      f"(default {DEFAULT_RESIZE}, for ImageNet; 0 keeps every original)")
  parser.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                      help="JPEG quality of resized images")
  parser.add_argument("--max_image_pixels", type=int, default=images.MAX_PIXELS,
                      help="refuse (or with --skip_corrupt skip) larger images, from their "
                      "header (default PIL's limit; 0: none)")
  parser.add_argument("--num_shards", type=int, default=0,
                      help=f"default: one per {_EXAMPLES_PER_SHARD} images")
  parser.add_argument("--workers", type=int, default=-1, help="processes (default: the cores)")
  parser.add_argument("--skip_corrupt", action="store_true",
                      help="leave out images that do not decode (listed in <split>.json)")
  parser.add_argument("--max_corrupt_fraction", type=float, default=0.01)
  parser.add_argument("--overwrite", action="store_true", help="replace an existing split")
  args = parser.parse_args(argv)
  try:
    meta = convert(args.src, args.dst, args.split, resize=args.resize, quality=args.quality,
                   max_pixels=args.max_image_pixels, num_shards=args.num_shards,
                   workers=args.workers, skip_corrupt=args.skip_corrupt,
                   max_corrupt_fraction=args.max_corrupt_fraction, overwrite=args.overwrite)
  except ValueError as e:
    sys.exit(f"error: {e}")
  print(f"Wrote {meta['num_examples']} images of {len(meta['class_names'])} classes in "
        f"{len(meta['shards'])} shards to {args.dst} (split {meta['split']!r}); skipped "
        f"{len(meta['skipped'])}.")


if __name__ == "__main__":
  main()
