"""Where a run's numbers go: metrics.jsonl records, TensorBoard, the progress line; nothing
from a disabled reporter; the train metrics between log steps, and a non-finite one's step."""

import io
import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcls import reporter as reporter_lib
from jaxcls import workdir


def test_reporter_writes_a_record_per_step_and_split_and_a_progress_line(tmp_path):
  out = io.StringIO()
  reporter = reporter_lib.Reporter(str(tmp_path), total_steps=10, stream=out)
  reporter.write(4, "train", {"loss": np.float32(0.5), "accuracy": jnp.float32(0.25)})
  reporter.write(4, "eval", {"accuracy": 0.375})
  reporter.progress(4, {"images_per_sec": 1234.4, "loss": 0.51234, "accuracy": 0.25,
                        "learning_rate": 0.1}, eta_seconds=65)
  reporter.close()
  reporter.close()  # safe to call again
  assert out.getvalue() == ("step  4/10 | 1,234 img/s | ETA 1m05s | loss 0.5123 | "
                            "accuracy 0.25 | learning_rate 0.1\n")
  by_split = workdir.read_metrics(str(tmp_path))
  [train], [evaluation] = by_split["train"], by_split["eval"]
  assert (train["step"], train["split"], train["loss"], train["accuracy"]) == (
      4, "train", 0.5, 0.25)
  assert (evaluation["step"], evaluation["accuracy"]) == (4, 0.375)
  assert isinstance(train["time"], float)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


class _FullDisk:
  def close(self):
    raise OSError(28, "No space left on device")


def test_a_close_that_fails_is_raised_unless_the_run_is_already_failing(tmp_path):
  # A full disk fails the checkpoint save first: that one-line error is what the user sees.
  failing = reporter_lib.Reporter(str(tmp_path / "a"), total_steps=1, stream=io.StringIO())
  failing._tb.close()
  failing._tb = _FullDisk()
  failing.close(failing=True)
  assert failing._tb is None and failing._jsonl is None
  healthy = reporter_lib.Reporter(str(tmp_path / "b"), total_steps=1, stream=io.StringIO())
  healthy._tb.close()
  healthy._tb = _FullDisk()
  with pytest.raises(OSError, match="No space left"):
    healthy.close()
  healthy.close()  # the files are let go either way


def test_a_resumed_reporter_replaces_the_steps_after_the_checkpoint(tmp_path):
  reporter = reporter_lib.Reporter(str(tmp_path), total_steps=3, stream=io.StringIO())
  for step in (1, 2, 3):
    reporter.write(step, "train", {"loss": float(step)})
  reporter.truncate_after(2)  # resumed from the checkpoint of step 2
  reporter.write(3, "train", {"loss": 9.0})
  reporter.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  assert [r["loss"] for r in workdir.read_metrics(str(tmp_path))["train"]] == [1.0, 2.0, 9.0]


def test_a_disabled_reporter_writes_nothing(tmp_path):
  out = io.StringIO()
  reporter = reporter_lib.Reporter(str(tmp_path / "run"), total_steps=10, enabled=False,
                                   stream=out)
  reporter.write(1, "train", {"loss": 1.0})
  reporter.progress(1, {"loss": 1.0}, eta_seconds=5)
  reporter.log("hello")
  reporter.truncate_after(0)
  reporter.close()
  assert out.getvalue() == "" and not (tmp_path / "run").exists()


def test_train_log_reports_the_mean_of_the_steps_since_the_last_log_step(tmp_path):
  out = io.StringIO()
  reporter = reporter_lib.Reporter(str(tmp_path), total_steps=10, stream=out)
  log = reporter_lib.TrainLog(reporter, batch_size=8, steps_per_epoch=4, start_step=0,
                              num_steps=10)
  log.add(1, {"loss": jnp.float32(1.0), "accuracy": jnp.float32(0.5)})
  log.add(2, {"loss": jnp.float32(3.0), "accuracy": jnp.float32(0.25)})
  summary = log.flush(2)
  reporter.close()
  assert summary["loss"] == 2.0 and summary["accuracy"] == 0.375 and summary["epoch"] == 0.5
  assert summary["images_per_sec"] > 0 and log.history == []
  [written] = workdir.read_metrics(str(tmp_path))["train"]
  assert (written["step"], written["loss"]) == (2, 2.0)
  assert out.getvalue().startswith("step  2/10 | ")


def test_fetch_history_names_the_first_non_finite_step():
  finite = [(1, {"loss": jnp.float32(1.5), "grad_norm": jnp.float32(2.0)})]
  [(step, values)] = reporter_lib.fetch_history(finite)
  assert step == 1 and values["loss"] == 1.5 and isinstance(values["loss"], np.ndarray)
  history = finite + [(2, {"loss": jnp.float32(np.nan), "grad_norm": jnp.float32(1.0)}),
                      (3, {"loss": jnp.float32(np.inf), "grad_norm": jnp.float32(np.inf)})]
  with pytest.raises(FloatingPointError, match=r"^Non-finite loss at step 2 \(loss=nan\)"):
    reporter_lib.fetch_history(history)
  with pytest.raises(FloatingPointError, match=r"^Non-finite grad_norm at step 7"):
    reporter_lib.fetch_history([(7, {"loss": 1.0, "grad_norm": np.float32(np.inf)})])


@pytest.mark.parametrize("seconds,text", [
    (0, "0m00s"), (65, "1m05s"), (59.6, "1m00s"), (3600, "1h00m00s"), (2 * 3600 + 61, "2h01m01s"),
    (math.inf, "?"), (math.nan, "?"),
    (999 * 3600 + 59, "999h00m59s"), (1000 * 3600, ">1000h"),
    (5.75e16, ">1000h"),  # an absurd step count printed "15980338819936854h"
])
def test_format_duration(seconds, text):
  assert reporter_lib.format_duration(seconds) == text
