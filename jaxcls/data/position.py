"""The data position a checkpoint holds: the index of the next train batch the loop takes.

A process's train batches are a fixed sequence (pipeline.create_train_dataset: a function of
the seed and the batch index), so one number says where a run continues, whatever the
worker processes or prefetching had produced ahead of the loop, and whatever
config.data.num_workers the resumed run uses. Every process takes one batch per step, so the
number is the same on all of them; process 0 writes it as versioned JSON:

    {"version": 1, "next_batch": 1234}

Checkpoints written before this record (jaxcls before issue 13) hold each process's grain
iterator state instead; `from_grain_state` reads the same number out of it.
"""

from jaxcls.errors import CheckpointError

VERSION = 1


def to_record(next_batch: int) -> dict:
  return {"version": VERSION, "next_batch": int(next_batch)}


def from_record(record, where: str) -> int:
  """The next batch's index from to_record's JSON; a record this code cannot read names why."""
  if not isinstance(record, dict) or not isinstance(record.get("version"), int):
    raise CheckpointError(f"The data position in {where} is not a jaxcls data position "
                          f"record: {str(record)[:200]}.")
  if record["version"] > VERSION:
    raise CheckpointError(
        f"The data position in {where} has version {record['version']}; this jaxcls reads "
        f"up to version {VERSION}. Resume with the jaxcls that wrote it (or a newer one).")
  next_batch = record.get("next_batch")
  if not isinstance(next_batch, int) or next_batch < 0:
    raise CheckpointError(f"The data position in {where} has no valid next_batch: "
                          f"{str(record)[:200]}.")
  return next_batch


def from_grain_state(state, where: str) -> int:
  """The next batch's index from a grain iterator state that jaxcls's train pipeline saved.

  Without worker processes it is the iterator's `next_index`. With W workers grain
  interleaves them: worker i reads batches i, i + W, ..., and its state counts the batches it
  handed out, so the sum is the number the loop took; the round-robin order is checked, so a
  state of another shape is an error, never a wrong position.
  """
  if isinstance(state, dict) and isinstance(state.get("next_index"), int):
    return state["next_index"]
  try:
    counts = [worker["next_index"] for worker in state["iterators_in_use_states"]]
    order = state["iterators_in_use_indices"]
    next_in_cycle = state["next_index_in_cycle"]
  except (KeyError, TypeError):
    counts = order = next_in_cycle = None
  if counts and all(isinstance(c, int) for c in counts):
    workers, taken = len(counts), sum(counts)
    expected = [len(range(i, taken, workers)) for i in range(workers)]
    if order == list(range(workers)) and counts == expected and next_in_cycle == taken % workers:
      return taken
  raise CheckpointError(
      f"The data position in {where} is a grain iterator state that jaxcls cannot read: "
      f"{str(state)[:300]}. Set --config.checkpoint.restart_data_on_mismatch=True to keep the "
      "model and optimizer state and restart the data at the next epoch.")
