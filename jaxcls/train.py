"""The training loop: build everything from the config, train, evaluate, report.

`run(config, workdir)` is what `python -m jaxcls.main` and the notebooks call.
"""

import math
import os
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import checkpoint
from jaxcls import config as config_lib
from jaxcls import evaluation, metrics, models, optim, plots, preemption, report, sharding, steps
from jaxcls.data import corrupt, pipeline, sources


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def train_state_shapes(model, tx, config, mesh):
  """-> (abstract train state with shardings, shardings): shapes only, nothing allocated."""
  abstract_state = jax.eval_shape(_state_initializer(model, tx, config), jax.random.key(0))
  state_shardings = sharding.state_shardings(mesh, abstract_state, config.mesh)
  return checkpoint.abstract_with_shardings(abstract_state, state_shardings), state_shardings


def _state_initializer(model, tx, config):
  return lambda rng: steps.init_train_state(model, tx, config.data.image_size, rng)


def create_train_state(model, tx, config, mesh):
  """Builds the train state directly in its sharded layout: shapes -> shardings -> init.

  No device ever holds a full copy of a parameter that the mesh splits.
  """
  _, state_shardings = train_state_shapes(model, tx, config, mesh)
  init = jax.jit(_state_initializer(model, tx, config), out_shardings=state_shardings)
  return init(jax.random.key(config.seed)), state_shardings


def batch_spec(mesh, global_batch_size: int, image_size: int, with_mask: bool = False):
  """Abstract global batch, for compiling the steps before the first batch arrives."""
  batch_sharding = sharding.batch_sharding(mesh)
  spec = {
      "image": jax.ShapeDtypeStruct((global_batch_size, image_size, image_size, 3), jnp.uint8,
                                    sharding=batch_sharding),
      "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32, sharding=batch_sharding),
  }
  if with_mask:
    spec["mask"] = jax.ShapeDtypeStruct((global_batch_size,), jnp.bool_, sharding=batch_sharding)
  return spec


def compile_train_step(train_step, state, state_shardings, mesh, config):
  """jit once with explicit shardings and a donated state; compiled ahead of the first batch."""
  spec = batch_spec(mesh, config.batch_size, config.data.image_size)
  batch_shardings = jax.tree.map(lambda s: s.sharding, spec)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))
  return jitted.lower(state, spec).compile()


def fetch_history(history: list) -> list:
  """[(step, device metrics)] -> [(step, host metrics)] in one transfer; raises on non-finite.

  The error names the first step whose loss or gradient norm was not finite.
  """
  fetched = jax.device_get(history)
  for step, values in fetched:
    bad = [k for k in ("loss", "grad_norm") if k in values and not np.isfinite(values[k])]
    if bad:
      raise FloatingPointError(
          f"Non-finite {' and '.join(bad)} at step {step} ({', '.join(f'{k}={values[k]}' for k in bad)}). "
          "No checkpoint was written from this state; the last good one stays the latest. "
          "Lower config.optim.learning_rate or check the data.")
  return fetched


def mean_metrics(fetched: list) -> dict:
  return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]}


def save_every_steps(ckpt_config, steps_per_epoch: int) -> int:
  if ckpt_config.every_steps > 0:
    return int(ckpt_config.every_steps)
  return max(1, int(round(ckpt_config.every_epochs * steps_per_epoch)))


def run(config, workdir: str) -> dict:
  """Trains config's model on config's data, resuming from workdir's checkpoints if any.

  Returns the results written to results.json; on SIGTERM / SIGINT it saves and returns
  {"preempted": True, ...} instead.
  """
  start_time = time.time()
  config_lib.check_config(config, jax.device_count(), jax.process_count())
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    report.write_json(os.path.join(workdir, "config.json"), config.to_dict())

  mesh = sharding.make_mesh(config.mesh)
  try:
    train_source = sources.create_source(config.data, config.data.train_split)
    eval_source = sources.create_source(config.data, config.data.eval_split)
  except ValueError as e:  # a missing path, split or class count: the message says which
    raise config_lib.ConfigError(str(e)) from None
  if config.batch_size > len(train_source):
    raise config_lib.ConfigError(
        f"config.batch_size={config.batch_size} is larger than the {len(train_source)} "
        f"training examples of {train_source.name}; lower it.")
  if is_main:  # for predict and reports: the names behind the label indices
    report.write_json(os.path.join(workdir, "classes.json"),
                      {"class_names": list(train_source.class_names)})
  if is_main:  # with config.data.skip_corrupt: the images left out, and why
    corrupt.write_skip_report(
        workdir, {config.data.train_split: train_source, config.data.eval_split: eval_source})
  steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size)
  num_steps = total_train_steps(config, steps_per_epoch)

  reporter = report.Reporter(workdir, num_steps, enabled=is_main)
  # The reporter closes even when the run fails: left to its atexit hook, the TensorBoard
  # writer cannot start its thread at interpreter shutdown (Python 3.12+) and prints a traceback.
  try:
    reporter.log(
        f"jaxcls: {config.model.name} on {train_source.name} ({len(train_source)} train / "
        f"{len(eval_source)} eval); {jax.device_count()} device(s) in {jax.process_count()} "
        f"process(es), mesh {dict(mesh.shape)}; {num_steps} steps of {config.batch_size}.")

    model = models.create_model(config.model, config.data.num_classes)
    schedule = optim.create_schedule(config.optim, config.batch_size, num_steps, steps_per_epoch)
    tx = optim.create_optimizer(config.optim, schedule)
    abstract_state, state_shardings = train_state_shapes(model, tx, config, mesh)

    compile_start = time.time()
    train_step = compile_train_step(
        steps.make_train_step(
            model, config.data, config.optim, schedule, config.grad_accum_steps,
            sharding.grad_shardings(mesh, abstract_state.params, config.mesh), seed=config.seed),
        abstract_state, state_shardings, mesh, config)
    eval_step = evaluation.compile_eval_step(
        steps.make_eval_step(model, config.data), abstract_state, state_shardings, mesh,
        batch_spec(mesh, config.eval_batch_size, config.data.image_size, with_mask=True))
    compile_seconds = time.time() - compile_start
    reporter.log(f"Compiled train and eval steps in {compile_seconds:.1f}s.")

    train_dataset = pipeline.create_train_dataset(
        config.data, train_source, config.batch_size, config.seed)
    eval_dataset = pipeline.create_eval_dataset(config.data, eval_source, config.eval_batch_size)
    batches = iter(pipeline.prefetch_to_device(
        train_dataset, sharding.batch_sharding(mesh), config.data.prefetch_batches))

    def run_eval(state, step):
      result = evaluation.evaluate(eval_step, state, eval_dataset, mesh, eval_source.class_names,
                                   tuple(config.eval_top_k), config.data.prefetch_batches)
      evaluation.write_result(workdir, config.data.eval_split, step, result)
      scalars = metrics.scalar_summary(result)
      reporter.write(step, "eval", scalars)
      shown = ("loss", "accuracy", "top5_accuracy", "f1_macro", "roc_auc_macro")
      reporter.log(f"eval at step {step}: " + " | ".join(
          f"{k} {scalars[k]:.4f}" for k in shown if k in scalars)
          + f" ({result['num_examples']} examples)")
      return scalars

    checkpointer = checkpoint.Checkpointer(
        workdir, config.checkpoint, save_every_steps(config.checkpoint, steps_per_epoch),
        checkpoint.run_metadata(config))
    try:
      # Resume from the latest checkpoint, or initialize.
      state, start_step = None, 0
      if config.checkpoint.resume:
        state, start_step, data_restored = checkpoint.restore_latest(
            checkpointer, abstract_state, batches, reporter.log)
      if state is not None:
        if not data_restored:
          # The saved position does not fit this run: restart the data at the next epoch.
          next_epoch = -(-start_step // steps_per_epoch)
          grain.experimental.set_next_index(batches, next_epoch * steps_per_epoch)
        reporter.log(f"Resumed from {checkpointer.step_dir(start_step)} (step {start_step}), "
                     + ("data position included." if data_restored else
                        "data restarted at the next epoch."))
      else:
        state, _ = create_train_state(model, tx, config, mesh)
      reporter.truncate_after(start_step)

      # Train.
      eval_every = int(round(config.eval_every_epochs * steps_per_epoch))
      history = []  # (step, device metrics) since the last log step
      train_start = last_log_time = time.time()
      last_log_step = start_step
      with preemption.PreemptionGuard(config.checkpoint.preemption_check_steps) as guard:
        for step in range(start_step + 1, num_steps + 1):
          state, step_metrics = train_step(state, next(batches))
          history.append((step, step_metrics))
          if step % config.log_every_steps == 0 or step == num_steps:
            fetched = fetch_history(history)  # the only host sync between log steps
            history = []
            summary = mean_metrics(fetched)
            now = time.time()
            summary["images_per_sec"] = ((step - last_log_step) * config.batch_size /
                                         (now - last_log_time))
            summary["epoch"] = step / steps_per_epoch
            eta = (now - train_start) / (step - start_step) * (num_steps - step)
            reporter.write(step, "train", summary)
            reporter.progress(step, summary, eta)
            last_log_time, last_log_step = now, step
          eval_results = None
          if eval_every and step % eval_every == 0 and step != num_steps:
            eval_results = run_eval(state, step)
          stop = guard.should_stop(step)
          if (checkpointer.should_save(step, num_steps) or stop
              or (eval_results and config.checkpoint.best_metric)):
            fetch_history(history)  # never save a non-finite state
            blocked = checkpointer.save(step, state, batches, metrics=eval_results)
            reporter.write(step, "checkpoint", {"save_blocked_seconds": blocked})
          if stop:
            checkpointer.wait()
            reporter.log(f"Stopped by {guard.received or 'a signal to another process'} after "
                         f"step {step}; saved "
                         f"{checkpointer.step_dir(step)}. Run the same command to resume.")
            return {"preempted": True, "step": step, "signal": guard.received}
      train_seconds = time.time() - train_start

      # Evaluate and export.
      final = run_eval(state, num_steps)
      checkpoint.export_variables(checkpoint.export_dir(workdir), state, {
          "step": num_steps, "model": config.model.to_dict(),
          "num_classes": config.data.num_classes, "class_names": list(train_source.class_names),
          "image_size": config.data.image_size, "eval_resize": config.data.eval_resize,
          "mean": list(config.data.mean), "std": list(config.data.std)})
    finally:
      checkpointer.close()  # a pending async save completes even when training failed

    results = {
        "step": num_steps,
        "split": config.data.eval_split,
        "eval": final,
        "resumed_from_step": start_step,
        "train_seconds": train_seconds,
        "compile_seconds": compile_seconds,
        "total_seconds": time.time() - start_time,
    }
    if is_main:
      report.write_json(os.path.join(workdir, "results.json"), results)
      plots.write_report(workdir)
    reporter.log(f"Done: {config.data.eval_split} accuracy {final['accuracy']:.4f} after "
                 f"{num_steps} steps; {report.format_duration(results['total_seconds'])} in all.")
    return results
  finally:
    reporter.close()
