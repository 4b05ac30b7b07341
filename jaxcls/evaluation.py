"""Evaluation: one exact pass over a split, every example counted once over all hosts.

The eval pipeline pads the last batch and marks padding with mask=False; the compiled
eval_step returns each example's probabilities replicated on every process, so each process
can compute (identical) exact metrics, and process 0 writes them.
"""

import os

import jax
import numpy as np

from jaxcls import metrics, report, sharding
from jaxcls.data import pipeline


def compile_eval_step(eval_step, state, state_shardings, mesh, batch_spec):
  """jit once: the batch sharded like training, outputs replicated (gathered for scoring)."""
  jitted = jax.jit(eval_step,
                   in_shardings=(state_shardings, jax.tree.map(lambda s: s.sharding, batch_spec)),
                   out_shardings=sharding.replicated(mesh))
  return jitted.lower(state, batch_spec).compile()


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
  """<workdir>/eval/<split>_<step>.json (process 0 only); returns the path."""
  path = os.path.join(workdir, "eval", f"{split}_{step}.json")
  if jax.process_index() == 0:
    report.write_json(path, {"split": split, "step": step, **result})
  return path


def format_table(result: dict) -> str:
  """A readable table: overall numbers, then one line per class."""
  lines = []
  lines.append(f"{'metric':<20}{'value':>10}")
  for name, value in metrics.scalar_summary(result).items():
    if name not in ("num_examples", "step"):
      lines.append(f"{name:<20}{value:>10.4f}")
  lines.append(f"{'examples':<20}{result['num_examples']:>10d}")
  if result["absent_classes"]:
    lines.append(f"absent from the labels (left out of macro averages): "
                 f"{', '.join(result['absent_classes'])}")
  per_class = result["per_class"]
  width = max(12, max(len(str(n)) for n in per_class["class_names"]) + 2)
  lines.append("")
  lines.append(f"{'class':<{width}}{'precision':>10}{'recall':>10}{'f1':>10}{'roc_auc':>10}"
               f"{'support':>10}")

  def cell(value):
    return f"{'-':>10}" if value is None else f"{value:>10.4f}"

  for i, name in enumerate(per_class["class_names"]):
    lines.append(f"{name:<{width}}{cell(per_class['precision'][i])}{cell(per_class['recall'][i])}"
                 f"{cell(per_class['f1'][i])}{cell(per_class['roc_auc'][i])}"
                 f"{per_class['support'][i]:>10d}")
  return "\n".join(lines)
