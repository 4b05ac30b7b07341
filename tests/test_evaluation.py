"""Exact evaluation metrics (checked against scikit-learn) and the evaluate/predict/report tools."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn import metrics as skm

from jaxcls import metrics
from runner import REPO, main_env, run_main

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


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  result = run_main(workdir, "--config.model.name=resnet_tiny", "--config.model.width=8",
                    "--config.num_train_steps=6", "--config.log_every_steps=2",
                    "--config.batch_size=64", "--config.eval_every_epochs=0.02")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def run_tool(module, *args, devices=2):
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], env=main_env(devices),
                        cwd=REPO, capture_output=True, text=True, timeout=600)


def test_training_writes_eval_json_and_report(trained_workdir):
  final = json.loads((trained_workdir / "eval" / "test_6.json").read_text())
  assert final["num_examples"] == 2000 and sum(final["per_class"]["support"]) == 2000
  assert np.sum(final["confusion_matrix"]) == 2000
  assert len(list((trained_workdir / "eval").glob("test_*.json"))) >= 2  # periodic evals too
  for name in ("loss.png", "accuracy.png", "learning_rate.png", "confusion_matrix.png",
               "per_class_recall.png"):
    path = trained_workdir / "report" / name
    with Image.open(path) as image:
      image.verify()
      assert image.format == "PNG" and min(image.size) >= 300
    assert path.stat().st_size > 10_000
  summary = (trained_workdir / "report" / "summary.md").read_text()
  assert "confusion_matrix.png" in summary and "airplane" in summary


def test_evaluate_on_another_device_count(trained_workdir):
  """Trained on 8 devices; evaluated on 2 with the same numbers."""
  (trained_workdir / "eval" / "test_6.json").rename(trained_workdir / "eval" / "train_time.json.bak")
  result = run_tool("jaxcls.evaluate", "--workdir", trained_workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "precision" in result.stdout and "airplane" in result.stdout
  again = json.loads((trained_workdir / "eval" / "test_6.json").read_text())
  before = json.loads((trained_workdir / "eval" / "train_time.json.bak").read_text())
  assert again["confusion_matrix"] == before["confusion_matrix"]
  assert again["accuracy"] == before["accuracy"]
  assert again["loss"] == pytest.approx(before["loss"], rel=1e-5)


def test_evaluate_errors_name_the_problem(trained_workdir, tmp_path):
  missing = run_tool("jaxcls.evaluate", "--workdir", tmp_path)
  assert missing.returncode != 0 and "config.json" in missing.stderr
  bad_step = run_tool("jaxcls.evaluate", "--workdir", trained_workdir, "--step", 999)
  assert bad_step.returncode != 0 and "No checkpoint for step 999" in bad_step.stderr


def test_predict_table_and_json(trained_workdir, tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / "images"
  (folder / "sub").mkdir(parents=True)
  Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(folder / "a.png")
  Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(folder / "sub" / "b.jpg")
  table = run_tool("jaxcls.predict", "--workdir", trained_workdir, folder, "--top_k", 3)
  assert table.returncode == 0, table.stderr[-3000:]
  assert "a.png" in table.stdout and "b.jpg" in table.stdout and "  3. " in table.stdout
  as_json = run_tool("jaxcls.predict", "--workdir", trained_workdir, folder / "a.png", "--json")
  assert as_json.returncode == 0, as_json.stderr[-3000:]
  [entry] = json.loads(as_json.stdout)
  probabilities = [e["probability"] for e in entry["top_k"]]
  assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
  assert 0 < sum(probabilities) <= 1.0001


def test_report_command_redraws(trained_workdir):
  for png in (trained_workdir / "report").glob("*.png"):
    png.unlink()
  result = run_tool("jaxcls.report", "--workdir", trained_workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert (trained_workdir / "report" / "confusion_matrix.png").exists()
