"""What the input pipeline costs: train images/s fed by jaxcls's pipeline vs. by a device batch.

The same compiled jaxcls train step (built as train.run builds it) runs in alternating
phases: fed by `jaxcls.data.pipeline` from a real source (ArrayRecord files, an image folder,
...: read, decode, augment, batch, device prefetch, exactly train.run's pipeline), and fed a
batch that already sits on the device. The ratio pipeline / device is the fraction of
throughput the input pipeline leaves (target on the GPU machine: >= 0.90).

    # CIFAR-10 (the npz files of ../shared/data/cifar10_jpeg): ResNet-18 32px; the image
    # folder and the ArrayRecord files are written once under --work.
    python benchmarks/end_to_end.py --cifar ../shared/data/cifar10_jpeg            # CPU sizes
    python benchmarks/end_to_end.py --cifar ../shared/data/cifar10_jpeg --gpu      # b512
    # ImageNet-like: N generated photos-sized JPEGs in 1000 class folders, and ArrayRecord
    # files pre-resized to 256 by jaxcls.data.convert; ResNet-50 224px.
    python benchmarks/end_to_end.py --imagenet_like 10000 --gpu
    # No data at all: the bundled sample and host-made synthetic images; the default config.
    python benchmarks/end_to_end.py --sources bundled,synthetic

Run from the repository root with the package importable (`pip install .` or PYTHONPATH=.).
"""

import argparse
import concurrent.futures
import io
import json
import math
import multiprocessing
import os
import pathlib
import time

import jax
import numpy as np
from PIL import Image

import harness
from jaxcls.data import convert, pipeline, sources
from jaxcls import dispatch, sharding

# (config file, overrides) per dataset and machine size.
CONFIGS = {
    ("cifar", "cpu"): ("configs/cifar10_resnet18.py",
                       ["model.width=16", "batch_size=128", "data.num_workers=-1"]),
    ("cifar", "gpu"): ("configs/cifar10_resnet18.py", ["batch_size=512"]),
    ("imagenet_like", "cpu"): ("configs/imagenet_resnet50.py",
                               ["model.name='resnet_tiny'", "model.width=8", "batch_size=32",
                                "data.num_workers=-1"]),
    ("imagenet_like", "gpu"): ("configs/imagenet_resnet50.py", ["batch_size=256"]),
    ("none", "cpu"): ("configs/default.py", []),
    ("none", "gpu"): ("configs/default.py", ["batch_size=512"]),
}
DEFAULT_SOURCES = {"cifar": "array_record,image_folder", "imagenet_like": "array_record,image_folder",
                   "none": "bundled,synthetic"}


# Data preparation (cached under --work).


def write_image_folder(npz_file: pathlib.Path, dst: pathlib.Path, limit: int) -> pathlib.Path:
  """The npz bundle's JPEG bytes as files, root/<class>/<n>.jpg (the first `limit`, 0 = all)."""
  done = dst / ".complete"
  if done.exists():
    return dst
  with np.load(npz_file) as data:
    jpeg, offsets = data["jpeg"], data["offsets"]
    labels, class_names = data["labels"], [str(c) for c in data["class_names"]]
  # The bundle is sorted by class: a limit takes every k-th image, so all classes stay.
  chosen = np.arange(len(labels))
  if limit and limit < len(labels):
    chosen = chosen[::len(labels) // limit][:limit]
  for name in class_names:
    (dst / name).mkdir(parents=True, exist_ok=True)
  for i in chosen:
    (dst / class_names[labels[i]] / f"{i:06d}.jpg").write_bytes(
        jpeg[offsets[i]:offsets[i + 1]].tobytes())
  done.write_text(f"{len(chosen)}\n")
  return dst


def _photo(args) -> None:
  """One photo-sized JPEG: smooth random colour fields plus sensor-like noise."""
  path, seed, (width, height) = args
  rng = np.random.default_rng(seed)
  base = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
  pixels = np.asarray(base.resize((width, height), Image.Resampling.BICUBIC), np.float32)
  pixels += rng.normal(0, 10, pixels.shape)
  out = io.BytesIO()
  Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
  pathlib.Path(path).write_bytes(out.getvalue())


def write_imagenet_like(dst: pathlib.Path, n: int, num_classes: int, size) -> pathlib.Path:
  """n JPEGs of `size` (ImageNet's typical 500x375 by default) in num_classes folders."""
  done = dst / ".complete"
  if done.exists() and done.read_text().split() == [str(n), str(num_classes), *map(str, size)]:
    return dst
  jobs = []
  for i in range(n):
    folder = dst / f"class_{i % num_classes:04d}"
    folder.mkdir(parents=True, exist_ok=True)
    jobs.append((str(folder / f"{i:07d}.jpg"), i, size))
  # spawn: forking a process that runs JAX can deadlock.
  with concurrent.futures.ProcessPoolExecutor(
      os.cpu_count(), mp_context=multiprocessing.get_context("spawn")) as pool:
    list(pool.map(_photo, jobs, chunksize=64))
  done.write_text(f"{n} {num_classes} {size[0]} {size[1]}\n")
  return dst


def write_records(src: pathlib.Path, dst: pathlib.Path, resize: int) -> pathlib.Path:
  """jaxcls.data.convert of an image folder into split 'train' (skipped if already there)."""
  if not (dst / "train.json").exists():
    start = time.perf_counter()
    meta = convert.convert(str(src), str(dst), "train", resize=resize, progress=False)
    print(f"  converted {meta['num_examples']} images to {dst} in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
  return dst


# Timed phases.


class Shared:
  """One compiled step and one state, passed between the contenders (donated each step)."""

  def __init__(self, built):
    self.step, self.state = built.step, built.state

  def steps(self, batches, n: int) -> float:
    start = time.perf_counter()
    state, in_flight = self.state, dispatch.StepsInFlight()
    for _ in range(n):
      state, metrics = self.step(state, next(batches))
      in_flight.add(metrics)  # a few steps ahead, as in the loop
    jax.block_until_ready(state)
    self.state = state
    return time.perf_counter() - start


class DeviceContender(harness.Contender):
  """The step fed the same batch, already on the device: no input cost at all."""

  def __init__(self, shared, batch, images_per_step, settle_seconds=1.0):
    self.name, self.images_per_step = "device", images_per_step
    self._shared, self._batch = shared, batch
    self._settle = settle_seconds

  def run(self, n):
    # Untimed first: the pipelines refill their buffers when a phase of theirs ends, and
    # their workers would take host CPU from this phase's timed part.
    start = time.perf_counter()
    while time.perf_counter() - start < self._settle:
      self._shared.steps(_repeat(self._batch), 1)
    return self._shared.steps(_repeat(self._batch), n)


def _repeat(batch):
  while True:
    yield batch


class PipelineContender(harness.Contender):
  """The step fed by train.run's pipeline: grain workers or threads, then device prefetch."""

  def __init__(self, shared, config, mesh, label):
    self.name, self.images_per_step = label, config.batch_size
    self._shared = shared
    source = sources.create_source(config.data, config.data.train_split)
    self._batches = pipeline.train_batches_on_devices(
        config.data, source, config.batch_size, config.seed, sharding.batch_sharding(mesh))
    self.workers = pipeline.num_workers(config.data)
    # Batches the pipeline may have stored while another phase ran: use them up untimed, so
    # a phase measures the pipeline's steady rate, not its buffers.
    local_batch = config.batch_size // jax.process_count()
    self._drain = (self.workers * max(1, config.data.prefetch_batches)
                   + config.data.prefetch_batches + math.ceil(256 / local_batch) + 1)
    self.source_name, self.num_examples = source.name, len(source)

  def run(self, n):
    self._shared.steps(self._batches, self._drain)
    return self._shared.steps(self._batches, n)

  def close(self):
    self._batches.close()  # ends grain's worker processes and frees their shared memory


def source_config(base_spec, overrides, source, data_path):
  """The benchmark's config for one source; data_path is that source's directory."""
  extra = [f"data.source='{source}'"]
  if source in ("npz", "array_record", "image_folder"):
    extra.append(f"data.path='{data_path}'")
  return harness.load_config(base_spec, [*overrides, *extra])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  data = parser.add_mutually_exclusive_group()
  data.add_argument("--cifar", help="directory with train.npz (the cifar10_jpeg bundle format)")
  data.add_argument("--imagenet_like", type=int, default=0, metavar="N",
                    help="generate N photo-sized JPEGs in --classes classes")
  parser.add_argument("--classes", type=int, default=1000, help="imagenet_like: class folders")
  parser.add_argument("--gpu", action="store_true", help="GPU sizes (ResNet-18 b512 / ResNet-50 b256)")
  parser.add_argument("--sources", default="",
                      help="comma-separated: array_record, image_folder, npz, bundled, synthetic")
  parser.add_argument("--workers", default="",
                      help="comma-separated config.data.num_workers values to compare "
                      "(default: the config's)")
  parser.add_argument("--config", help="config file instead of the dataset's default")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override (repeatable), after the size's own")
  parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache",
                                                     "jaxcls", "bench_data"),
                      help="where prepared data is written and reused")
  parser.add_argument("--limit", type=int, default=0,
                      help="cifar: use only the first N training images (0 = all)")
  parser.add_argument("--photo_size", default="500x375", help="imagenet_like: WxH of each JPEG")
  parser.add_argument("--resize", type=int, default=256,
                      help="imagenet_like: records pre-resized to this shorter side")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--seconds", type=float, default=5.0, help="per phase, about")
  parser.add_argument("--steps", type=int, default=0, help="per phase (default: from --seconds)")
  parser.add_argument("--json", help="also write the rows to this JSON file")
  args = parser.parse_args()

  dataset = "cifar" if args.cifar else "imagenet_like" if args.imagenet_like else "none"
  spec, overrides = CONFIGS[(dataset, "gpu" if args.gpu else "cpu")]
  if args.config:
    spec, overrides = args.config, []
  overrides = [*overrides, *args.set]
  if dataset == "imagenet_like":
    overrides.insert(0, f"data.num_classes={args.classes}")
  source_names = (args.sources or DEFAULT_SOURCES[dataset]).split(",")
  work = pathlib.Path(args.work)
  print(harness.machine())

  # Prepare each source's data once.
  paths = {}
  if dataset == "cifar":
    limit_tag = f"_{args.limit}" if args.limit else ""
    folder = work / f"cifar10_folder{limit_tag}"
    if {"image_folder", "array_record"} & set(source_names):
      write_image_folder(pathlib.Path(args.cifar) / "train.npz", folder, args.limit)
    paths = {"npz": args.cifar, "image_folder": folder,
             "array_record": work / f"cifar10_records{limit_tag}"}
    if "array_record" in source_names:
      write_records(folder, paths["array_record"], resize=0)
  elif dataset == "imagenet_like":
    size = tuple(int(v) for v in args.photo_size.split("x"))
    tag = f"{args.imagenet_like}_{args.classes}_{args.photo_size}"
    start = time.perf_counter()
    folder = write_imagenet_like(work / f"imagenet_like_{tag}", args.imagenet_like, args.classes,
                                 size)
    print(f"  {args.imagenet_like} JPEGs of {args.photo_size} ready in "
          f"{time.perf_counter() - start:.1f}s", flush=True)
    paths = {"image_folder": folder,
             "array_record": work / f"imagenet_like_{tag}_records{args.resize}"}
    if "array_record" in source_names:
      write_records(folder, paths["array_record"], resize=args.resize)

  configs = {name: source_config(spec, overrides, name, paths.get(name, ""))
             for name in source_names}
  first = configs[source_names[0]]
  print(f"\n== {spec} {' '.join(overrides)}: {first.model.name} {first.data.image_size}px "
        f"batch {first.batch_size}, augment {first.data.train_augment}", flush=True)
  start = time.perf_counter()
  built = harness.jaxcls_train_step(first)
  shared = Shared(built)
  contenders = [DeviceContender(shared, harness.device_batch(first, built.mesh),
                                first.batch_size)]
  for name in source_names:
    for workers in args.workers.split(",") if args.workers else [None]:
      config = configs[name]
      label = name
      if workers is not None:
        config = source_config(spec, [*overrides, f"data.num_workers={workers}"], name,
                               paths.get(name, ""))
        label = f"{name} workers={workers}"
      contender = PipelineContender(shared, config, built.mesh, label)
      contenders.append(contender)
      print(f"  {label}: {contender.source_name} ({contender.num_examples} images), "
            f"{contender.workers} worker processes", flush=True)
  harness.warm_up(contenders)
  steps = args.steps or harness.calibrate(contenders, args.seconds, min_steps=3)
  print(f"  built and warmed up in {time.perf_counter() - start:.1f}s; {steps} steps per "
        f"phase, {args.rounds} rounds", flush=True)
  rates = harness.alternate(contenders, steps, args.rounds)

  label = f"{first.model.name} {first.data.image_size}px b{first.batch_size}"
  rows = [{"row": label, "input": "device batch", "images_per_sec": np.median(rates["device"]),
           "ratio": 1.0}]
  for contender in contenders[1:]:
    mid, low, high = harness.ratio(rates, contender.name, "device")
    rows.append({"row": label, "input": contender.name, "workers": contender.workers,
                 "images_per_sec": np.median(rates[contender.name]), "ratio": mid,
                 "ratio_range": [low, high]})
  print("\n| run | input | images/s | ratio to device batch |\n|---|---|---|---|")
  for r in rows:
    spread = f" ({r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f})" if "ratio_range" in r else ""
    print(f"| {r['row']} | {r['input']} | {r['images_per_sec']:,.0f} | {r['ratio']:.3f}{spread} |")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": harness.machine(), "rows": rows}, f, indent=1, default=float)
  for contender in contenders[1:]:
    contender.close()


if __name__ == "__main__":
  main()
