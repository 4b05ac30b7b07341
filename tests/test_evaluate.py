"""`python -m jaxcls.evaluate`: a run's checkpoint scored again on another device count; errors
name the problem."""

import json

import pytest

from runner import copy_run, run_tool


def test_evaluate_on_another_device_count(trained_workdir, tmp_path):
  """Trained on 8 devices; evaluated on 2 with the same numbers."""
  trained_workdir = copy_run(trained_workdir, tmp_path)  # its own: this test renames a file
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
