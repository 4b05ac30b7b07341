"""Which checkpoint a run continues from, and where its data resumes.

Damage is what the files prove: a checksum that differs, a file missing or cut short
(integrity.py), a step directory without orbax's items. Only such a step is set aside by
`config.checkpoint.fallback_to_previous`; any other failure to read (a storage hiccup, a
bug) is an error that moves nothing. Process 0 checks the files and every process learns its
verdict; the outcome of each restore is agreed over all processes, so none waits for a peer
that saw an error. A run never starts again from step 0 on its own.
"""

import jax

from jaxcls import checkpoint, distributed, integrity, storage
from jaxcls.errors import CheckpointError

# Markers of a read that failed because the stored bytes are wrong, not because storage was
# briefly unreachable: tensorstore's status codes, as they appear in its messages.
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                 "INVALID_ARGUMENT")
_REQUIRED_FILES = ("state/_METADATA", "meta/metadata")


def _missing_items(step_dir) -> str | None:
  """What a step lacks of orbax's items (an empty, half-deleted or stray step directory)."""
  files = storage.files_under(step_dir)  # one listing, also in a bucket
  missing = [name for name in _REQUIRED_FILES if not files.get(name)]
  # The data position: its JSON, or (steps written before it) grain's state files.
  if not files.get("data_position/metadata") and not any(n.startswith("data/") for n in files):
    missing.append("data_position/metadata (the data position)")
  if missing:
    return f"{step_dir} is incomplete: {', '.join(missing)} missing or empty"
  return None


def _proves_damage(error: Exception) -> bool:
  """Whether a failed restore shows damaged files (vs. an I/O hiccup or anything else)."""
  if isinstance(error, (FileNotFoundError, IsADirectoryError, NotADirectoryError)):
    return True
  if isinstance(error, ValueError):  # tensorstore's errors, json's JSONDecodeError
    text = str(error)
    return "JSON" in type(error).__name__ or any(code in text for code in _DAMAGE_CODES)
  return False


# Outcomes of one restore attempt; every process acts on the largest any of them had.
_OK, _DAMAGED, _FAILED, _REFUSED = 0, 1, 2, 3


def _try_restore(checkpointer, step, abstract_state, verified: bool):
  """-> (state, next batch or None, outcome agreed over processes, this process's error)."""
  state, next_batch, error, outcome = None, None, None, _OK
  restart = checkpointer.config.restart_data_on_mismatch
  try:
    saved = checkpointer.read_metadata(step)
    data_follows = checkpointer.check_compatible(step, saved)
    if not data_follows and not restart:
      changed = [f"{k}: checkpoint {saved.get(k)!r}, now {checkpointer.metadata[k]!r}"
                 for k in checkpoint.DATA_KEYS if saved.get(k) != checkpointer.metadata[k]]
      raise CheckpointError(
          f"The data position saved in {checkpointer.step_dir(step)} does not fit this run "
          f"({'; '.join(changed)}). Set --config.checkpoint.restart_data_on_mismatch=True "
          "to keep the model and optimizer state and restart the data at the next epoch.")
    if data_follows:
      try:
        next_batch = checkpointer.read_data_position(step)
      except CheckpointError:
        if not restart:  # the error names the flag
          raise
    state = checkpointer.restore(step, abstract_state)
  except CheckpointError as e:  # a refusal (the config, the data position): no process goes on
    error, outcome = e, _REFUSED
  except Exception as e:  # orbax and tensorstore raise many kinds; classified below
    error = e
    # Files that passed their checksums are not damaged, whatever the read said.
    outcome = _DAMAGED if (not verified and _proves_damage(e)) else _FAILED
  return state, next_batch, distributed.agree_on_max(outcome), error


def restore_latest(checkpointer: checkpoint.Checkpointer, abstract_state, log) -> tuple:
  """Restores the newest usable checkpoint: -> (state or None, step, next batch or None).

  The state is None only when there is no checkpoint at all; the next batch is None when
  the saved data position does not fit this run (checkpoint.restart_data_on_mismatch).
  A damaged newest step is an error naming it; with config.checkpoint.fallback_to_previous
  it is set aside and the one before is tried. A step that fails to read without proof of
  damage is an error that moves nothing.
  """
  config = checkpointer.config
  steps = sorted(checkpointer.manager.all_steps(), reverse=True)
  set_aside = []
  for step in steps:
    step_dir = checkpointer.step_dir(step)
    problem, verified = find_damage(checkpointer, step)
    if problem is None:
      state, next_batch, outcome, error = _try_restore(checkpointer, step, abstract_state,
                                                       verified)
      if outcome == _OK:
        if not verified:
          log(f"Checkpoint step {step} has no checksums (the run stopped before writing "
              "them); restored without verifying its files.")
        return state, step, next_batch
      if outcome == _REFUSED:
        raise error if isinstance(error, CheckpointError) else CheckpointError(
            f"Another process refused to restore {step_dir}; its output says why.")
      reason = (f"{type(error).__name__}: {str(error)[:300]}" if error is not None
                else "another process could not read it")
      if outcome == _FAILED:
        raise CheckpointError(
            f"The checkpoint in {step_dir} could not be read ({reason}). "
            + ("Its files match their checksums, so it is not damaged: "
               if verified else "Nothing shows that its files are damaged: ")
            + "this may be a passing storage error, and nothing was moved. Run the same "
            "command again; if it persists, report it with this message.") from error
      problem = f"{step_dir} cannot be read ({reason})"
    if not config.fallback_to_previous:
      raise CheckpointError(
          f"Checkpoint step {step} is damaged: {problem}. Set "
          "--config.checkpoint.fallback_to_previous=True to move it aside (nothing is "
          "deleted) and resume from the previous step, or move "
          f"{step_dir} out of {checkpointer.directory} yourself.")
    moved = checkpointer.set_aside(step)
    set_aside.append(moved)
    log(f"Checkpoint step {step} is damaged ({problem}); moved it to {moved} and trying the "
        "previous step.")
  if set_aside:
    raise CheckpointError(
        f"No checkpoint in {checkpointer.directory} could be restored: every step was damaged "
        f"and set aside ({', '.join(set_aside)}). The run does not start again from step 0 "
        "on its own: to train from scratch, use a new --workdir.")
  return None, 0, None


def resume_training(checkpointer: checkpoint.Checkpointer, abstract_state, batches,
                    steps_per_epoch: int, log) -> tuple:
  """Restores the latest usable checkpoint and positions the data: -> (state or None, step).

  `batches` (a pipeline.TrainBatches) continues at the saved data position; when that
  position does not fit this run (checkpoint.restart_data_on_mismatch), at the start of the
  next epoch instead.
  """
  state, step, next_batch = restore_latest(checkpointer, abstract_state, log)
  if state is None:
    return None, 0
  data_restored = next_batch is not None
  if not data_restored:
    next_batch = -(-step // steps_per_epoch) * steps_per_epoch
  batches.seek(next_batch)
  log(f"Resumed from {checkpointer.step_dir(step)} (step {step}), "
      + ("data position included." if data_restored else "data restarted at the next epoch."))
  return state, step


def find_damage(checkpointer, step: int) -> tuple[str | None, bool]:
  """-> (what is damaged or None, whether the step's files were verified by checksums).

  Process 0 reads the files; every process gets its verdict, so all act alike. A file that
  cannot be read (an I/O error, not a missing one) proves nothing: every process raises.
  """
  problem, verified, unreadable = None, False, 0
  if jax.process_index() == 0:
    try:
      verdict = integrity.verify(checkpointer.step_dir(step))
      verified = verdict.verified
      problem = verdict.describe() if verdict.damaged else _missing_items(
          checkpointer.step_dir(step))
    except OSError as e:
      problem, unreadable = f"{type(e).__name__}: {e}", 1
  problem = distributed.broadcast_text(problem)
  verified, unreadable = divmod(distributed.agree_on_max(2 * int(verified) + unreadable), 2)
  if unreadable:
    raise CheckpointError(
        f"The files of {checkpointer.step_dir(step)} could not be read to check them "
        f"({problem}). Nothing shows that they are damaged: this may be a passing storage "
        "error, and nothing was moved. Run the same command again; if it persists, report it "
        "with this message.")
  return problem, bool(verified)
