"""Checkpoints: the train state and every process's data position, saved together with orbax.

A step directory `<workdir>/checkpoints/<step>` holds three items:
  state          the TrainState (step, params, BatchNorm statistics, optimizer state),
                 sharded: each process writes the shards it holds; restore reshards onto
                 whatever mesh is current
  data_position  JSON: the index of the next train batch (data/position.py), so the input
                 resumes at the exact next batch with any number of worker processes
  meta           JSON: what the state's structure depends on, to refuse an incompatible
                 --config
Steps written before the data_position item have `data` instead: each process's grain
iterator state, read back as the same index.
The RNG needs no item of its own: every random number of a step derives from the config's
seed and `state.step`.

orbax writes a step into a temporary directory and renames it when every process is done,
so a kill at any moment leaves either a complete step or none. Once a step is final, process
0 records each file's size and CRC-32 in it (integrity.py); resume.py checks them before a
restore and decides which step a run continues from.
"""

import concurrent.futures
import contextlib
import errno
import json
import logging
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxcls import distributed, ema, integrity, models, storage
from jaxcls import workdir as workdir_lib
from jaxcls.data import position as position_lib
from jaxcls.errors import CheckpointError, ConfigError, check_at_least

# Keys whose change alters the train state's structure or shapes: a checkpoint saved under
# other values cannot be restored into this run's state.
STATE_KEYS = ("model.name", "model.width", "model.stem", "data.num_classes")
# The same, for keys that came later: a checkpoint without them had these values.
LATER_STATE_KEYS = {"optim.name": "sgd", "ema.decay > 0": False,
                    "model.downsample": models.CNN_OPTIONS["downsample"]}
# Keys whose change makes the saved data position meaningless (it counts batches of a given
# size over a given number of per-process shares).
DATA_KEYS = ("batch_size", "process_count", "data.source", "data.train_split", "seed")


def check_config(ckpt_config) -> None:
  check_at_least("checkpoint.keep", ckpt_config.keep, 1, integer=True)
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
  values["optim.name"] = config.optim.get("name", "sgd")
  values["ema.decay > 0"] = ema.enabled(config)  # an EMA adds arrays to the state
  # Same arrays, another network: the cnn's layout (models/cnn.py); the ResNets ignore it.
  values["model.downsample"] = models.downsample_of(config.model)
  return values


class Checkpointer:
  """Saves and restores {state, data_position, meta} under <workdir>/checkpoints.

  `read_only=True` is for tools that read a run that may still be training (evaluate,
  predict): such a manager never creates, cleans up or deletes anything in the directory.
  """

  def __init__(self, workdir, ckpt_config, save_every_steps: int, metadata: dict,
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
        workdir_lib.orbax_path(self.directory), item_names=("state", "data_position", "meta", _GRAIN_ITEM),
        options=options)
    self.last_save_blocked_seconds = 0.0
    self._unrecorded = set()  # steps saved here whose checksums are not written yet
    self._saving_step, self._save_bytes = None, 0
    self._checksum_thread = concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix="jaxcls-checksums")
    self._checksums_written = None  # the thread's latest job
    _quiet_disk_full_noise()

  def latest_step(self):
    return self.manager.latest_step()

  def step_dir(self, step: int) -> str:
    return str(ocp.step.build_step_path(self.directory, ocp.step.standard_name_format(), step))

  def should_save(self, step: int, last_step: int) -> bool:
    return step == last_step or (self.save_every_steps > 0 and step % self.save_every_steps == 0)

  def save(self, step: int, state, next_batch: int, metrics: dict | None = None) -> float:
    """Starts a save of the state and the index of the next train batch the loop takes;
    returns the seconds it blocked the caller (the rest runs in the background)."""
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
    free = storage.free_bytes(self.directory)  # None in a bucket: no disk to fill
    if distributed.agree_on_max(int(free is not None and free < self._save_bytes)):
      raise self._disk_full_error()
    with self._disk_full_is_one_line():
      self.manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data_position=ocp.args.JsonSave(position_lib.to_record(next_batch)),
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
    free = storage.free_bytes(self.directory) or 0
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
    saved = {**LATER_STATE_KEYS, **saved}
    changed = [k for k in (*STATE_KEYS, *LATER_STATE_KEYS) if saved.get(k) != self.metadata[k]]
    if changed:
      details = ", ".join(f"config.{k}: checkpoint {saved.get(k)!r}, now {self.metadata[k]!r}"
                          for k in changed)
      raise CheckpointError(
          f"The checkpoint in {self.step_dir(step)} was trained with another model ({details}). "
          "Use a new --workdir for a different model, or set the config back.")
    return all(saved.get(k) == self.metadata[k] for k in DATA_KEYS)

  def restore(self, step: int, abstract_state):
    """The train state, resharded onto abstract_state's shardings."""
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def read_data_position(self, step: int) -> int:
    """The index of the next train batch saved in the step (also from a step of before the
    data_position item); a position it cannot read is a CheckpointError."""
    where = self.step_dir(step)
    if "data_position" in self.manager.item_metadata(step):
      restored = self.manager.restore(
          step, args=ocp.args.Composite(data_position=ocp.args.JsonRestore()))
      return position_lib.from_record(restored["data_position"], where)
    saved = _SavedGrainState()
    self.manager.restore(step, args=ocp.args.Composite(
        **{_GRAIN_ITEM: grain.checkpoint.CheckpointRestore(saved)}))
    return position_lib.from_grain_state(saved.state, where)

  def set_aside(self, step: int) -> str:
    """Moves a damaged step out of the way (never deletes it) so later saves can use the name."""
    target = workdir_lib.damaged_checkpoint_dir(self.workdir, step, int(time.time()))
    if jax.process_index() == 0:
      storage.move(self.step_dir(step), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"jaxcls_set_aside_{step}")
    self.manager.reload()
    return str(target)

  def record_checksums(self) -> None:
    """Starts writing the checksums of the steps saved here that are final by now.

    Called before each save, at log steps and at the end; process 0 reads the files in a
    thread of its own (0.11 s for a ResNet-50 step here, benchmarks/README.md), so the loop
    does not wait.
    A kill before they are written leaves the newest step without them: it is restored
    unverified.
    """
    if not self._unrecorded or self.manager.is_saving_in_progress():
      return
    steps = sorted(self._unrecorded & set(self.manager.all_steps()))
    self._unrecorded.clear()
    if jax.process_index() == 0 and steps:
      self._checksums_written = self._checksum_thread.submit(self._write_checksums, steps)

  def _write_checksums(self, steps) -> None:
    for step in steps:
      try:
        integrity.write_checksums(self.step_dir(step))
      except FileNotFoundError:
        pass  # deleted meanwhile by the keep policy

  def wait(self) -> None:
    """Until every save started here is on disk with its checksums."""
    with self._disk_full_is_one_line():
      self.manager.wait_until_finished()
    self.record_checksums()
    if self._checksums_written is not None:
      self._checksums_written.result()

  def close(self) -> None:
    try:
      self.wait()
    finally:  # even after a failed save, or orbax's threads outlive their event loop
      self._checksum_thread.shutdown(wait=True)
      try:
        self.manager.close()
      except Exception as e:  # the same failed save, already raised by wait() or save()
        if not _is_disk_full(e):
          raise

# The item of grain iterator states in steps written before data_position.
_GRAIN_ITEM = "data"


class _SavedGrainState:
  """Takes the state grain's checkpoint handler reads (it hands a non-grain iterator the
  file's bytes), without building the pipeline it came from."""

  state = None

  def set_state(self, state: bytes) -> None:
    self.state = json.loads(state)

  def start_prefetch(self) -> None:
    pass

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


def newest_step_note(workdir: str) -> str:
  """A sentence naming the newest finished checkpoint of a run, for a message that ends it."""
  directory = workdir_lib.checkpoints_dir(workdir)
  try:
    steps = ocp.path.step.checkpoint_steps(workdir_lib.orbax_path(directory))
  except OSError:
    steps = []
  if not steps:
    return "No checkpoint was saved yet."
  return f"The newest checkpoint is step {max(steps)} in {directory}."


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
