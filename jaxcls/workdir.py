"""The run directory (`--workdir`): the one place that names its files, writes and reads them.

    config.json              the resolved config           classes.json   label names
    metrics.jsonl            one record per (step, split)  results.json   the final numbers
    tensorboard/             event files                   eval/<split>_<step>.json
    checkpoints/<step>/      orbax steps (checkpoint.py)   export/        inference weights
    report/                  plots and summary.md          skipped_examples.json
    damaged_checkpoint_<step>_<time>/   a step set aside by checkpoint.fallback_to_previous
    lock.json                the live run that holds this directory (runlock.py)
    checkpoints/<step>/checksums.json   size and CRC-32 of each file of the step (integrity.py)

Every other module asks here for a path or a record, so the layout can change in one place.
JSON files are written atomically (temporary file, then rename): a crash never leaves half a
file, and a reader never sees one.
"""

import glob
import hashlib
import json
import os
import re
import tempfile

import ml_collections

from jaxcls.errors import ConfigError

_CONFIG = "config.json"
_CLASSES = "classes.json"
_METRICS = "metrics.jsonl"
_RESULTS = "results.json"
_SKIPPED = "skipped_examples.json"
_EVAL_DIR = "eval"
_CHECKPOINTS_DIR = "checkpoints"
_REPORT_DIR = "report"
_TENSORBOARD_DIR = "tensorboard"
_EXPORT_DIR = "export"
_EXPORT_VARIABLES = "variables"
_EXPORT_INFO = "model.json"
_LOCK = "lock.json"
_STEP_CHECKSUMS = "checksums.json"
# Characters that etils' local glob (which orbax uses to find the per-process files it merges
# into a step) reads as a pattern even inside the directory part of a path.
_GLOB_CHARACTERS = "[]*?"


# Paths.

def config_path(workdir: str) -> str:
  return os.path.join(workdir, _CONFIG)


def classes_path(workdir: str) -> str:
  return os.path.join(workdir, _CLASSES)


def metrics_path(workdir: str) -> str:
  return os.path.join(workdir, _METRICS)


def results_path(workdir: str) -> str:
  return os.path.join(workdir, _RESULTS)


def skipped_examples_path(workdir: str) -> str:
  return os.path.join(workdir, _SKIPPED)


def tensorboard_dir(workdir: str) -> str:
  return os.path.join(workdir, _TENSORBOARD_DIR)


def eval_path(workdir: str, split: str, step: int) -> str:
  return os.path.join(workdir, _EVAL_DIR, f"{split}_{step}.json")


def checkpoints_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, _CHECKPOINTS_DIR))


def step_checksums_path(step_dir: str) -> str:
  """The record of a checkpoint step's files, inside the step (moved and deleted with it)."""
  return os.path.join(step_dir, _STEP_CHECKSUMS)


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, _LOCK)


def orbax_path(directory: str) -> str:
  """`directory` (absolute), or a link to it whose path orbax can use.

  orbax finds the files it merges into a step with etils' glob, which reads `[x]`, `*` or `?`
  in the directory part as a pattern: a run under `runs/[x]` would save steps that cannot be
  restored. Such a directory is handed to orbax through a symbolic link (in the temporary
  directory, named by a hash of the path); the files themselves stay in `directory`.
  """
  directory = os.path.abspath(directory)
  if not any(c in directory for c in _GLOB_CHARACTERS):
    return directory
  links = os.path.join(tempfile.gettempdir(), f"jaxcls-paths-{os.getuid()}")
  os.makedirs(links, exist_ok=True)
  os.makedirs(directory, exist_ok=True)  # a link to nothing would stop orbax creating it
  link = os.path.join(links, hashlib.sha256(directory.encode()).hexdigest()[:24])
  if os.path.islink(link) and os.readlink(link) == directory:
    return link
  tmp = f"{link}.{os.getpid()}"
  os.symlink(directory, tmp)
  os.replace(tmp, link)  # atomic: another process of the run may be making the same link
  return link


def damaged_checkpoint_dir(workdir: str, step: int, timestamp: int) -> str:
  return os.path.abspath(os.path.join(workdir, f"damaged_checkpoint_{step}_{timestamp}"))


def export_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, _EXPORT_DIR))


def export_variables_dir(directory: str) -> str:
  """The orbax checkpoint of params and BatchNorm statistics inside an export directory."""
  return os.path.join(os.path.abspath(directory), _EXPORT_VARIABLES)


def export_info_path(directory: str) -> str:
  """The JSON describing an export (model, classes, preprocessing)."""
  return os.path.join(directory, _EXPORT_INFO)


def report_dir(workdir: str) -> str:
  return os.path.join(workdir, _REPORT_DIR)


def report_plot_path(workdir: str, plot: str) -> str:
  """report/<plot>.png, e.g. plot='loss'."""
  return os.path.join(report_dir(workdir), f"{plot}.png")


def report_summary_path(workdir: str) -> str:
  return os.path.join(report_dir(workdir), "summary.md")


# Checks.

def check_usable(workdir: str) -> None:
  """A ConfigError, before anything compiles, for a workdir a run cannot write to."""
  if not workdir:
    raise ConfigError("--workdir is empty: give the directory the run writes to, e.g. "
                      "--workdir runs/default.")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f"--workdir {workdir} is a file, not a directory: give a directory "
                      "(it is created if missing).")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir} cannot be created: {e.strerror} "
                      f"({e.filename}).") from None
  for name in (_CHECKPOINTS_DIR, _EXPORT_DIR, _EVAL_DIR, _REPORT_DIR, _TENSORBOARD_DIR):
    path = os.path.join(workdir, name)
    if os.path.exists(path) and not os.path.isdir(path):
      raise ConfigError(f"{path} is a file, but the run keeps a directory there: move it "
                        "away or use another --workdir.")
  try:
    with tempfile.TemporaryFile(dir=workdir):
      pass
  except OSError as e:
    raise ConfigError(f"--workdir {workdir} is not writable: {e.strerror}. Use a directory "
                      "this user can write to.") from None


# Writing.

def write_json(path: str, payload: dict) -> None:
  """Writes JSON atomically (temp file + rename) so a crash never leaves half a file."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def write_config(workdir: str, config) -> None:
  write_json(config_path(workdir), config.to_dict())


def write_classes(workdir: str, class_names) -> None:
  write_json(classes_path(workdir), {"class_names": list(class_names)})


def write_results(workdir: str, results: dict) -> None:
  write_json(results_path(workdir), results)


def write_skipped_examples(workdir: str, payload: dict) -> str:
  path = skipped_examples_path(workdir)
  write_json(path, payload)
  return path


def write_eval(workdir: str, split: str, step: int, result: dict) -> str:
  """eval/<split>_<step>.json; returns the path."""
  path = eval_path(workdir, split, step)
  write_json(path, {"split": split, "step": step, **result})
  return path


def json_line(record: dict) -> str:
  """One metrics.jsonl record: a line of JSON, written whole by one `write` call."""
  return json.dumps(record) + "\n"


def open_metrics_log(workdir: str):
  """metrics.jsonl opened for appending, one JSON record a line (see `truncate_metrics`)."""
  os.makedirs(workdir, exist_ok=True)
  return open(metrics_path(workdir), "a", encoding="utf-8")


def truncate_metrics(workdir: str, step: int) -> None:
  """Keeps the records of metrics.jsonl up to `step`, atomically.

  A resumed run replays the steps after its checkpoint and writes them again, and a killed
  run may have left half a line at the end.
  """
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return
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


# Reading.

def is_run_dir(workdir: str) -> bool:
  """Whether a run has written its metrics here (what the report command needs)."""
  return os.path.exists(metrics_path(workdir))


def load_run_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (config.json)."""
  path = config_path(workdir)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} the --workdir of a run?")
  try:
    with open(path, encoding="utf-8") as f:
      loaded = json.load(f)
  except ValueError as e:  # not JSON (cut short, overwritten) or not UTF-8
    raise ValueError(f"{path} cannot be read as the run's config ({e}): the file is damaged; "
                     "put back a copy (training writes it at the start of each run).") from None
  if not isinstance(loaded, dict):
    raise ValueError(f"{path} holds a JSON {type(loaded).__name__}, not the run's config (an "
                     "object); put back a copy.")
  return ml_collections.ConfigDict(loaded)


def read_class_names(workdir: str) -> list | None:
  """The label names training wrote, or None for a run that has not written them."""
  path = classes_path(workdir)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)["class_names"]


def read_metrics(workdir: str) -> dict:
  """split -> list of records, the last record of each step winning (a resume replays steps)."""
  by_split: dict = {}
  path = metrics_path(workdir)
  if not os.path.exists(path):
    return by_split
  with open(path, encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a partial last line
      by_split.setdefault(record["split"], {})[record["step"]] = record
  return {split: [steps[s] for s in sorted(steps)] for split, steps in by_split.items()}


def latest_eval(workdir: str) -> dict | None:
  """The eval JSON with the highest step, or None."""
  steps = {}
  for path in glob.glob(os.path.join(workdir, _EVAL_DIR, "*.json")):
    match = re.fullmatch(r".+_(\d+)\.json", os.path.basename(path))
    if match:
      steps[path] = int(match.group(1))
  if not steps:
    return None
  with open(max(steps, key=steps.get), encoding="utf-8") as f:
    return json.load(f)


def read_export_info(directory: str) -> dict:
  with open(export_info_path(directory), encoding="utf-8") as f:
    return json.load(f)
