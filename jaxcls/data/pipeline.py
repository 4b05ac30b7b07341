"""grain pipelines that feed each process its share of the global batch.

Train: every epoch is one permutation of the whole split, the same on every process (same
seed), cut to a whole number of global batches. Global batch s is permutation positions
[s * B, (s + 1) * B); process p takes every process_count-th of them, starting at p. So the
processes read disjoint shares, yield the same number of batches, and together see each used
example once per epoch. The permutation and the augmentation are seeded by (seed, epoch,
position): reproducible, different each epoch, and independent of the worker count.

Eval: one pass, split the same way, with the tail padded by zero images whose `mask` is
False, so every process yields `num_eval_steps` batches and each example counts exactly once.

A train run reads its batches through `TrainBatches`, which counts the batches the loop has
taken: that count is the data position a checkpoint saves (position.py), and a resumed run
starts the pipeline at it (random access into the batched MapDataset). Worker processes and
prefetching only read ahead, so the position does not depend on config.data.num_workers.
"""

import functools
import os
import signal
import threading
import time

from absl import flags
from absl import logging
import grain
import jax
import numpy as np

from jaxcls.data import cores
from jaxcls.data import dali
from jaxcls.data import resolution
from jaxcls.data import sources
from jaxcls.data import transforms
from jaxcls.errors import ConfigError

# Threads per process that read and transform elements. PIL releases the GIL while it decodes
# and resizes, so a few threads help even with num_workers=0; more only add contention.
_READ_THREADS = 4
_READ_BUFFER = 256  # elements read ahead per process
_PARENT_POLL_SECONDS = 0.5  # how often a worker process checks that its parent lives


def check_config(data_config) -> None:
  """The pipeline keys of config.data."""
  resolution.check_config(data_config)
  if data_config.num_workers < -1:
    raise ConfigError(f"config.data.num_workers={data_config.num_workers}: use -1 (from the "
                      "cores), 0 (no worker processes) or a count.")


def local_batch_size(global_batch_size: int, process_count: int, key: str = "batch_size") -> int:
  """Each process's share of a global batch (config.<key>); raises if it does not split."""
  if global_batch_size <= 0:
    raise ConfigError(f"config.{key}={global_batch_size} must be positive.")
  if global_batch_size % process_count:
    raise ConfigError(f"config.{key}={global_batch_size} is not divisible by the "
                      f"{process_count} processes.")
  return global_batch_size // process_count


def steps_per_epoch(num_examples: int, global_batch_size: int, source_name: str = "") -> int:
  """Whole global batches per train epoch (the remainder is dropped, a different one each epoch)."""
  steps = num_examples // global_batch_size
  if steps == 0:
    of = f" of {source_name}" if source_name else ""
    raise ConfigError(f"config.batch_size={global_batch_size} is larger than the "
                      f"{num_examples} training examples{of}; lower it.")
  return steps


def num_eval_steps(num_examples: int, global_batch_size: int) -> int:
  """Global batches in one eval pass; the last one is padded."""
  return -(-num_examples // global_batch_size)


def _process_layout(global_batch_size: int, process_index: int | None,
                    process_count: int | None, key: str) -> tuple[int, int, int]:
  """-> (process_index, process_count, local batch size); defaults come from JAX."""
  if process_index is None:
    process_index = jax.process_index()
  if process_count is None:
    process_count = jax.process_count()
  return process_index, process_count, local_batch_size(global_batch_size, process_count, key)


def num_workers(data_config) -> int:
  """config.data.num_workers, with -1 resolved from this process's cores (cores.py): 0 with
  4 or fewer, else all but 2 (for the main process's loop and transfers), with no upper cap.

  A small machine gains little from worker processes: the model needs its cores, and threads
  already decode in parallel (PIL, OpenCV and simplejpeg release the GIL).
  """
  if data_config.num_workers >= 0:
    return data_config.num_workers
  count = cores.available_cores()
  workers = 0 if count <= 4 else count - 2
  logging.info("config.data.num_workers=-1: %d worker processes for the %d cores of this "
               "process.", workers, count)
  return workers


def _exit_with_parent(parent_pid: int) -> None:
  while os.getppid() == parent_pid:
    time.sleep(_PARENT_POLL_SECONDS)
  os._exit(1)  # the parent is gone (kill -9, a crash): nothing would ever read what we make


def _init_worker(parent_pid: int, worker_index: int, worker_count: int) -> None:
  """Runs first in each grain worker process.

  Signals are the main process's to handle: a Ctrl-C or a SIGTERM sent to the whole process
  group would otherwise kill the workers before the main process has saved (preemption.py);
  the main process stops them when it is done. And a main process killed outright leaves
  its workers orphaned: a thread watching the parent's pid ends them.
  """
  del worker_index, worker_count
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, signal.SIG_IGN)
  threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True,
                   name="jaxcls-parent-watch").start()


def _to_iter_dataset(ds: grain.MapDataset, data_config) -> grain.IterDataset:
  """Runs the MapDataset in threads, and in `num_workers(data_config)` processes if > 0."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                            prefetch_buffer_size=_READ_BUFFER))
  workers = num_workers(data_config)
  if workers > 0:
    # Workers start with spawn: the entry point needs an `if __name__ == "__main__":` guard.
    # They also read absl flags, which a notebook or a test never parsed.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=workers, per_worker_buffer_size=max(1, data_config.prefetch_batches)),
        worker_init_fn=functools.partial(_init_worker, os.getpid()))
  return it


def train_batches(data_config, source: sources.Source, global_batch_size: int, seed: int, *,
                  process_index: int | None = None,
                  process_count: int | None = None) -> grain.MapDataset:
  """This process's train batches, endless, by index: batch i is a function of the seed and i.

  Each {"image": uint8 [b,H,W,3], "label": int32 [b]}, b = global_batch_size // process_count.
  process_index / process_count default to JAX's and are arguments only so tests can
  simulate several processes.
  """
  process_index, process_count, local_batch = _process_layout(
      global_batch_size, process_index, process_count, "batch_size")
  used = steps_per_epoch(len(source), global_batch_size) * global_batch_size
  # Separate, well-mixed 32-bit seeds: grain's shuffle uses seed + epoch, so nearby run seeds
  # would otherwise replay each other's permutations one epoch apart.
  shuffle_seed, augment_seed = np.random.SeedSequence(seed).generate_state(2)
  ds = grain.MapDataset.source(source).shuffle(seed=int(shuffle_seed))
  on_gpu = dali.selected(data_config)  # the host only draws the crops; DALI decodes them
  for t in (dali if on_gpu else transforms).train_transforms(data_config):
    if isinstance(t, grain.transforms.RandomMap):
      # Seeded by the element's position in the (epoch-indexed) permutation.
      ds = ds.random_map(t, seed=int(augment_seed))
    else:
      ds = ds.map(t)
  # grain keeps the epoch in the index through slice and repeat, so each epoch reshuffles.
  ds = ds[:used][process_index::process_count].repeat()
  return ds.batch(local_batch, drop_remainder=True,
                  batch_fn=dali.PlannedBatch if on_gpu else None)


def create_train_dataset(data_config, source: sources.Source, global_batch_size: int,
                         seed: int, *, start_batch: int = 0, stop_batch: int | None = None,
                         process_index: int | None = None,
                         process_count: int | None = None) -> grain.IterDataset:
  """This process's train batches (train_batches) from batch start_batch, endless or up to
  stop_batch (the end of a resolution segment)."""
  ds = train_batches(data_config, source, global_batch_size, seed,
                     process_index=process_index, process_count=process_count)
  # Sliced before the workers split it: they read batches start, start + 1, ... in turn.
  return _to_iter_dataset(ds[start_batch:stop_batch], data_config)


class TrainBatches:
  """The train loop's batches, and `position`: the index of the next one it takes.

  `make_dataset(start)` builds the stream from batch `start`. The position counts the batches
  handed to the loop, never what worker processes or prefetching produced ahead of it, so a
  checkpoint saved after step s (position s from a fresh start) resumes at the batch step s+1
  would have read, with any worker count. The stream (its worker processes included) starts
  at the first batch asked for, so `seek` before it costs nothing.
  """

  def __init__(self, make_dataset, position: int = 0):
    self._make_dataset = make_dataset
    self.position = position
    self._iterator = None

  def __iter__(self):
    return self

  def __next__(self):
    if self._iterator is None:
      self._iterator = iter(self._make_dataset(self.position))
    try:
      batch = next(self._iterator)
    except StopIteration:  # the end of a resolution segment: the next one starts here
      self.close()
      self._iterator = iter(self._make_dataset(self.position))
      batch = next(self._iterator)
    self.position += 1
    return batch

  def seek(self, position: int) -> None:
    """The next batch taken will be batch `position`."""
    self.close()
    self.position = position

  def close(self) -> None:
    """Stops the stream's threads and worker processes (a later batch starts them again)."""
    if self._iterator is not None:
      self._iterator.close()
      self._iterator = None


class _MarkReal(grain.transforms.Map):

  def map(self, element):
    return {**element, "mask": True}


class _Padding(grain.transforms.Map):
  """An already-decoded zero image; passes through the eval transforms unchanged."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, element):
    del element
    image = np.zeros((self.image_size, self.image_size, 3), np.uint8)
    return {"image": image, "label": 0, "mask": False}


def create_eval_dataset(data_config, source: sources.Source, global_batch_size: int, *,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.IterDataset:
  """One pass of this process's eval batches, each with "mask": bool [b], True = real.

  Every process yields num_eval_steps(len(source), global_batch_size) batches.
  """
  process_index, process_count, local_batch = _process_layout(
      global_batch_size, process_index, process_count, "eval_batch_size")
  total = num_eval_steps(len(source), global_batch_size) * global_batch_size
  real = grain.MapDataset.source(source).map(_MarkReal())
  padding = grain.MapDataset.range(total - len(source)).map(_Padding(data_config.image_size))
  ds = grain.MapDataset.concatenate([real, padding])[process_index::process_count]
  on_gpu = dali.selected(data_config)
  for t in (dali if on_gpu else transforms).eval_transforms(data_config):
    ds = ds.random_map(t, seed=0) if on_gpu else ds.map(t)  # the plan is a RandomMap
  ds = ds.batch(local_batch, drop_remainder=True,
                batch_fn=dali.PlannedBatch if on_gpu else None)
  return _to_iter_dataset(ds, data_config)


def read_images(data_config, source: sources.Source, indices) -> np.ndarray:
  """uint8 [len(indices), size, size, 3]: these examples decoded and cropped as for evaluation
  (on the host, whatever config.data.decoder says), read in threads. Every process that asks
  for the same indices gets the same images."""
  ds = grain.MapDataset.source([int(i) for i in indices]).map(source.__getitem__)
  for t in transforms.eval_transforms(data_config):
    ds = ds.map(t)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=_READ_THREADS,
                                            prefetch_buffer_size=_READ_BUFFER))
  images = [element["image"] for element in it]
  size = data_config.image_size
  return np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8)


def make_global_batch(local_batch: dict, sharding: jax.sharding.NamedSharding) -> dict:
  """This process's numpy batch -> global jax.Arrays, batch dimension sharded as `sharding` says."""
  if isinstance(local_batch, list):  # a dali.PlannedBatch (worker processes may send a list)
    return dali.global_batch(local_batch, sharding)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def prefetch_to_device(ds: grain.IterDataset, sharding: jax.sharding.NamedSharding,
                       num_batches: int = 2) -> grain.IterDataset:
  """Keeps `num_batches` global batches already on the devices, built in a background thread."""
  ds = ds.map(lambda batch: make_global_batch(batch, sharding))
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=num_batches)


def train_batches_on_devices(data_config, source: sources.Source, global_batch_size: int,
                             seed: int, sharding: jax.sharding.NamedSharding,
                             steps_per_epoch: int = 1) -> TrainBatches:
  """The train loop's global batches, config.data.prefetch_batches of them kept on the devices;
  each resolution segment (config.data.resize_schedule) its own stream at its own size."""
  segments = resolution.segments(data_config, steps_per_epoch)

  def make_dataset(start: int):
    size, stop = resolution.segment_at(segments, start)
    return prefetch_to_device(
        create_train_dataset(resolution.config_at_size(data_config, size), source,
                             global_batch_size, seed, start_batch=start, stop_batch=stop),
        sharding, data_config.prefetch_batches)

  return TrainBatches(make_dataset)
