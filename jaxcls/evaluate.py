"""`python -m jaxcls.evaluate --workdir DIR [--step N] [--split NAME]`

Restores a checkpoint of a training run (the latest, or --step), evaluates it exactly on a
split (the config's eval split, or --split), prints a table (overall, then per class) and
writes it to the run directory's eval files. Runs on any device count: the state is
resharded onto a data-parallel mesh of the devices present.
"""

import argparse
import math
import sys

import jax

from jaxcls import build, evaluation, metrics, steps
from jaxcls.data import pipeline, sources
from jaxcls.errors import CheckpointError


def run(workdir: str, step: int | None = None, split: str | None = None) -> dict:
  parts = build.restore_for_inference(workdir, step)
  config, mesh = parts.config, parts.mesh
  split = split or config.data.eval_split
  source = sources.create_source(config.data, split)
  devices = math.prod(mesh.shape.values())
  batch_size = -(-config.eval_batch_size // devices) * devices  # a multiple of the devices
  eval_step = build.compile_eval_step(
      steps.make_eval_step(config.data), parts.state, parts.state_shardings, mesh,
      build.batch_spec(mesh, batch_size, config.data.image_size, with_mask=True))
  dataset = pipeline.create_eval_dataset(config.data, source, batch_size)
  result = evaluation.evaluate(eval_step, parts.state, dataset, mesh, source.class_names,
                               tuple(config.eval_top_k), config.data.prefetch_batches)
  path = evaluation.write_result(workdir, split, parts.step, result)
  if jax.process_index() == 0:
    print(f"{config.model.name} from {workdir}, step {parts.step}, split {split!r} "
          f"({result['num_examples']} examples):\n")
    print(metrics.format_table(result))
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
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
