"""Where a run's numbers go: a progress line on stdout, metrics.jsonl and TensorBoard.

Only process 0 writes; the other processes get a Reporter that does nothing, so the training
loop does not branch on the process index. `TrainLog` keeps the train step's metrics on the
device between log steps and fetches them in one transfer when a log step comes.
"""

import math
import sys
import time

import jax
import numpy as np

from jaxcls import dispatch, workdir as workdir_lib


_LONGEST_DURATION = 1000 * 3600  # beyond this an estimate says nothing a user can plan with


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  if seconds >= _LONGEST_DURATION:
    return f">{_LONGEST_DURATION // 3600}h"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Reporter:
  """Writes one record per (step, split) to JSONL and TensorBoard, and prints progress."""

  def __init__(self, workdir, total_steps: int, enabled: bool = True, stream=sys.stdout):
    self.workdir = workdir
    self.total_steps = total_steps
    self.enabled = enabled
    self.stream = stream
    self._jsonl = None
    self._tb = None
    if enabled:
      self._jsonl = workdir_lib.open_metrics_log(workdir)
      # tensorboardX writes standard event files without needing TensorFlow; to gs:// with
      # google-cloud-storage (each flush uploads the event file again), to s3:// with boto3.
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top  (slow)
      self._tb = SummaryWriter(str(workdir_lib.tensorboard_dir(workdir)))

  def truncate_after(self, step: int) -> None:
    """Keeps the records up to `step` (see workdir.truncate_metrics)."""
    if not self.enabled:
      return
    self._jsonl.close()
    workdir_lib.truncate_metrics(self.workdir, step)
    self._jsonl = workdir_lib.open_metrics_log(self.workdir)

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: float(v) for k, v in metrics.items()})
    self._jsonl.write(workdir_lib.json_line(record))
    self._jsonl.flush()
    for name, value in metrics.items():
      self._tb.add_scalar(f"{split}/{name}", float(value), int(step))
    self._tb.flush()

  def progress(self, step: int, metrics: dict, eta_seconds: float) -> None:
    if not self.enabled:
      return
    width = len(str(self.total_steps))
    parts = [f"step {step:>{width}}/{self.total_steps}"]
    if "images_per_sec" in metrics:
      parts.append(f"{metrics['images_per_sec']:,.0f} img/s")
    parts.append(f"ETA {format_duration(eta_seconds)}")
    for name in ("loss", "accuracy", "learning_rate"):
      if name in metrics:
        parts.append(f"{name} {metrics[name]:.4g}")
    self.log(" | ".join(parts))

  def log(self, message: str) -> None:
    if self.enabled:
      print(message, file=self.stream, flush=True)

  def close(self, failing: bool = False) -> None:
    """Closes the files; safe to call again.

    `failing`: the run is already stopping with an error, which says more than a failed close
    would (a full disk fails both: the one-line checkpoint error must not turn into a
    TensorBoard traceback). Every record was flushed when written, so none is lost.
    """
    jsonl, tb, self._jsonl, self._tb = self._jsonl, self._tb, None, None
    for file in (jsonl, tb):
      try:
        if file:
          file.close()
      except OSError:
        if not failing:
          raise


def fetch_history(history: list) -> list:
  """[(step, device metrics)] -> [(step, host metrics)] in one transfer; raises on non-finite.

  The error names the first step whose loss or gradient norm was not finite.
  """
  fetched = jax.device_get(history)
  for step, values in fetched:
    bad = [k for k in ("loss", "grad_norm") if k in values and not np.isfinite(values[k])]
    if bad:
      raise FloatingPointError(
          f"Non-finite {' and '.join(bad)} at step {step} "
          f"({', '.join(f'{k}={values[k]}' for k in bad)}). "
          "No checkpoint was written from this state; the last good one stays the latest. "
          "Lower config.optim.learning_rate or check the data.")
  return fetched


def mean_metrics(fetched: list) -> dict:
  return {k: float(np.mean([m[k] for _, m in fetched])) for k in fetched[0][1]}


class TrainLog:
  """The train metrics between log steps: kept on the device, fetched and reported together."""

  def __init__(self, reporter: Reporter, batch_size: int, steps_per_epoch: int,
               start_step: int, num_steps: int):
    self.reporter = reporter
    self.batch_size = batch_size
    self.steps_per_epoch = steps_per_epoch
    self.start_step = start_step
    self.num_steps = num_steps
    self.history = []  # (step, device metrics) since the last log step
    self.in_flight = dispatch.StepsInFlight()  # the host stays a few steps ahead, no more
    self.start_time = self.last_time = time.time()
    self.last_step = start_step

  def add(self, step: int, metrics) -> None:
    self.history.append((step, metrics))
    self.in_flight.add(metrics)

  def check_finite(self) -> None:
    """Fetches the pending metrics and raises if any is non-finite (before every save)."""
    fetch_history(self.history)

  def flush(self, step: int) -> dict:
    """The one fetch between log steps: mean metrics, images/s, epoch; written and shown."""
    summary = mean_metrics(fetch_history(self.history))
    self.history = []
    now = time.time()
    summary["images_per_sec"] = (step - self.last_step) * self.batch_size / (now - self.last_time)
    summary["epoch"] = step / self.steps_per_epoch
    eta = (now - self.start_time) / (step - self.start_step) * (self.num_steps - step)
    self.reporter.write(step, "train", summary)
    self.reporter.progress(step, summary, eta)
    self.last_time, self.last_step = now, step
    return summary

  def elapsed(self) -> float:
    return time.time() - self.start_time
