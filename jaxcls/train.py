"""The training loop: build everything from the config, train, evaluate, report.

`run(config, workdir)` is what `python -m jaxcls.main` and the notebooks call.
"""

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxcls import config as config_lib
from jaxcls import models, optim, report, sharding, steps
from jaxcls.data import pipeline, sources


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def create_train_state(model, tx, config, mesh):
  """Builds the train state directly in its sharded layout: shapes -> shardings -> init.

  No device ever holds a full copy of a parameter that the mesh splits.
  """
  init = lambda rng: steps.init_train_state(model, tx, config.data.image_size, rng)
  rng = jax.random.key(config.seed)
  abstract_state = jax.eval_shape(init, rng)
  state_shardings = sharding.state_shardings(mesh, abstract_state, config.mesh.fsdp_min_size)
  state = jax.jit(init, out_shardings=state_shardings)(rng)
  return state, state_shardings


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


def compile_eval_step(eval_step, state, state_shardings, mesh, config):
  spec = batch_spec(mesh, config.eval_batch_size, config.data.image_size, with_mask=True)
  batch_shardings = jax.tree.map(lambda s: s.sharding, spec)
  jitted = jax.jit(eval_step, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=sharding.replicated(mesh))
  return jitted.lower(state, spec).compile()


def evaluate(eval_step, state, eval_dataset, mesh, depth: int) -> dict:
  """One exact pass over the eval split: sums stay on the device until the end."""
  totals = None
  for batch in pipeline.prefetch_to_device(eval_dataset, sharding.batch_sharding(mesh), depth):
    sums = eval_step(state, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  return {
      "loss": float(totals["loss"]) / count,
      "accuracy": float(totals["correct"]) / count,
      "top5_accuracy": float(totals["correct_top5"]) / count,
      "num_examples": count,
  }


def mean_metrics(history: list) -> dict:
  """Fetches the per-step device metrics in one transfer and averages them."""
  fetched = jax.device_get(history)
  return {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}


def run(config, workdir: str) -> dict:
  """Trains config's model on config's data; returns the final eval metrics."""
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
  steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size)
  num_steps = total_train_steps(config, steps_per_epoch)
  eval_every = int(round(config.eval_every_epochs * steps_per_epoch))

  reporter = report.Reporter(workdir, num_steps, enabled=is_main)
  reporter.log(
      f"jaxcls: {config.model.name} on {train_source.name} ({len(train_source)} train / "
      f"{len(eval_source)} eval); {jax.device_count()} devices over {jax.process_count()} "
      f"process(es), mesh {dict(mesh.shape)}; {num_steps} steps of {config.batch_size}.")

  model = models.create_model(config.model, config.data.num_classes)
  schedule = optim.create_schedule(config.optim, config.batch_size, num_steps, steps_per_epoch)
  tx = optim.create_optimizer(config.optim, schedule)
  state, state_shardings = create_train_state(model, tx, config, mesh)

  compile_start = time.time()
  train_step = compile_train_step(
      steps.make_train_step(model, config.data, config.optim, schedule),
      state, state_shardings, mesh, config)
  eval_step = compile_eval_step(
      steps.make_eval_step(model, config.data), state, state_shardings, mesh, config)
  compile_seconds = time.time() - compile_start
  reporter.log(f"Compiled train and eval steps in {compile_seconds:.1f}s.")

  train_dataset = pipeline.create_train_dataset(
      config.data, train_source, config.batch_size, config.seed)
  eval_dataset = pipeline.create_eval_dataset(config.data, eval_source, config.eval_batch_size)
  batches = iter(pipeline.prefetch_to_device(
      train_dataset, sharding.batch_sharding(mesh), config.data.prefetch_batches))

  def run_eval(step):
    results = evaluate(eval_step, state, eval_dataset, mesh, config.data.prefetch_batches)
    reporter.write(step, "eval", results)
    reporter.log(f"eval at step {step}: loss {results['loss']:.4f} | accuracy "
                 f"{results['accuracy']:.4f} | top-5 {results['top5_accuracy']:.4f} "
                 f"({int(results['num_examples'])} examples)")
    return results

  history = []
  train_start = last_log_time = time.time()
  last_log_step = 0
  for step in range(1, num_steps + 1):
    state, metrics = train_step(state, next(batches))
    history.append(metrics)
    if step % config.log_every_steps == 0 or step == num_steps:
      summary = mean_metrics(history)  # the only host sync between log steps
      history = []
      if not math.isfinite(summary["loss"]):
        raise FloatingPointError(
            f"Loss became {summary['loss']} by step {step} (mean over steps "
            f"{last_log_step + 1}-{step}). Lower config.optim.learning_rate or check the data.")
      now = time.time()
      summary["images_per_sec"] = (step - last_log_step) * config.batch_size / (now - last_log_time)
      summary["epoch"] = step / steps_per_epoch
      eta = (now - train_start) / step * (num_steps - step)
      reporter.write(step, "train", summary)
      reporter.progress(step, summary, eta)
      last_log_time, last_log_step = now, step
    if eval_every and step % eval_every == 0 and step != num_steps:
      run_eval(step)

  train_seconds = time.time() - train_start
  final = run_eval(num_steps)
  results = {
      "step": num_steps,
      "split": config.data.eval_split,
      "eval": final,
      "train_seconds": train_seconds,
      "compile_seconds": compile_seconds,
      "total_seconds": time.time() - start_time,
  }
  if is_main:
    report.write_json(os.path.join(workdir, "eval", f"{config.data.eval_split}_{num_steps}.json"),
                      final)
    report.write_json(os.path.join(workdir, "results.json"), results)
  reporter.log(f"Done: {config.data.eval_split} accuracy {final['accuracy']:.4f} after "
               f"{num_steps} steps; {report.format_duration(results['total_seconds'])} in all.")
  reporter.close()
  return results
