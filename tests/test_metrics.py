"""Exact classification metrics, checked against scikit-learn."""

import json

import numpy as np
import pytest
from sklearn import metrics as skm

from jaxcls import metrics

NAMES = [f"class_{i}" for i in range(6)]


def random_case(seed, num_examples=300, num_classes=6, absent=()):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_examples)
  for c in absent:
    labels[labels == c] = (c + 1) % num_classes
  logits = rng.normal(size=(num_examples, num_classes)) + 1.5 * np.eye(num_classes)[labels]
  probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  return probs.astype(np.float32), labels


def check_against_sklearn(probs, labels):
  result = metrics.classification_metrics(probs, labels, NAMES, top_k=(1, 3, 5))
  predictions = probs.argmax(1)
  present = sorted(set(labels.tolist()))
  all_classes = list(range(probs.shape[1]))
  assert result["accuracy"] == pytest.approx(skm.accuracy_score(labels, predictions))
  for k in (3, 5):
    assert result[f"top{k}_accuracy"] == pytest.approx(
        skm.top_k_accuracy_score(labels, probs, k=k, labels=all_classes))
  np.testing.assert_array_equal(result["confusion_matrix"],
                                skm.confusion_matrix(labels, predictions, labels=all_classes))
  p, r, f, support = skm.precision_recall_fscore_support(
      labels, predictions, labels=all_classes, zero_division=0)
  per_class = result["per_class"]
  np.testing.assert_allclose(per_class["precision"], p)
  np.testing.assert_array_equal(per_class["support"], support)
  for c in all_classes:
    if c in present:
      assert per_class["recall"][c] == pytest.approx(r[c])
      assert per_class["f1"][c] == pytest.approx(f[c])
      assert per_class["roc_auc"][c] == pytest.approx(
          skm.roc_auc_score(labels == c, probs[:, c]))
    else:  # absent: undefined, reported as None, never NaN
      assert per_class["recall"][c] is None and per_class["roc_auc"][c] is None
  for average in ("macro", "weighted"):
    p, r, f, _ = skm.precision_recall_fscore_support(
        labels, predictions, labels=present, average=average, zero_division=0)
    assert result[f"precision_{average}"] == pytest.approx(p)
    assert result[f"recall_{average}"] == pytest.approx(r)
    assert result[f"f1_{average}"] == pytest.approx(f)
  aucs = [skm.roc_auc_score(labels == c, probs[:, c]) for c in present]
  assert result["roc_auc_macro"] == pytest.approx(np.mean(aucs))
  json.dumps(result, allow_nan=False)  # no NaN anywhere in what gets written
  return result


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearn_on_random_logits(seed):
  check_against_sklearn(*random_case(seed))


def test_absent_class_is_reported_and_left_out_of_macro_averages():
  probs, labels = random_case(3, absent=(2,))
  result = check_against_sklearn(probs, labels)
  assert result["absent_classes"] == ["class_2"]
  assert result["per_class"]["support"][2] == 0


def test_perfectly_separable_case():
  labels = np.repeat(np.arange(6), 5)
  probs = np.eye(6)[labels] * 0.9 + 0.02
  result = check_against_sklearn(probs, labels)
  assert result["accuracy"] == 1.0 and result["f1_macro"] == 1.0
  assert result["roc_auc_macro"] == 1.0


def test_roc_auc_with_tied_scores_matches_sklearn():
  rng = np.random.default_rng(5)
  scores = rng.integers(0, 4, 200).astype(np.float64)  # many ties
  positive = rng.random(200) < 0.3
  assert metrics.binary_roc_auc(scores, positive) == pytest.approx(
      skm.roc_auc_score(positive, scores))


def test_one_vs_rest_roc_auc_with_ties_equals_sklearn_per_class():
  """2,000 examples, 40 classes, scores rounded to 1/8 (runs of ties everywhere), one class
  absent and one that is the label of a single example."""
  rng = np.random.default_rng(7)
  labels = rng.integers(0, 40, 2000)
  labels[labels == 3] = 4  # absent: no positive, ROC-AUC undefined
  labels[labels == 5] = 6
  labels[0] = 5  # a single positive
  scores = (np.round(rng.normal(size=(2000, 40)) * 8) / 8).astype(np.float32)
  scores[np.arange(2000), labels] += 0.5
  auc = metrics.one_vs_rest_roc_auc(scores, labels)
  assert np.isnan(auc[3]) and np.isnan(auc).sum() == 1
  for c in set(range(40)) - {3}:
    assert auc[c] == pytest.approx(skm.roc_auc_score(labels == c, scores[:, c]), rel=1e-12), c
