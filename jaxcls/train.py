"""Training: the loop that resumes or initializes, steps, logs, evaluates, saves and stops.

`run(config, workdir)` is what `python -m jaxcls.main` and the notebooks call. Everything it
runs is built by jaxcls.build before the first batch; this module only drives it.
"""

import sys
import time

import jax

from jaxcls import build, checkpoint, config as config_lib, ema, evaluation, plots, preemption
from jaxcls import reporter as reporter_lib, resume, runlock, sharding, workdir as workdir_lib
from jaxcls.data import corrupt, pipeline


def run(config, workdir: str) -> dict:
  """Trains config's model on config's data, resuming from workdir's checkpoints if any.

  Returns the results written to the run directory; on SIGTERM / SIGINT it saves and
  returns {"preempted": True, ...} instead.
  """
  start_time = time.time()
  config_lib.check_config(config, jax.device_count(), jax.process_count())
  workdir_lib.check_usable(workdir)
  with runlock.hold(workdir, config.lock_lease_seconds):
    return _run(config, workdir, start_time)


def _run(config, workdir: str, start_time: float) -> dict:
  is_main = jax.process_index() == 0
  if is_main:
    workdir_lib.write_config(workdir, config)
  mesh = sharding.make_mesh(config.mesh)
  train_source, eval_source = build.create_sources(config)
  steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size,
                                             train_source.name)
  num_steps = build.total_train_steps(config, steps_per_epoch)
  if is_main:  # for predict and reports: the names behind the label indices, and bad images
    workdir_lib.write_classes(workdir, train_source.class_names)
    corrupt.write_skip_report(
        workdir, {config.data.train_split: train_source, config.data.eval_split: eval_source})

  reporter = reporter_lib.Reporter(workdir, num_steps, enabled=is_main)
  # The reporter closes even when the run fails: left to its atexit hook, the TensorBoard
  # writer cannot start its thread at interpreter shutdown (Python 3.12+) and prints a traceback.
  try:
    reporter.log(
        f"jaxcls: {config.model.name} on {train_source.name} ({len(train_source)} train / "
        f"{len(eval_source)} eval); {jax.device_count()} device(s) in {jax.process_count()} "
        f"process(es), mesh {dict(mesh.shape)}; {num_steps} steps of {config.batch_size}.")
    parts = build.training_parts(config, mesh, num_steps, steps_per_epoch)
    reporter.log(parts.compiled_message())
    batches = pipeline.train_batches_on_devices(config.data, train_source, config.batch_size,
                                                config.seed, sharding.batch_sharding(mesh),
                                                steps_per_epoch)
    evaluate = evaluation.Evaluator(
        config, parts.eval_step,
        pipeline.create_eval_dataset(config.data, eval_source, config.eval_batch_size),
        mesh, eval_source.class_names, workdir, reporter)
    checkpointer = checkpoint.Checkpointer(
        workdir, config.checkpoint, checkpoint.save_every_steps(config.checkpoint,
                                                                steps_per_epoch),
        checkpoint.run_metadata(config))
    guard = preemption.PreemptionGuard()
    try:
      with guard:  # the end of a run is as interruptible as its middle
        state, start_step = _resume_or_init(config, parts, mesh, batches, checkpointer,
                                            reporter, steps_per_epoch)
        outcome = _steps(config, parts, state, start_step, batches, evaluate, checkpointer,
                         reporter, steps_per_epoch, num_steps, guard)
        if outcome.get("preempted"):
          return outcome
        checkpointer.wait()  # the last step is on disk before the (long) final evaluation
        final = evaluate(outcome["state"], num_steps)
        if guard.any_process_received():  # during the evaluation: its step is saved
          reporter.log(f"Stopped by {guard.source} during the final evaluation; step "
                       f"{num_steps} is saved in {checkpointer.step_dir(num_steps)}. Run the "
                       "same command to evaluate and export it.")
          return {"preempted": True, "step": num_steps, "signal": guard.received}
        weights = ema.default_weights(config)  # the export says which it holds
        checkpoint.export_variables(
            workdir_lib.export_dir(workdir), ema.weights_for(outcome["state"], weights),
            {**checkpoint.export_info(config, train_source.class_names, num_steps),
             "weights": weights})
    finally:
      checkpointer.close()  # a pending async save completes even when training failed
      batches.close()  # the pipeline's threads and worker processes

    results = {"step": num_steps, "split": config.data.eval_split, "eval": final,
               "resumed_from_step": outcome["start_step"],
               "train_seconds": outcome["train_seconds"],
               "compile_seconds": parts.compile_seconds,
               "total_seconds": time.time() - start_time}
    if is_main:
      workdir_lib.write_results(workdir, results)
      plots.write_report(workdir)
    also = "".join(f", {name} {final[name]:.4f}" for name in
                   ("tta_accuracy", "ema_accuracy", "ema_tta_accuracy") if name in final)
    reporter.log(f"Done: {config.data.eval_split} accuracy {final['accuracy']:.4f}{also} after "
                 f"{num_steps} steps; {reporter_lib.format_duration(results['total_seconds'])} "
                 "in all.")
    return results
  finally:
    reporter.close(failing=sys.exc_info()[0] is not None)


def _resume_or_init(config, parts, mesh, batches, checkpointer, reporter,
                    steps_per_epoch: int) -> tuple:
  """-> (state, the step it is at): the latest usable checkpoint, else a new state."""
  state, start_step = None, 0
  if config.checkpoint.resume:
    state, start_step = resume.resume_training(checkpointer, parts.abstract_state, batches,
                                               steps_per_epoch, reporter.log)
  if state is None:  # a checkpoint wins over config.model.init_from
    state, _ = build.create_train_state(parts.model, parts.tx, config, mesh, reporter.log)
  reporter.truncate_after(start_step)
  return state, start_step


def _steps(config, parts, state, start_step: int, batches, evaluate, checkpointer, reporter,
           steps_per_epoch: int, num_steps: int, guard) -> dict:
  """Steps until num_steps or a signal; logs, evaluates and saves as the config says."""
  eval_every = int(round(config.eval_every_epochs * steps_per_epoch))
  log = reporter_lib.TrainLog(reporter, config.batch_size, steps_per_epoch, start_step,
                              num_steps)
  for step in range(start_step + 1, num_steps + 1):
    batch = next(batches)
    state, step_metrics = parts.train_step_for(batch)(state, batch)
    log.add(step, step_metrics)
    logged = step % config.log_every_steps == 0 or step == num_steps
    if logged:
      log.flush(step)
      checkpointer.record_checksums()  # of saves that finished since
    eval_results = None
    if eval_every and step % eval_every == 0 and step != num_steps:
      eval_results = evaluate(state, step)
    saving = checkpointer.should_save(step, num_steps)
    stop = guard.should_stop(host_waits=logged or saving or eval_results is not None)
    if saving or stop or (eval_results and config.checkpoint.best_metric):
      log.check_finite()  # never save a non-finite state
      # The position counts the batches this loop took, not those read ahead.
      blocked = checkpointer.save(step, state, batches.position, metrics=eval_results)
      reporter.write(step, "checkpoint", {"save_blocked_seconds": blocked})
    if stop:
      checkpointer.wait()
      reporter.log(f"Stopped by {guard.source} after step {step}; saved "
                   f"{checkpointer.step_dir(step)}. Run the same command to resume.")
      return {"preempted": True, "step": step, "signal": guard.received}
  return {"state": state, "start_step": start_step, "train_seconds": log.elapsed()}
