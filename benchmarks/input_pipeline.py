"""Images/s of the train input pipeline alone (no model): read, decode, augment, batch.

    python benchmarks/input_pipeline.py                    # every case, workers 0 1 2
    python benchmarks/input_pipeline.py --cases cifar --workers 0 2 4 8 --seconds 20

Cases:
  cifar         CIFAR-10 JPEGs (../shared/data/cifar10_jpeg/train.npz: 50,000 images of
                32x32; where that is missing, the 10,000 of the bundled sample),
                pad-crop-flip at 32px, batch 256.
  imagenet      random-resized-crop + flip to 224px from 500x375 JPEGs (quality 90, about
                87 KB each, near ImageNet's average), read from ArrayRecord files written by
                jaxcls.data.convert, batch 128. The images are mosaics of CIFAR-10 pictures,
                made once by this script: detailed like photos, so JPEG decoding costs what
                it costs on real ones.
  imagenet_256  the same images converted with --resize 256 (shorter side 256), as the README
                suggests for ImageNet.
  synthetic     decoded random images, no I/O, no decode: the pipeline's own overhead.
Also prints the time to decode one image, single-threaded, with PIL and with
jaxcls.data.images.decode_image (OpenCV for JPEGs).
"""

import argparse
import importlib.resources
import io
import os
import pathlib
import tempfile
import time

import numpy as np
from PIL import Image

from jaxcls.config import base_config
from jaxcls.data import convert
from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR = REPO.parent / "shared" / "data" / "cifar10_jpeg"
NUM_LARGE = 1000


def cifar_file(split: str) -> pathlib.Path:
  """The full CIFAR-10 JPEGs of this project's machines, else the sample inside the package."""
  if (CIFAR / f"{split}.npz").exists():
    return CIFAR / f"{split}.npz"
  bundled = importlib.resources.files("jaxcls.data") / "bundled"
  return pathlib.Path(str(bundled / f"cifar10_sample_{split}.npz"))


def make_photos(folder: pathlib.Path, count: int) -> None:
  """`count` 500x375 JPEGs in folder/<class>/: 16x12 mosaics of CIFAR-10 test images."""
  with np.load(cifar_file("test")) as data:
    jpeg, offsets = data["jpeg"], data["offsets"]
  rng = np.random.default_rng(0)
  for i in range(count):
    picks = rng.integers(0, len(offsets) - 1, 16 * 12)
    tiles = [images.decode_image(jpeg[offsets[j]:offsets[j + 1]]) for j in picks]
    rows = [np.concatenate(tiles[r * 16:(r + 1) * 16], axis=1) for r in range(12)]
    mosaic = Image.fromarray(np.concatenate(rows, axis=0)).resize((500, 375), Image.BILINEAR)
    path = folder / f"class_{i % 10}" / f"{i:05d}.jpg"
    path.parent.mkdir(parents=True, exist_ok=True)
    mosaic.save(path, quality=90)


def case_config(case: str, tmp: pathlib.Path):
  """-> (data config, split, batch size)."""
  config = base_config().data
  if case == "cifar":
    if (CIFAR / "train.npz").exists():
      config.update(dict(source="npz", path=str(CIFAR)))
    else:
      config.update(dict(source="bundled"))
    return config, "train", 256
  if case == "synthetic":
    config.update(dict(source="synthetic", synthetic_size=50_000))
    return config, "train", 256
  if not (tmp / "photos").exists():
    make_photos(tmp / "photos", NUM_LARGE)
  resize = 256 if case == "imagenet_256" else 0
  dst = tmp / f"ar_{resize}"
  if not dst.exists():
    convert.convert(str(tmp / "photos"), str(dst), "train", resize=resize, progress=False)
  config.update(dict(source="array_record", path=str(dst), image_size=224, eval_resize=256,
                     train_augment="random_resized_crop_flip"))
  return config, "train", 128


def measure(config, split: str, batch: int, workers: int, seconds: float) -> float:
  config.num_workers = workers
  source = sources.create_source(config, split)
  ds = pipeline.create_train_dataset(config, source, batch, seed=0, process_index=0,
                                     process_count=1)
  it = iter(ds)
  for _ in range(3):  # workers start, buffers fill
    next(it)
  start, count = time.perf_counter(), 0
  while time.perf_counter() - start < seconds:
    next(it)
    count += batch
  rate = count / (time.perf_counter() - start)
  if hasattr(it, "close"):
    it.close()
  return rate


def decode_times(tmp: pathlib.Path) -> None:
  with np.load(cifar_file("test")) as data:
    small = [data["jpeg"][data["offsets"][i]:data["offsets"][i + 1]].tobytes()
             for i in range(500)]
  large = [p.read_bytes() for p in sorted((tmp / "photos").rglob("*.jpg"))[:100]]
  for label, blobs in (("32x32", small), ("500x375", large)):
    for name, fn in (("PIL", lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))),
                     ("decode_image", images.decode_image)):
      start = time.perf_counter()
      for b in blobs:
        fn(b)
      per_image = (time.perf_counter() - start) / len(blobs)
      print(f"decode {label} JPEG with {name}: {per_image * 1e6:.0f} us")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--cases", nargs="+",
                      default=["cifar", "imagenet", "imagenet_256", "synthetic"])
  parser.add_argument("--workers", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
  parser.add_argument("--tmp", default="", help="where to keep the generated images")
  args = parser.parse_args()
  tmp = pathlib.Path(args.tmp or tempfile.mkdtemp(prefix="jaxcls_bench_"))
  print(f"{os.cpu_count()} cores; CIFAR-10 from {cifar_file('train')}; generated data in {tmp}")
  for case in args.cases:
    config, split, batch = case_config(case, tmp)
    for workers in args.workers:
      rate = measure(config, split, batch, workers, args.seconds)
      print(f"{case:13s} workers={workers:2d} batch={batch}: {rate:8,.0f} images/s", flush=True)
  if (tmp / "photos").exists():
    decode_times(tmp)


if __name__ == "__main__":  # grain's worker processes start with spawn
  main()
