"""Exact eval metrics at ImageNet size: jaxcls.metrics against scikit-learn, same scores.

    python benchmarks/eval_metrics.py                      # 50,000 x 1,000
    python benchmarks/eval_metrics.py --sklearn_classes 1000   # time sklearn on every class

Random log-probabilities of N examples over C classes (float32, as the eval step returns
them). jaxcls: `metrics.classification_metrics`, everything (ROC-AUC of every class, top-k,
P/R/F1, confusion). scikit-learn: `roc_auc_score(labels == c, scores[:, c])` (one-vs-rest)
for --sklearn_classes classes, timed and scaled to C; their values must equal jaxcls's.
numpy's sort and searchsorted run on one core.
"""

import argparse
import time

import numpy as np
from sklearn import metrics as skm

from jaxcls import metrics


def random_scores(num_examples: int, num_classes: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, num_examples)
  logits = rng.normal(size=(num_examples, num_classes)).astype(np.float32)
  logits[np.arange(num_examples), labels] += 2.0  # a model that is right about half the time
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return log_probs.astype(np.float32), labels


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--examples", type=int, default=50_000)
  parser.add_argument("--classes", type=int, default=1_000)
  parser.add_argument("--sklearn_classes", type=int, default=50,
                      help="classes scikit-learn is timed on; its time is scaled to --classes")
  args = parser.parse_args()
  scores, labels = random_scores(args.examples, args.classes)
  names = [str(c) for c in range(args.classes)]

  start = time.perf_counter()
  result = metrics.classification_metrics(scores, labels, names, top_k=(1, 5))
  ours = time.perf_counter() - start

  timed = min(args.sklearn_classes, args.classes)
  start = time.perf_counter()
  reference = [skm.roc_auc_score(labels == c, scores[:, c]) for c in range(timed)]
  sklearn_all = (time.perf_counter() - start) * args.classes / timed
  np.testing.assert_allclose(result["per_class"]["roc_auc"][:timed], reference, rtol=1e-12)

  print(f"{args.examples} x {args.classes} float32 log-probabilities")
  print(f"jaxcls classification_metrics (all metrics, all classes): {ours:.2f} s")
  print(f"sklearn roc_auc_score, {timed} classes timed, scaled to {args.classes}: "
        f"{sklearn_all:.2f} s")
  print(f"ROC-AUC of those {timed} classes equal to sklearn's (rtol 1e-12); "
        f"top-5 {result['top5_accuracy']:.4f}, macro ROC-AUC {result['roc_auc_macro']:.4f}")
  print(f"ratio sklearn/jaxcls: {sklearn_all / ours:.1f}x")


if __name__ == "__main__":
  main()
