"""The run directory (`--workdir`): the one place that names its files, writes and reads them.

    config.json              the resolved config           classes.json   label names
    metrics.jsonl            one record per (step, split)  results.json   the final numbers
    tensorboard/             event files                   eval/<split>_<step>.json
    checkpoints/<step>/      orbax steps (checkpoint.py)   export/        inference weights
    report/                  plots and summary.md          skipped_examples.json
    damaged_checkpoint_<step>_<time>/   a step set aside by checkpoint.fallback_to_previous

Every other module asks here for a path or a record, so the layout can change in one place.
JSON files are written atomically (temporary file, then rename): a crash never leaves half a
file, and a reader never sees one.
"""

import glob
import json
import os
import re

import ml_collections

_CONFIG = "config.json"
_CLASSES = "classes.json"
_METRICS = "metrics.jsonl"
_RESULTS = "results.json"
_SKIPPED = "skipped_examples.json"
_EVAL_DIR = "eval"
_EXPORT_DIR = "export"
_EXPORT_VARIABLES = "variables"
_EXPORT_INFO = "model.json"


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
  return os.path.join(workdir, "tensorboard")


def eval_path(workdir: str, split: str, step: int) -> str:
  return os.path.join(workdir, _EVAL_DIR, f"{split}_{step}.json")


def checkpoints_dir(workdir: str) -> str:
  return os.path.abspath(os.path.join(workdir, "checkpoints"))


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
  return os.path.join(workdir, "report")


def report_plot_path(workdir: str, plot: str) -> str:
  """report/<plot>.png, e.g. plot='loss'."""
  return os.path.join(report_dir(workdir), f"{plot}.png")


def report_summary_path(workdir: str) -> str:
  return os.path.join(report_dir(workdir), "summary.md")


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
