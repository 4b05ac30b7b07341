"""The data position: one number that any worker count continues from, its versioned JSON, and
the same number read out of the grain iterator states that checkpoints held before it."""

import itertools

from absl import flags
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from jaxcls.data import pipeline
from jaxcls.data import position
from jaxcls.errors import CheckpointError
from helpers import indices_of, small_data_config
from test_data_pipeline import IndexSource

N, BATCH = 40, 8  # 5 batches an epoch


def grain_iterator(workers: int):
  """The train loop's iterator as jaxcls built it before the data position (its state was saved)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  sharding = NamedSharding(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1]), P("data"))
  ds = pipeline.create_train_dataset(small_data_config(num_workers=workers), IndexSource(N),
                                     BATCH, seed=0, process_index=0, process_count=1)
  return iter(pipeline.prefetch_to_device(ds, sharding, num_batches=2))


def stream(start: int, count: int) -> list[list[int]]:
  """Batches start, ..., start + count - 1 of the stream, from a stream started there."""
  ds = pipeline.create_train_dataset(small_data_config(), IndexSource(N), BATCH, seed=0,
                                     start_batch=start, process_index=0, process_count=1)
  return [indices_of(b["image"]).tolist() for b in itertools.islice(ds, count)]


@pytest.mark.parametrize("workers", [0, 2])
def test_an_old_grain_state_reads_as_the_batches_the_loop_took(workers):
  """With workers grain saves one state per worker, each ahead by what it prefetched: the
  position is what the loop took, and continues with the batches the old iterator gave."""
  it = grain_iterator(workers)
  try:
    for _ in range(7):  # into the second epoch
      next(it)
    state = it.get_state()
    expected = [indices_of(np.asarray(next(it)["image"])).tolist() for _ in range(3)]
  finally:
    it.close()
  assert position.from_grain_state(state, "step 7") == 7
  assert stream(7, 3) == expected


def test_a_grain_state_of_another_shape_is_refused_with_the_fix():
  bad = {"next_index_in_cycle": 0, "iterators_in_use_indices": [0, 1],
         "iterators_in_use_states": [{"next_index": 4}, {"next_index": 1}]}  # not round-robin
  for state in (bad, {"something": 1}, [1, 2]):
    with pytest.raises(CheckpointError, match="restart_data_on_mismatch=True") as e:
      position.from_grain_state(state, "/ckpt/7")
    assert "/ckpt/7" in str(e.value)


def test_the_record_round_trips_and_a_newer_or_broken_one_is_named():
  assert position.to_record(12) == {"version": 1, "next_batch": 12}
  assert position.from_record(position.to_record(12), "here") == 12
  with pytest.raises(CheckpointError, match="has version 2; this jaxcls reads up to version 1"):
    position.from_record({"version": 2, "next_batch": 3}, "here")
  for broken in ({"version": 1}, {"version": 1, "next_batch": -1}, {"next_batch": 3}, "7"):
    with pytest.raises(CheckpointError, match="in here"):
      position.from_record(broken, "here")


def test_train_batches_count_what_the_loop_took_not_what_was_read_ahead():
  """The loop's batches are read ahead (threads, device prefetch, worker processes); the
  position counts only those taken, and a stream started there gives the next ones."""
  batches = pipeline.train_batches_on_devices(
      small_data_config(prefetch_batches=3), IndexSource(N), BATCH, seed=0,
      sharding=NamedSharding(jax.make_mesh((8,), ("data",)), P("data")))
  try:
    taken = [indices_of(np.asarray(next(batches)["image"])).tolist() for _ in range(4)]
    assert batches.position == 4
    batches.seek(6)  # as a resume does (from 0 when nothing was read yet)
    taken += [indices_of(np.asarray(next(batches)["image"])).tolist() for _ in range(2)]
    assert batches.position == 8
  finally:
    batches.close()
  assert taken == stream(0, 4) + stream(6, 2)
