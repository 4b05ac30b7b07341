"""`python -m jaxcls.evaluate --workdir DIR [--step N] [--split NAME] [--weights raw|ema]
[--tta none|flip|flip_shift]`

Restores a checkpoint of a training run (the latest, or --step), evaluates it exactly on a
split (the config's eval split, or --split), prints a table (overall, then per class) and
writes it to the run directory's eval files. Runs on any device count: the state is
resharded onto a data-parallel mesh of the devices present.

--weights: a run that kept a weight EMA is evaluated with it unless config.ema.
use_for_inference was False or --weights raw (the result records which). --tta flip (or
flip_shift) adds the metrics of the views' average (tta_*); the default is the run's
config.eval_tta.
"""

import argparse
import math
import sys

import jax

from jaxcls import build, ema, evaluation, metrics, steps
from jaxcls.data import pipeline, sources
from jaxcls.errors import CheckpointError


def run(workdir: str, step: int | None = None, split: str | None = None,
        weights: str | None = None, tta: str | None = None) -> dict:
  parts = build.restore_for_inference(workdir, step)
  config, mesh = parts.config, parts.mesh
  split = split or config.data.eval_split
  weights = weights or ema.default_weights(config)
  state = ema.weights_for(parts.state, weights)
  tta = tta or config.get("eval_tta", "none")
  source = sources.create_source(config.data, split)
  devices = math.prod(mesh.shape.values())
  batch_size = -(-config.eval_batch_size // devices) * devices  # a multiple of the devices
  eval_step = build.compile_eval_step(
      steps.make_eval_step(config.data, tta), state, parts.state_shardings, mesh,
      build.batch_spec(mesh, batch_size, config.data.image_size, with_mask=True))
  dataset = pipeline.create_eval_dataset(config.data, source, batch_size)
  result = evaluation.evaluate(eval_step, state, dataset, mesh, source.class_names,
                               tuple(config.eval_top_k), config.data.prefetch_batches)
  result["weights"] = weights
  path = evaluation.write_result(workdir, split, parts.step, result)
  if jax.process_index() == 0:
    print(f"{config.model.name} from {workdir}, step {parts.step}, {weights} weights, split "
          f"{split!r} ({result['num_examples']} examples):\n")
    print(metrics.format_table(result))
    print(f"\nwritten to {path}")
  return result


def main(argv=None):
  parser = argparse.ArgumentParser(description="Evaluate a checkpoint of a jaxcls run.")
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="default: the latest")
  parser.add_argument("--split", default=None, help="default: the run's config.data.eval_split")
  parser.add_argument("--weights", choices=ema.WEIGHTS, default=None,
                      help="'ema': the run's weight EMA; default: as config.ema says")
  parser.add_argument("--tta", choices=steps.TTA, default=None,
                      help="test-time augmentation; default: the run's config.eval_tta")
  args = parser.parse_args(argv)
  try:
    run(args.workdir, args.step, args.split, args.weights, args.tta)
  except (FileNotFoundError, ValueError, CheckpointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  main()
