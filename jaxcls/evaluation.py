"""Evaluation: one exact pass over a split, every example counted once over all hosts.

The eval pipeline pads the last batch and marks padding with mask=False; the compiled
eval_step (build.compile_eval_step) returns each example's probabilities replicated on every
process, so each process can compute (identical) exact metrics, and process 0 writes them.
"""

import jax
import numpy as np

from jaxcls import metrics, sharding
from jaxcls import workdir as workdir_lib
from jaxcls.data import pipeline

# The numbers an eval's progress line shows, when the result has them.
SHOWN = ("loss", "accuracy", "top5_accuracy", "f1_macro", "roc_auc_macro")


def evaluate(eval_step, state, eval_dataset, mesh, class_names, top_k=(1, 5),
             prefetch: int = 2) -> dict:
  """Runs the eval split once; returns metrics.classification_metrics plus the mean loss."""
  outputs = []
  for batch in pipeline.prefetch_to_device(eval_dataset, sharding.batch_sharding(mesh),
                                           prefetch):
    outputs.append(eval_step(state, batch))  # stays on the device until the pass is done
  outputs = jax.device_get(outputs)
  mask = np.concatenate([o["mask"] for o in outputs])
  probs = np.concatenate([o["probs"] for o in outputs])[mask]
  labels = np.concatenate([o["label"] for o in outputs])[mask]
  loss_sum = float(sum(np.float64(o["loss"]) for o in outputs))
  result = metrics.classification_metrics(probs, labels, class_names, top_k)
  result["loss"] = loss_sum / max(len(labels), 1)
  return result


def write_result(workdir: str, split: str, step: int, result: dict) -> str:
  """The run directory's eval file for (split, step), written by process 0; returns its path."""
  if jax.process_index() == 0:
    return workdir_lib.write_eval(workdir, split, step, result)
  return workdir_lib.eval_path(workdir, split, step)


class Evaluator:
  """The periodic and final evaluation of a training run: evaluate, write, report."""

  def __init__(self, config, eval_step, eval_dataset, mesh, class_names, workdir: str,
               reporter):
    self.config = config
    self.eval_step = eval_step
    self.dataset = eval_dataset
    self.mesh = mesh
    self.class_names = class_names
    self.workdir = workdir
    self.reporter = reporter

  def __call__(self, state, step: int) -> dict:
    """-> the scalar metrics (what metrics.jsonl and TensorBoard get)."""
    result = evaluate(self.eval_step, state, self.dataset, self.mesh, self.class_names,
                      tuple(self.config.eval_top_k), self.config.data.prefetch_batches)
    write_result(self.workdir, self.config.data.eval_split, step, result)
    scalars = metrics.scalar_summary(result)
    self.reporter.write(step, "eval", scalars)
    self.reporter.log(f"eval at step {step}: " + " | ".join(
        f"{k} {scalars[k]:.4f}" for k in SHOWN if k in scalars)
        + f" ({result['num_examples']} examples)")
    return scalars
