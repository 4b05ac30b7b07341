"""Where metrics go: a progress line on stdout, metrics.jsonl, and TensorBoard event files.

Only process 0 writes; the other processes get a Reporter that does nothing, so the training
loop does not branch on the process index.
"""

import json
import math
import os
import sys
import time


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Reporter:
  """Writes one record per (step, split) to JSONL and TensorBoard, and prints progress."""

  def __init__(self, workdir: str, total_steps: int, enabled: bool = True, stream=sys.stdout):
    self.total_steps = total_steps
    self.enabled = enabled
    self.stream = stream
    self._jsonl = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
      # tensorboardX writes standard event files without needing TensorFlow.
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def truncate_after(self, step: int) -> None:
    """Keeps the records up to `step`: a resumed run replays the later steps and writes them
    again, and a killed run may have left half a line at the end."""
    if not self.enabled:
      return
    path = self._jsonl.name
    self._jsonl.close()
    kept = []
    with open(path, encoding="utf-8") as f:
      for line in f:
        try:
          if json.loads(line)["step"] <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError):
          continue  # the partial last line of a killed run
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
      f.writelines(kept)
    os.replace(f"{path}.tmp", path)
    self._jsonl = open(path, "a", encoding="utf-8")

  def write(self, step: int, split: str, metrics: dict) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: float(v) for k, v in metrics.items()})
    self._jsonl.write(json.dumps(record) + "\n")
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

  def close(self) -> None:
    """Closes the files; safe to call again."""
    if self._jsonl:
      self._jsonl.close()
      self._jsonl = None
    if self._tb:
      self._tb.close()
      self._tb = None


def write_json(path: str, payload: dict) -> None:
  """Writes JSON atomically (temp file + rename) so a crash never leaves half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def main(argv=None):
  """`python -m jaxcls.report --workdir DIR`: plots and summary.md in DIR/report/."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description="Draw the report of a jaxcls run.")
  parser.add_argument("--workdir", required=True)
  args = parser.parse_args(argv)
  if not os.path.exists(os.path.join(args.workdir, "metrics.jsonl")):
    sys.exit(f"error: {args.workdir}/metrics.jsonl does not exist: is it a run's --workdir?")
  from jaxcls import plots  # pylint: disable=g-import-not-at-top  (matplotlib is slow to load)
  for path in plots.write_report(args.workdir):
    print(path)


if __name__ == "__main__":
  main()
