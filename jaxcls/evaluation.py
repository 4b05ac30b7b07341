"""Evaluation: one exact pass over a split, every example counted once over all hosts.

The eval pipeline pads the last batch and marks padding with mask=False; the compiled
eval_step (build.compile_eval_step) returns each example's log-probabilities sharded like the
batch. Each batch's outputs are copied to the host while the next batch runs, so the devices
never hold more than a couple of batches of scores; the exact metrics are computed once, on
process 0, which writes them and shares the single numbers with the other processes.

Other views of the same model are reported beside the plain one under a prefix: `tta_`
(test-time augmentation, config.eval_tta: the eval step's tta_scores) and, for a run that
keeps a weight EMA, `ema_` (a second pass with the averaged weights; `ema_tta_` with both).
"""

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxcls import ema as ema_lib
from jaxcls import metrics, sharding
from jaxcls import workdir as workdir_lib
from jaxcls.data import pipeline

# The numbers an eval's progress line shows, when the result has them.
SHOWN = ("loss", "accuracy", "top5_accuracy", "f1_macro", "roc_auc_macro", "tta_accuracy",
         "ema_loss", "ema_accuracy", "ema_tta_accuracy")


def _to_host(outputs) -> dict:
  """One batch's outputs as numpy: the whole global batch, on every process."""
  return multihost_utils.process_allgather(outputs, tiled=True)


def share_from_process_0(value):
  """Process 0's JSON-able value, on every process (two small broadcasts: size, bytes)."""
  if jax.process_count() == 1:
    return value
  is_source = jax.process_index() == 0
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_source else None
  size = int(multihost_utils.broadcast_one_to_all(np.int64(len(data) if is_source else 0)))
  data = multihost_utils.broadcast_one_to_all(data if is_source else np.zeros(size, np.uint8))
  return json.loads(np.asarray(data).tobytes())


def evaluate(eval_step, state, eval_dataset, mesh, class_names, top_k=(1, 5),
             prefetch: int = 2) -> dict:
  """Runs the eval split once -> metrics.classification_metrics plus the mean loss.

  On process 0 the whole result; on the others its single numbers (scalar_summary), which
  is all they use: the metrics are computed once.
  """
  host, pending = [], None
  for batch in pipeline.prefetch_to_device(eval_dataset, sharding.batch_sharding(mesh),
                                           prefetch):
    outputs = eval_step(state, batch)
    if pending is not None:  # the previous batch's copy overlaps this batch's compute
      host.append(_to_host(pending))
    pending = outputs
  if pending is not None:
    host.append(_to_host(pending))
  result = None
  if jax.process_index() == 0:
    result = _score(host, "", class_names, top_k)
    if host and "tta_scores" in host[0]:
      result.update(with_prefix("tta_", _score(host, "tta_", class_names, top_k)))
  shared = share_from_process_0(metrics.scalar_summary(result) if result else None)
  return result if result is not None else shared


def _score(host, prefix: str, class_names, top_k) -> dict:
  """The metrics of one kind of scores (prefix '' or 'tta_'), padding left out."""
  mask = np.concatenate([o["mask"] for o in host])
  scores = np.concatenate([o[prefix + "scores"] for o in host])[mask]
  labels = np.concatenate([o["label"] for o in host])[mask]
  result = metrics.classification_metrics(scores, labels, class_names, top_k)
  result["loss"] = float(sum(np.float64(o[prefix + "loss"]) for o in host)) / max(len(labels), 1)
  return result


def with_prefix(prefix: str, result: dict) -> dict:
  return {prefix + key: value for key, value in result.items()}


def evaluate_with_ema(eval_step, state, eval_dataset, mesh, class_names, top_k=(1, 5),
                      prefetch: int = 2) -> dict:
  """evaluate(); for a state that keeps a weight EMA, also the EMA weights' metrics, under
  `ema_` (one more pass over the split)."""
  result = evaluate(eval_step, state, eval_dataset, mesh, class_names, top_k, prefetch)
  if getattr(state, "ema", None) is not None:
    result.update(with_prefix("ema_", evaluate(
        eval_step, ema_lib.weights_for(state, "ema"), eval_dataset, mesh, class_names, top_k,
        prefetch)))
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
    result = evaluate_with_ema(self.eval_step, state, self.dataset, self.mesh,
                               self.class_names, tuple(self.config.eval_top_k),
                               self.config.data.prefetch_batches)
    write_result(self.workdir, self.config.data.eval_split, step, result)
    scalars = metrics.scalar_summary(result)
    self.reporter.write(step, "eval", scalars)
    self.reporter.log(f"eval at step {step}: " + " | ".join(
        f"{k} {scalars[k]:.4f}" for k in SHOWN if k in scalars)
        + f" ({result['num_examples']} examples)")
    return scalars
