"""config.data.decoder='dali': NVIDIA DALI decodes and crops the images on the GPU (nvJPEG).

The host still does what is cheap and must stay deterministic: grain reads, shuffles and
shards the examples as for the CPU path (pipeline.py), and for each example draws the crop
box and the flip with the same per-example generator and the same functions as
transforms.py (random_resized_crop_box then the flip; eval: center_crop_box), from the size in
the image's header, so the boxes are those of the CPU path and a resumed run replays them.
The pixel limit (config.data.max_image_pixels) is checked there, from the header, before any
decoding. DALI then decodes each box (fn.decoders.image_slice, the box rounded to whole
pixels), resizes it to image_size x image_size (linear, antialiased) and flips it, one
pipeline per local GPU, and the batch arrives as a global jax.Array sharded like the CPU
path's.

Not with the host-side policies (auto_augment, random_erasing) or pad_crop_flip:
check_config says so. Install with `pip install 'jaxcls[dali]'` (CUDA 13) or
`'jaxcls[dali-cuda12]'`. Tested here only for its import and config errors (no GPU on the
machines that run the suite); scripts/gpu_benchmark.sh measures it against the CPU path where
a GPU is present.
"""

import importlib.util
import io
import threading

import grain
import jax
import numpy as np
from PIL import Image

from jaxcls.data import images
from jaxcls.data import transforms
from jaxcls.errors import ConfigError, DataError, check_choice

DECODERS = ("cpu", "dali")
_INSTALL = ("pip install 'jaxcls[dali]' (CUDA 13) or 'jaxcls[dali-cuda12]' (CUDA 12): NVIDIA's "
            "nvidia-dali-cuda130 / nvidia-dali-cuda120")
_DALI_TRAIN_AUGMENTS = ("random_resized_crop_flip", "none")


def selected(data_config) -> bool:
  return data_config.get("decoder", "cpu") == "dali"


def check_config(data_config) -> None:
  """config.data.decoder, and what the DALI path needs: DALI, a GPU, crops it implements."""
  check_choice("data.decoder", data_config.decoder, DECODERS)
  if not selected(data_config):
    return
  if data_config.train_augment not in _DALI_TRAIN_AUGMENTS:
    raise ConfigError(
        f"config.data.decoder='dali' crops with random_resized_crop_flip or 'none', not "
        f"config.data.train_augment={data_config.train_augment!r}; use decoder='cpu' for it.")
  if data_config.auto_augment != "none" or data_config.random_erasing > 0:
    raise ConfigError(
        "config.data.decoder='dali' has no auto_augment or random_erasing (they run on the "
        f"host, after the crop): got auto_augment={data_config.auto_augment!r}, "
        f"random_erasing={data_config.random_erasing}; set them off or use decoder='cpu'.")
  if importlib.util.find_spec("nvidia") is None or importlib.util.find_spec(
      "nvidia.dali") is None:
    raise ConfigError(f"config.data.decoder='dali' needs NVIDIA DALI, which is not "
                      f"installed: {_INSTALL}.")
  if jax.default_backend() != "gpu":
    raise ConfigError(f"config.data.decoder='dali' decodes on NVIDIA GPUs; JAX runs on "
                      f"{jax.default_backend()!r} here. Use config.data.decoder='cpu'.")


class PlannedBatch(list):
  """A process's batch as the host prepared it for DALI (pipeline.py batches with it): one
  dict per example with the encoded "image", "label", "box" (left, top, width, height),
  "flip", the output "size" (and eval's "mask")."""


class _Plan(grain.transforms.RandomMap):
  """Reads the header, checks the label and pixel limit, draws the box and the flip."""

  def __init__(self, num_classes: int, size: int, resize: int | None, max_pixels: int):
    self.num_classes, self.size, self.resize, self.max_pixels = (num_classes, size, resize,
                                                                 max_pixels)

  def random_map(self, element, rng: np.random.Generator):
    drawn = {}

    def plan(image, name):
      width, height = images.image_size(image, name, self.max_pixels)
      if self.resize is None:  # train: random_resized_crop_flip's draws, in its order
        drawn["box"] = np.float32(transforms.random_resized_crop_box(height, width, rng))
        drawn["flip"] = np.int32(rng.integers(2))
      else:
        left, top, right, bottom = transforms.center_crop_box(height, width, self.size,
                                                              self.resize)
        drawn["box"] = np.float32((left, top, right - left, bottom - top))
        drawn["flip"] = np.int32(0)
      drawn["size"] = np.int32(self.size)
      return _encoded(image)

    return {**transforms.decode_element(element, self.num_classes, plan), **drawn}


def _encoded(image) -> np.ndarray:
  """Bytes for DALI's decoder; an already-decoded image (eval padding) as a lossless PNG."""
  if images.is_decoded(image):
    out = io.BytesIO()
    Image.fromarray(images.decode_image(image)).save(out, "PNG")
    return np.frombuffer(out.getvalue(), np.uint8)
  return np.frombuffer(image, np.uint8) if isinstance(image, bytes) else np.asarray(image)


def train_transforms(data_config) -> list:
  if data_config.train_augment == "none":
    return eval_transforms(data_config)
  return [_Plan(data_config.num_classes, data_config.image_size, None,
                transforms.max_pixels(data_config))]


def eval_transforms(data_config) -> list:
  return [_Plan(data_config.num_classes, data_config.image_size, data_config.eval_resize,
                transforms.max_pixels(data_config))]


def _dali():
  try:
    from nvidia import dali  # pylint: disable=g-import-not-at-top
    from nvidia.dali import fn, types  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise DataError(f"config.data.decoder='dali': cannot import NVIDIA DALI ({e}). "
                    f"{_INSTALL}.") from None
  return dali, fn, types


class _Pipelines:
  """One DALI pipeline per (GPU, batch size, output size), built on first use; each runs
  one batch at a time under its own lock (train prefetch and eval may share a GPU)."""

  def __init__(self):
    self._built, self._lock = {}, threading.Lock()

  def get(self, device_id: int, batch_size: int, size: int):
    key = (device_id, batch_size, size)
    with self._lock:
      if key not in self._built:
        self._built[key] = (_build(device_id, batch_size, size), threading.Lock())
      return self._built[key]


def _build(device_id: int, batch_size: int, size: int):
  dali, fn, types = _dali()

  @dali.pipeline_def(batch_size=batch_size, num_threads=4, device_id=device_id,
                     exec_async=False, exec_pipelined=False, prefetch_queue_depth=1)
  def crop_and_resize():
    encoded = fn.external_source(name="encoded", dtype=types.UINT8)
    anchor = fn.external_source(name="anchor", dtype=types.FLOAT)
    shape = fn.external_source(name="shape", dtype=types.FLOAT)
    flip = fn.external_source(name="flip", dtype=types.INT32)
    decoded = fn.decoders.image_slice(encoded, anchor, shape, device="mixed",
                                      output_type=types.RGB, normalized_anchor=False,
                                      normalized_shape=False)
    resized = fn.resize(decoded, resize_x=size, resize_y=size,
                        interp_type=types.INTERP_LINEAR, antialias=True)
    return fn.flip(resized, horizontal=flip)

  pipe = crop_and_resize()
  pipe.build()
  return pipe


_PIPELINES = _Pipelines()


def _decode_on(device, examples: list, size: int) -> jax.Array:
  """DALI's crops of `examples` on `device` -> a uint8 [n, size, size, 3] jax.Array there."""
  pipe, lock = _PIPELINES.get(device.local_hardware_id, len(examples), size)
  with lock:
    pipe.feed_input("encoded", [e["image"] for e in examples])
    pipe.feed_input("anchor", [e["box"][:2] for e in examples])
    pipe.feed_input("shape", [e["box"][2:] for e in examples])
    pipe.feed_input("flip", [e["flip"] for e in examples])
    (out,) = pipe.run()
    # DALI reuses its buffer at the next run: the copy is jax's own.
    return jax.dlpack.from_dlpack(out.as_tensor()).copy()


def global_batch(batch: list, sharding: jax.sharding.NamedSharding) -> dict:
  """A planned batch -> {"image": global uint8 jax.Array, "label", ("mask")}, each local
  device decoding the examples that `sharding` gives it."""
  local = len(batch)
  global_shape = (local * jax.process_count(),)
  indices = sharding.addressable_devices_indices_map(global_shape)
  first = min(index[0].start or 0 for index in indices.values())  # this process's offset
  size = int(batch[0]["size"])
  out = {key: np.stack([e[key] for e in batch]) for key in batch[0]
         if key not in ("image", "box", "flip", "size")}
  result = {key: jax.make_array_from_process_local_data(sharding, value)
            for key, value in out.items()}
  arrays = []
  for device, index in indices.items():
    start = (index[0].start or 0) - first
    stop = (index[0].stop or global_shape[0]) - first
    arrays.append(_decode_on(device, batch[start:stop], size))
  image_shape = (global_shape[0], *arrays[0].shape[1:])
  result["image"] = jax.make_array_from_single_device_arrays(image_shape, sharding, arrays)
  return result
