"""`python -m jaxcls.evaluate`: a run's checkpoint scored again on another device count; errors
name the problem."""

import json
import signal
import time

import pytest

from helpers import write_image
from jaxcls import build
from runner import completed_steps, copy_run, run_tool, start_main, wait_for_line


def test_evaluate_on_another_device_count(trained_workdir, tmp_path):
  """Trained on 8 devices; evaluated on 1 with the same numbers."""
  trained_workdir = copy_run(trained_workdir, tmp_path)  # its own: this test renames a file
  (trained_workdir / "eval" / "test_6.json").rename(trained_workdir / "eval" / "train_time.json.bak")
  result = run_tool("jaxcls.evaluate", "--workdir", trained_workdir, devices=1)
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


def test_evaluate_predict_and_report_on_a_live_run_leave_it_alone(tmp_path):
  """A run that saves every step, read meanwhile by evaluate, predict and report. Before,
  evaluate's checkpoint manager cleaned up the run's in-progress save and the run died."""
  workdir = tmp_path / "live"
  run = ("--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
         "--config.num_train_steps=5000", "--config.log_every_steps=1", "--config.batch_size=64",
         "--config.eval_batch_size=512", "--config.checkpoint.every_steps=1",
         "--config.checkpoint.keep=2")
  proc = start_main(workdir, *run)
  try:
    wait_for_line(proc, "Compiled")
    while len(completed_steps(workdir)) < 2:
      time.sleep(0.5)
    write_image(tmp_path / "images" / "a.png", 3, size=(32, 32))
    for tool, args in (("jaxcls.evaluate", ()), ("jaxcls.predict", (tmp_path / "images",)),
                       ("jaxcls.report", ()), ("jaxcls.evaluate", ())):
      result = run_tool(tool, "--workdir", workdir, *args)
      assert result.returncode == 0, (tool, result.stderr[-3000:])
      assert proc.poll() is None, f"the run ended while {tool} read it"
  finally:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0 and "Stopped by SIGTERM" in out, out[-3000:]
  for step in completed_steps(workdir):  # every checkpoint it kept restores
    assert build.restore_for_inference(str(workdir), step).step == step
