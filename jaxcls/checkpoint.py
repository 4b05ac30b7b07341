"""Checkpoints: the train state and every process's data position, saved together with orbax.

A step directory `<workdir>/checkpoints/<step>` holds three items:
  state  the TrainState (step, params, BatchNorm statistics, optimizer state), sharded: each
         process writes the shards it holds; restore reshards onto whatever mesh is current
  data   each process's grain iterator state (grain.checkpoint), so the input resumes at the
         exact next batch
  meta   JSON: what the state's structure depends on, to refuse an incompatible --config
The RNG needs no item of its own: every random number of a step derives from the config's
seed and `state.step`.

orbax writes a step into a temporary directory and renames it when every process is done,
so a kill at any moment leaves either a complete step or none. Once a step is final, process
0 records each file's size and CRC-32 in it (integrity.py); a restore checks them first.

What counts as damage is what the files prove: a checksum that differs, a file missing or
truncated, a step directory without orbax's items. Only such a step is set aside by
`fallback_to_previous`; any other failure to read (a storage hiccup, a bug) is an error that
moves nothing. Every process reaches the same verdict.
"""

import contextlib
import errno
import logging
import os
import shutil
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxcls import integrity
from jaxcls import workdir as workdir_lib
from jaxcls.errors import CheckpointError, ConfigError, check_at_least

# Keys whose change alters the train state's structure or shapes: a checkpoint saved under
# other values cannot be restored into this run's state.
STATE_KEYS = ("model.name", "model.width", "model.stem", "data.num_classes")
# Keys whose change makes the saved data position meaningless (it counts batches of a given
# size over a given number of per-process shares).
DATA_KEYS = ("batch_size", "process_count", "data.source", "data.train_split", "seed")


def check_config(ckpt_config) -> None:
  check_at_least("checkpoint.keep", ckpt_config.keep, 1, integer=True)
  check_at_least("checkpoint.preemption_check_steps", ckpt_config.preemption_check_steps, 1,
                 integer=True)
  if ckpt_config.every_steps <= 0:  # every_epochs decides
    check_at_least("checkpoint.every_epochs", ckpt_config.every_epochs, 0.0, inclusive=False)
  if ckpt_config.best_mode not in ("max", "min"):
    raise ConfigError(f"config.checkpoint.best_mode={ckpt_config.best_mode!r}: use "
                      "'max' or 'min'.")


def save_every_steps(ckpt_config, steps_per_epoch: int) -> int:
  """config.checkpoint.every_steps, else every_epochs in steps (at least 1)."""
  if ckpt_config.every_steps > 0:
    return int(ckpt_config.every_steps)
  return max(1, int(round(ckpt_config.every_epochs * steps_per_epoch)))


def run_metadata(config) -> dict:
  """The values STATE_KEYS and DATA_KEYS name, for this run."""
  values = {"process_count": jax.process_count()}
  for key in STATE_KEYS + DATA_KEYS:
    if key == "process_count":
      continue
    node = config
    for part in key.split("."):
      node = node[part]
    values[key] = node
  return values


class Checkpointer:
  """Saves and restores {state, data, meta} under <workdir>/checkpoints.

  `read_only=True` is for tools that read a run that may still be training (evaluate,
  predict): such a manager never creates, cleans up or deletes anything in the directory.
  """

  def __init__(self, workdir: str, ckpt_config, save_every_steps: int, metadata: dict,
               read_only: bool = False):
    self.workdir = workdir
    self.directory = workdir_lib.checkpoints_dir(workdir)
    self.config = ckpt_config
    self.save_every_steps = save_every_steps
    self.metadata = metadata
    if read_only:
      options = ocp.CheckpointManagerOptions(read_only=True, cleanup_tmp_directories=False,
                                             create=False)
    else:
      policies = [checkpoint_managers.LatestN(n=ckpt_config.keep)]
      if ckpt_config.best_metric:
        policies.append(checkpoint_managers.BestN(
            get_metric_fn=lambda metrics: metrics[ckpt_config.best_metric],
            reverse=ckpt_config.best_mode == "min", n=1,
            keep_checkpoints_without_metrics=False))
      options = ocp.CheckpointManagerOptions(
          preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
          enable_async_checkpointing=ckpt_config.async_save,
          cleanup_tmp_directories=True,  # partial steps a kill left behind
          create=True)
    self.manager = ocp.CheckpointManager(
        workdir_lib.orbax_path(self.directory), item_names=("state", "data", "meta"),
        options=options)
    self.last_save_blocked_seconds = 0.0
    self._unrecorded = set()  # steps saved here whose checksums are not written yet
    self._saving_step, self._save_bytes = None, 0
    _quiet_disk_full_noise()

  def latest_step(self):
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return str(ocp.step.build_step_path(self.directory, ocp.step.standard_name_format(), step))

  def should_save(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.save_every_steps > 0 and step % self.save_every_steps == 0)

  def save(self, step: int, state, data_iterator, metrics: dict | None = None) -> float:
    """Starts a save; returns the seconds it blocked the caller (the rest runs in the background)."""
    if step in self.manager.all_steps():
      return 0.0  # already saved at this step (e.g. the last step was also an interval step)
    start = time.perf_counter()
    with self._disk_full_is_one_line():
      self.manager.wait_until_finished()  # orbax waits for the previous save here anyway
    self.record_checksums()
    self._unrecorded.add(step)
    self._saving_step = step
    self._save_bytes = self._next_save_bytes(state)
    # Refused before it starts: a save that runs out of space midway leaves orbax's write
    # threads failing one after another (each printing a traceback).
    free = shutil.disk_usage(self.directory).free
    if _agree_on_int(int(free < self._save_bytes)):
      raise self._disk_full_error()
    with self._disk_full_is_one_line():
      self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=grain.checkpoint.CheckpointSave(data_iterator),
              meta=ocp.args.JsonSave(self.metadata)),
          metrics=metrics)
    self.last_save_blocked_seconds = time.perf_counter() - start
    return self.last_save_blocked_seconds

  def _next_save_bytes(self, state) -> int:
    """What the next save takes: as much as the newest step on disk (small arrays cost whole
    blocks), and at least the state's bytes plus the metadata."""
    estimate = sum(leaf.nbytes for leaf in jax.tree.leaves(state)) + _SAVE_OVERHEAD_BYTES
    steps = self.manager.all_steps()
    if steps and jax.process_index() == 0:
      estimate = max(estimate, integrity.disk_bytes(self.step_dir(max(steps))))
    return estimate

  @contextlib.contextmanager
  def _disk_full_is_one_line(self):
    """A full disk (or quota) during a save: one CheckpointError saying where, how much the
    next save needs and what was kept, instead of orbax's tracebacks from several threads."""
    try:
      yield
    except CheckpointError:
      raise
    except Exception as e:
      if not _is_disk_full(e):
        raise
      raise self._disk_full_error() from None

  def _disk_full_error(self) -> CheckpointError:
    kept = [s for s in self.manager.all_steps() if s != self._saving_step]
    kept_text = (f"the last complete checkpoint, step {max(kept)}, is kept in "
                 f"{self.step_dir(max(kept))}" if kept else "no checkpoint was complete yet")
    free = shutil.disk_usage(self.directory).free
    return CheckpointError(
        f"Disk full while saving step {self._saving_step} to {self.directory} ({_size(free)} "
        f"free): a save needs about {_size(self._save_bytes)}. Nothing "
        f"was lost: {kept_text}. Free space (or lower config.checkpoint.keep) and run the same "
        "command to resume.")

  def read_metadata(self, step: int) -> dict:
    restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return restored["meta"]

  def check_compatible(self, step: int, saved: dict) -> bool:
    """Raises for a state-incompatible config; returns whether the data position can follow."""
    changed = [k for k in STATE_KEYS if saved.get(k) != self.metadata[k]]
    if changed:
      details = ", ".join(f"config.{k}: checkpoint {saved.get(k)!r}, now {self.metadata[k]!r}"
                          for k in changed)
      raise CheckpointError(
          f"The checkpoint in {self.step_dir(step)} was trained with another model ({details}). "
          "Use a new --workdir for a different model, or set the config back.")
    return all(saved.get(k) == self.metadata[k] for k in DATA_KEYS)

  def restore(self, step: int, abstract_state, data_iterator, restore_data: bool):
    """Restores the state (resharded onto abstract_state's shardings) and, if asked, the data."""
    args = {"state": ocp.args.StandardRestore(abstract_state)}
    if restore_data:
      args["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**args))
    return restored["state"]

  def set_aside(self, step: int) -> str:
    """Moves a damaged step out of the way (never deletes it) so later saves can use the name."""
    target = workdir_lib.damaged_checkpoint_dir(self.workdir, step, int(time.time()))
    if jax.process_index() == 0:
      shutil.move(self.step_dir(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxcls_set_aside_{step}")
    self.manager.reload()
    return target

  def record_checksums(self) -> None:
    """Writes the checksums of the steps saved here that are final by now (process 0 only).

    Called before each save, at log steps and at the end: a kill in between leaves the
    newest step without them, and it is restored unverified.
    """
    if not self._unrecorded or self.manager.is_saving_in_progress():
      return
    if jax.process_index() == 0:
      for step in sorted(self._unrecorded & set(self.manager.all_steps())):
        try:
          integrity.write_checksums(self.step_dir(step))
        except FileNotFoundError:
          pass  # deleted meanwhile by the keep policy
    self._unrecorded.clear()

  def wait(self) -> None:
    with self._disk_full_is_one_line():
      self.manager.wait_until_finished()
    self.record_checksums()

  def close(self) -> None:
    try:
      self.wait()
    finally:  # even after a failed save, or orbax's threads outlive their event loop
      try:
        self.manager.close()
      except Exception as e:  # the same failed save, already raised by wait() or save()
        if not _is_disk_full(e):
          raise

  def find_damage(self, step: int) -> tuple[str | None, bool]:
    """-> (what is damaged or None, whether the step's files were verified by checksums).

    Process 0 reads the files; every process gets its verdict, so all act alike.
    """
    problem, verified = None, False
    if jax.process_index() == 0:
      verdict = integrity.verify(self.step_dir(step))
      verified = verdict.verified
      if verdict.damaged:
        problem = verdict.describe()
      else:
        problem = _missing_items(self.step_dir(step))
    return _agree_on_text(problem), bool(_agree_on_int(int(verified)))


# What a step holds besides the arrays: orbax's metadata, the data position, the meta item.
_SAVE_OVERHEAD_BYTES = 64 * 1024


def _size(num_bytes: int) -> str:
  return f"{num_bytes / 1e6:.1f} MB" if num_bytes >= 100_000 else f"{num_bytes / 1e3:.0f} KB"


def _is_disk_full(error: Exception) -> bool:
  if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
    return True
  text = str(error)
  return "No space left on device" in text or "Disk quota exceeded" in text


class _DiskFullNoise(logging.Filter):
  """Drops the error logs of a full disk (orbax's save threads and asyncio's unretrieved
  write tasks each log a traceback): the Checkpointer reports it once, as a CheckpointError."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
    return "No space left on device" not in text and "Disk quota exceeded" not in text


def _quiet_disk_full_noise() -> None:
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, _DiskFullNoise) for f in handler.filters):
    handler.addFilter(_DiskFullNoise())


# Markers of a read that failed because the stored bytes are wrong, not because storage was
# briefly unreachable: tensorstore's status codes, as they appear in its messages.
_DAMAGE_CODES = ("DATA_LOSS", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                 "INVALID_ARGUMENT")
_REQUIRED_FILES = ("state/_METADATA", "meta/metadata")


def _missing_items(step_dir: str) -> str | None:
  """What a step lacks of orbax's items (an empty, half-deleted or stray step directory)."""
  missing = [name for name in _REQUIRED_FILES
             if not os.path.isfile(os.path.join(step_dir, name))
             or os.path.getsize(os.path.join(step_dir, name)) == 0]
  data_dir = os.path.join(step_dir, "data")
  if not os.path.isdir(data_dir) or not os.listdir(data_dir):
    missing.append("data/ (the data position)")
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


def _agree_on_int(value: int) -> int:
  """The largest of every process's value (a failure anywhere is a failure everywhere)."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def _agree_on_text(text: str | None, size: int = 2048) -> str | None:
  """Process 0's text (or None) on every process."""
  if jax.process_count() == 1:
    return text
  encoded = np.zeros(size + 1, np.uint8)
  if text is not None:
    raw = text.encode()[:size]
    encoded[0], encoded[1:len(raw) + 1] = 1, np.frombuffer(raw, np.uint8)
  encoded = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
  return bytes(encoded[1:]).rstrip(b"\0").decode(errors="replace") if encoded[0] else None


_OK, _DAMAGED, _FAILED = 0, 1, 2


def _try_restore(checkpointer, step, abstract_state, data_iterator, verified: bool):
  """-> (state, data_follows, outcome, error): one attempt, with every process's outcome."""
  state, data_follows, error, outcome = None, False, None, _OK
  try:
    saved = checkpointer.read_metadata(step)
    data_follows = checkpointer.check_compatible(step, saved)
    if not data_follows and not checkpointer.config.restart_data_on_mismatch:
      changed = [f"{k}: checkpoint {saved.get(k)!r}, now {checkpointer.metadata[k]!r}"
                 for k in DATA_KEYS if saved.get(k) != checkpointer.metadata[k]]
      raise CheckpointError(
          f"The data position saved in {checkpointer.step_dir(step)} does not fit this run "
          f"({'; '.join(changed)}). Set --config.checkpoint.restart_data_on_mismatch=True "
          "to keep the model and optimizer state and restart the data at the next epoch.")
    state = checkpointer.restore(step, abstract_state, data_iterator, data_follows)
  except CheckpointError:
    raise
  except Exception as e:  # orbax and tensorstore raise many kinds; classified below
    error = e
    # Files that passed their checksums are not damaged, whatever the read said.
    outcome = _DAMAGED if (not verified and _proves_damage(e)) else _FAILED
  return state, data_follows, _agree_on_int(outcome), error


def restore_latest(checkpointer: Checkpointer, abstract_state, data_iterator, log) -> tuple:
  """Restores the newest usable checkpoint: -> (state or None, step, data_restored).

  None only when there is no checkpoint at all. A damaged newest step is an error naming it;
  with config.checkpoint.fallback_to_previous it is set aside and the one before is tried.
  A step that fails to read without proof of damage is an error that moves nothing.
  """
  config = checkpointer.config
  steps = sorted(checkpointer.manager.all_steps(), reverse=True)
  set_aside = []
  for step in steps:
    step_dir = checkpointer.step_dir(step)
    problem, verified = checkpointer.find_damage(step)
    state = data_follows = error = None
    if problem is None:
      state, data_follows, outcome, error = _try_restore(
          checkpointer, step, abstract_state, data_iterator, verified)
      if outcome == _OK:
        if not verified:
          log(f"Checkpoint step {step} has no checksums (the run stopped before writing "
              "them); restored without verifying its files.")
        return state, step, data_follows
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
  return None, 0, False


def resume(checkpointer: Checkpointer, abstract_state, data_iterator, steps_per_epoch: int,
           log) -> tuple:
  """Restores the latest usable checkpoint and positions the data: -> (state or None, step).

  The data continues at the saved position; when that position does not fit this run
  (checkpoint.restart_data_on_mismatch), at the start of the next epoch instead.
  """
  state, step, data_restored = restore_latest(checkpointer, abstract_state, data_iterator, log)
  if state is None:
    return None, 0
  if not data_restored:
    next_epoch = -(-step // steps_per_epoch)
    grain.experimental.set_next_index(data_iterator, next_epoch * steps_per_epoch)
  log(f"Resumed from {checkpointer.step_dir(step)} (step {step}), "
      + ("data position included." if data_restored else "data restarted at the next epoch."))
  return state, step


def export_info(config, class_names, step: int) -> dict:
  """What inference needs to know besides the weights: model, classes, preprocessing."""
  return {"step": step, "model": config.model.to_dict(), "num_classes": config.data.num_classes,
          "class_names": list(class_names), "image_size": config.data.image_size,
          "eval_resize": config.data.eval_resize, "mean": list(config.data.mean),
          "std": list(config.data.std)}


def export_variables(directory: str, state, info: dict) -> None:
  """Writes what inference needs: params, BatchNorm statistics and a JSON describing them.

  No optimizer state: the export is a fraction of a checkpoint and loads on any device count.
  """
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(workdir_lib.export_variables_dir(workdir_lib.orbax_path(directory)),
                    variables, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    workdir_lib.write_json(workdir_lib.export_info_path(directory), info)


def load_export(directory: str):
  """-> (variables {"params", "batch_stats"} as numpy-backed arrays, info dict)."""
  info = workdir_lib.read_export_info(directory)
  path = workdir_lib.export_variables_dir(workdir_lib.orbax_path(directory))
  checkpointer = ocp.StandardCheckpointer()
  # numpy targets: restored on the host, whatever device count saved it (orbax would
  # otherwise look for the saving run's devices)
  target = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                        checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, target), info
