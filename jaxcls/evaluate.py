"""`python -m jaxcls.evaluate --workdir DIR [--step N] [--split NAME]`

Restores a checkpoint of a training run (the latest, or --step), evaluates it exactly on a
split (the config's eval split, or --split), prints a table (overall, then per class) and
writes <workdir>/eval/<split>_<step>.json. Runs on any device count: the state is resharded
onto a data-parallel mesh of the devices present.
"""

import argparse
import json
import math
import os
import sys

import jax
import ml_collections

from jaxcls import checkpoint, evaluation, models, optim, sharding, steps, train
from jaxcls.data import pipeline, sources


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} the --workdir of a run?")
  with open(path, encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  # Inference needs no parameter sharding: every device takes a share of the batch.
  config.mesh.data, config.mesh.fsdp = -1, 1
  if "model" in config.mesh:
    config.mesh.model = 1
  return config


def restore_state(workdir: str, step: int | None = None):
  """-> (config, model, mesh, state, state_shardings, step) from a run's checkpoint."""
  config = load_run_config(workdir)
  mesh = sharding.make_mesh(config.mesh)
  model = models.create_model(config.model, config.data.num_classes)
  # The optimizer's state structure does not depend on the schedule: any one will do.
  tx = optim.create_optimizer(config.optim, optim.create_schedule(config.optim, 1, 1, 1))
  abstract_state, state_shardings = train.train_state_shapes(model, tx, config, mesh)
  checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint, 0,
                                         checkpoint.run_metadata(config))
  try:
    available = checkpointer.manager.all_steps()
    if not available:
      raise checkpoint.CheckpointError(f"No checkpoint in {checkpointer.directory}.")
    step = max(available) if step is None else step
    if step not in available:
      raise checkpoint.CheckpointError(
          f"No checkpoint for step {step} in {checkpointer.directory}; available: "
          f"{sorted(available)}.")
    state = checkpointer.restore(step, abstract_state, None, restore_data=False)
  finally:
    checkpointer.close()
  return config, model, mesh, state, state_shardings, step


def run(workdir: str, step: int | None = None, split: str | None = None) -> dict:
  config, model, mesh, state, state_shardings, step = restore_state(workdir, step)
  split = split or config.data.eval_split
  source = sources.create_source(config.data, split)
  devices = math.prod(mesh.shape.values())
  batch_size = -(-config.eval_batch_size // devices) * devices  # a multiple of the devices
  eval_step = evaluation.compile_eval_step(
      steps.make_eval_step(model, config.data), state, state_shardings, mesh,
      train.batch_spec(mesh, batch_size, config.data.image_size, with_mask=True))
  dataset = pipeline.create_eval_dataset(config.data, source, batch_size)
  result = evaluation.evaluate(eval_step, state, dataset, mesh, source.class_names,
                               tuple(config.eval_top_k), config.data.prefetch_batches)
  path = evaluation.write_result(workdir, split, step, result)
  if jax.process_index() == 0:
    print(f"{config.model.name} from {workdir}, step {step}, split {split!r} "
          f"({result['num_examples']} examples):\n")
    print(evaluation.format_table(result))
    print(f"\nwritten to {path}")
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description="Evaluate a checkpoint of a jaxcls run.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="default: the latest")
  parser.add_argument("--split", default=None, help="default: the run's config.data.eval_split")
  args = parser.parse_args(argv)
  try:
    run(args.workdir, args.step, args.split)
  except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
