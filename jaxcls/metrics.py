"""Exact classification metrics over a whole eval split, from every example's scores.

Everything here is numpy on the host, computed from the complete set of (scores, label)
pairs: no thresholds grid, no streaming approximation, and no Python loop over examples or
over runs of tied scores (50,000 x 1,000 takes seconds on one core: benchmarks/eval_metrics.py).
Scores are probabilities or any increasing function of them (not logits: a row's shift
changes how a class's column ranks); evaluation passes log-probabilities, which keep apart
what a float32 softmax would round to equal (ties change ROC-AUC).

Classes absent from the split's labels: their recall, F1 and ROC-AUC are undefined, so they
are reported as null and listed in `absent_classes`, and left out of the macro averages (the
weighted averages give them weight 0 anyway). Their precision is still defined when the model
predicts them (it is then 0) and is reported, but also left out of the macro average, so
every macro average is over the same classes: those present in the labels.
"""

import numpy as np


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
  """counts[true, predicted]."""
  return np.bincount(labels * num_classes + predictions,
                     minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def top_k_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
  """Fraction of examples whose label is among the k highest scores (ties: lower index wins)."""
  k = min(k, scores.shape[1])
  # A label is in the top k iff fewer than k classes score strictly higher, counting equal
  # scores at lower indices as higher (the order a stable descending sort would give).
  label_scores = scores[np.arange(len(labels)), labels][:, None]
  indices = np.arange(scores.shape[1])[None, :]
  ahead = (scores > label_scores) | ((scores == label_scores) & (indices < labels[:, None]))
  return float(np.mean(np.count_nonzero(ahead, axis=1) < k))


def _pairs_below(sorted_scores: np.ndarray, positive_scores: np.ndarray) -> float:
  """Sum over the positives of (#scores below it + 1/2 #scores equal to it, itself included)."""
  below = np.searchsorted(sorted_scores, positive_scores, "left")
  up_to = np.searchsorted(sorted_scores, positive_scores, "right")
  return float(below.sum()) + 0.5 * float((up_to - below).sum())


def _auc(pairs_below: np.ndarray, num_pos: np.ndarray, num_neg: np.ndarray) -> np.ndarray:
  """The Mann-Whitney statistic: positive-negative pairs ranked right, ties counted 1/2.

  pairs_below counts every score (negatives and positives); the positives' own pairs add
  num_pos**2 / 2 (each pair once, each positive's tie with itself 1/2), taken off here.
  NaN where a class has no positive or no negative.
  """
  defined = (num_pos > 0) & (num_neg > 0)
  pairs = np.where(defined, num_pos * num_neg, 1).astype(np.float64)
  return np.where(defined, (pairs_below - num_pos.astype(np.float64)**2 / 2) / pairs, np.nan)


def binary_roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
  """Exact area under the ROC curve: the Mann-Whitney statistic with tied scores counted 1/2
  (what scikit-learn's roc_auc_score gives)."""
  scores, positive = np.asarray(scores), np.asarray(positive, bool)
  num_pos = np.array(positive.sum())
  below = _pairs_below(np.sort(scores), scores[positive])
  return float(_auc(np.array(below), num_pos, len(positive) - num_pos))


def one_vs_rest_roc_auc(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """binary_roc_auc(scores[:, c], labels == c) for every class c, as a [C] array.

  One sort of each class's column; each example is a positive of its own class only, so
  the positives of all classes together are the N examples, looked up once each.
  """
  num_examples, num_classes = scores.shape
  num_pos = np.bincount(labels, minlength=num_classes)
  columns = np.sort(np.ascontiguousarray(scores.T), axis=1)
  own_scores = scores[np.arange(num_examples), labels]
  by_class = np.argsort(labels, kind="stable")
  ends = np.cumsum(num_pos)
  below = np.zeros(num_classes)
  for c in np.flatnonzero(num_pos):
    below[c] = _pairs_below(columns[c], own_scores[by_class[ends[c] - num_pos[c]:ends[c]]])
  return _auc(below, num_pos, num_examples - num_pos)


def _divide(numerator, denominator):
  """numerator / denominator, and 0 where the denominator is 0 (as scikit-learn does)."""
  safe = np.where(denominator > 0, denominator, 1)
  return np.where(denominator > 0, numerator / safe, 0.0)


def _none_if_nan(values):
  return [None if np.isnan(v) else float(v) for v in values]


def classification_metrics(scores: np.ndarray, labels: np.ndarray, class_names,
                           top_k=(1, 5)) -> dict:
  """All metrics for one split. scores: [N, C] probabilities or log-probabilities (any
  increasing function of the probabilities gives the same result), labels: [N]."""
  scores = np.asarray(scores)
  if not np.issubdtype(scores.dtype, np.floating):
    scores = scores.astype(np.float64)
  labels = np.asarray(labels, np.int64)
  num_examples, num_classes = scores.shape
  predictions = np.argmax(scores, axis=1)
  confusion = confusion_matrix(labels, predictions, num_classes)
  support = confusion.sum(axis=1)
  predicted = confusion.sum(axis=0)
  true_positives = np.diag(confusion)
  present = support > 0

  precision = _divide(true_positives, predicted)  # 0 for a class never predicted
  recall = np.where(present, _divide(true_positives, support), np.nan)
  f1 = np.where(present, _divide(2 * precision * np.nan_to_num(recall),
                                 precision + np.nan_to_num(recall)), np.nan)
  auc = one_vs_rest_roc_auc(scores, labels)

  weights = support / max(num_examples, 1)

  def macro(values):
    usable = present & ~np.isnan(values)
    return float(np.mean(values[usable])) if usable.any() else None

  def weighted(values):
    return float(np.nansum(np.where(present, values, 0.0) * weights))

  result = {
      "num_examples": int(num_examples),
      "accuracy": float(np.mean(predictions == labels)) if num_examples else 0.0,
      "precision_macro": macro(precision),
      "recall_macro": macro(recall),
      "f1_macro": macro(f1),
      "precision_weighted": weighted(precision),
      "recall_weighted": weighted(recall),
      "f1_weighted": weighted(f1),
      "roc_auc_macro": macro(auc),
      "absent_classes": [class_names[c] for c in np.flatnonzero(~present)],
      "per_class": {
          "class_names": list(class_names),
          "support": support.tolist(),
          "precision": [float(p) for p in precision],
          "recall": _none_if_nan(recall),
          "f1": _none_if_nan(f1),
          "roc_auc": _none_if_nan(auc),
      },
      "confusion_matrix": confusion.tolist(),
  }
  for k in top_k:
    if k > 1 and k < num_classes:
      result[f"top{k}_accuracy"] = top_k_accuracy(scores, labels, k)
  return result


def scalar_summary(result: dict) -> dict:
  """The single numbers of a result (for metrics.jsonl and TensorBoard); None is skipped."""
  return {k: v for k, v in result.items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def format_table(result: dict) -> str:
  """A readable table: overall numbers, then one line per class."""
  lines = []
  lines.append(f"{'metric':<20}{'value':>10}")
  for name, value in scalar_summary(result).items():
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
