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
so a kill at any moment leaves either a complete step or none.
"""

import shutil
import time

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from jaxcls import workdir as workdir_lib
from jaxcls.errors import CheckpointError, ConfigError

# Keys whose change alters the train state's structure or shapes: a checkpoint saved under
# other values cannot be restored into this run's state.
STATE_KEYS = ("model.name", "model.width", "model.stem", "data.num_classes")
# Keys whose change makes the saved data position meaningless (it counts batches of a given
# size over a given number of per-process shares).
DATA_KEYS = ("batch_size", "process_count", "data.source", "data.train_split", "seed")


def check_config(ckpt_config) -> None:
  if ckpt_config.keep < 1:
    raise ConfigError(f"config.checkpoint.keep={ckpt_config.keep} must be at least 1.")
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
  """Saves and restores {state, data, meta} under <workdir>/checkpoints."""

  def __init__(self, workdir: str, ckpt_config, save_every_steps: int, metadata: dict):
    self.workdir = workdir
    self.directory = workdir_lib.checkpoints_dir(workdir)
    self.config = ckpt_config
    self.save_every_steps = save_every_steps
    self.metadata = metadata
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
        self.directory, item_names=("state", "data", "meta"), options=options)
    self.last_save_blocked_seconds = 0.0

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
    self.manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(data_iterator),
            meta=ocp.args.JsonSave(self.metadata)),
        metrics=metrics)
    self.last_save_blocked_seconds = time.perf_counter() - start
    return self.last_save_blocked_seconds

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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def restore_latest(checkpointer: Checkpointer, abstract_state, data_iterator, log) -> tuple:
  """Restores the newest usable checkpoint: -> (state or None, step, data_restored).

  A damaged newest step is an error naming its directory; with
  config.checkpoint.fallback_to_previous the step is set aside and the one before is tried.
  """
  config = checkpointer.config
  for step in sorted(checkpointer.manager.all_steps(), reverse=True):
    try:
      saved = checkpointer.read_metadata(step)
      data_follows = checkpointer.check_compatible(step, saved)
      if not data_follows and not config.restart_data_on_mismatch:
        changed = [f"{k}: checkpoint {saved.get(k)!r}, now {checkpointer.metadata[k]!r}"
                   for k in DATA_KEYS if saved.get(k) != checkpointer.metadata[k]]
        raise CheckpointError(
            f"The data position saved in {checkpointer.step_dir(step)} does not fit this run "
            f"({'; '.join(changed)}). Set --config.checkpoint.restart_data_on_mismatch=True "
            "to keep the model and optimizer state and restart the data at the next epoch.")
      state = checkpointer.restore(step, abstract_state, data_iterator, data_follows)
      return state, step, data_follows
    except CheckpointError:
      raise
    except Exception as e:  # a damaged step: orbax and tensorstore raise many kinds
      if not config.fallback_to_previous:
        raise CheckpointError(
            f"The checkpoint in {checkpointer.step_dir(step)} cannot be read "
            f"({type(e).__name__}: {str(e)[:300]}). Set "
            "--config.checkpoint.fallback_to_previous=True to set it aside and resume from the "
            "previous step.") from e
      moved = checkpointer.set_aside(step)
      log(f"Checkpoint step {step} is damaged ({type(e).__name__}); moved it to {moved} and "
          "trying the previous step.")
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
  checkpointer.save(workdir_lib.export_variables_dir(directory), variables, force=True)
  checkpointer.wait_until_finished()
  if jax.process_index() == 0:
    workdir_lib.write_json(workdir_lib.export_info_path(directory), info)


def load_export(directory: str):
  """-> (variables {"params", "batch_stats"} as numpy-backed arrays, info dict)."""
  info = workdir_lib.read_export_info(directory)
  path = workdir_lib.export_variables_dir(directory)
  checkpointer = ocp.StandardCheckpointer()
  # numpy targets: restored on the host, whatever device count saved it (orbax would
  # otherwise look for the saving run's devices)
  target = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype),
                        checkpointer.metadata(path).item_metadata.tree)
  return checkpointer.restore(path, target), info
