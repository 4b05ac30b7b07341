"""The run directory (`--workdir`): the one place that names its files, writes and reads them.

    config.json              the resolved config           classes.json   label names
    metrics.jsonl            one record per (step, split)  results.json   the final numbers
    tensorboard/             event files                   eval/<split>_<step>.json
    checkpoints/<step>/      orbax steps (checkpoint.py)   export/        inference weights
    report/                  plots and summary.md          skipped_examples.json
    damaged_checkpoint_<step>_<time>/   a step set aside by checkpoint.fallback_to_previous
    lock.json                the live run that holds this directory (runlock.py)
    checkpoints/<step>/checksums.json   size and CRC-32 of each file of the step (integrity.py)

Every other module asks here for a path (an `etils.epath.Path`, local or in a bucket: see
storage.py) or a record, so the layout can change in one place. JSON files are written so a
crash never leaves half a file and a reader never sees one: locally a temporary file and a
rename; in an object store one upload, which appears whole or not at all (a rename there is
a copy and a delete, which a reader could catch half done).
"""

import hashlib
import json
import os
import re
import tempfile
import uuid

from etils import epath
import ml_collections

from jaxcls import storage
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
_WRITE_PROBE = ".jaxcls-write-probe"  # check_usable's test write in an object store
# Characters that etils' local glob (which orbax uses to find the per-process files it merges
# into a step) reads as a pattern even inside the directory part of a path.
_GLOB_CHARACTERS = "[]*?"


# Paths.

def _in(workdir, *names) -> epath.Path:
  return storage.as_path(workdir).joinpath(*names)


def config_path(workdir) -> epath.Path:
  return _in(workdir, _CONFIG)


def classes_path(workdir) -> epath.Path:
  return _in(workdir, _CLASSES)


def metrics_path(workdir) -> epath.Path:
  return _in(workdir, _METRICS)


def results_path(workdir) -> epath.Path:
  return _in(workdir, _RESULTS)


def skipped_examples_path(workdir) -> epath.Path:
  return _in(workdir, _SKIPPED)


def tensorboard_dir(workdir) -> epath.Path:
  return _in(workdir, _TENSORBOARD_DIR)


def eval_path(workdir, split: str, step: int) -> epath.Path:
  return _in(workdir, _EVAL_DIR, f"{split}_{step}.json")


def checkpoints_dir(workdir) -> epath.Path:
  return storage.absolute(_in(workdir, _CHECKPOINTS_DIR))


def step_checksums_path(step_dir) -> epath.Path:
  """The record of a checkpoint step's files, inside the step (moved and deleted with it)."""
  return _in(step_dir, _STEP_CHECKSUMS)


def lock_path(workdir) -> epath.Path:
  return _in(workdir, _LOCK)


def orbax_path(directory) -> epath.Path:
  """`directory` (absolute), or a link to it whose path orbax can use.

  orbax finds the files it merges into a step with etils' glob, which reads `[x]`, `*` or `?`
  in the directory part as a pattern: a run under `runs/[x]` would save steps that cannot be
  restored. Such a local directory is handed to orbax through a symbolic link (in the
  temporary directory, named by a hash of the path); the files themselves stay in
  `directory`. A bucket has no links: check_usable refuses such a workdir there.
  """
  if storage.is_remote(directory):
    return storage.as_path(directory)
  directory = os.path.abspath(directory)
  if not any(c in directory for c in _GLOB_CHARACTERS):
    return epath.Path(directory)
  links = os.path.join(tempfile.gettempdir(), f"jaxcls-paths-{os.getuid()}")
  os.makedirs(links, exist_ok=True)
  os.makedirs(directory, exist_ok=True)  # a link to nothing would stop orbax creating it
  link = os.path.join(links, hashlib.sha256(directory.encode()).hexdigest()[:24])
  if os.path.islink(link) and os.readlink(link) == directory:
    return epath.Path(link)
  tmp = f"{link}.{os.getpid()}"
  os.symlink(directory, tmp)
  os.replace(tmp, link)  # atomic: another process of the run may be making the same link
  return epath.Path(link)


def damaged_checkpoint_dir(workdir, step: int, timestamp: int) -> epath.Path:
  return storage.absolute(_in(workdir, f"damaged_checkpoint_{step}_{timestamp}"))


def export_dir(workdir) -> epath.Path:
  return storage.absolute(_in(workdir, _EXPORT_DIR))


def export_variables_dir(directory) -> epath.Path:
  """The orbax checkpoint of params and BatchNorm statistics inside an export directory."""
  return storage.absolute(directory) / _EXPORT_VARIABLES


def export_info_path(directory) -> epath.Path:
  """The JSON describing an export (model, classes, preprocessing)."""
  return _in(directory, _EXPORT_INFO)


def report_dir(workdir) -> epath.Path:
  return _in(workdir, _REPORT_DIR)


def report_plot_path(workdir, plot: str) -> epath.Path:
  """report/<plot>.png, e.g. plot='loss'."""
  return report_dir(workdir) / f"{plot}.png"


def report_summary_path(workdir) -> epath.Path:
  return report_dir(workdir) / "summary.md"


# Checks.

def check_usable(workdir) -> None:
  """A ConfigError, before anything compiles, for a workdir a run cannot write to."""
  if not os.fspath(workdir):
    raise ConfigError("--workdir is empty: give the directory the run writes to, e.g. "
                      "--workdir runs/default.")
  if storage.is_remote(workdir):
    _check_bucket_usable(workdir)
    return
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


def _check_bucket_usable(workdir) -> None:
  """The bucket's backend is installed, the path has no glob characters (orbax_path), and a
  small object can be written and deleted there."""
  storage.check_reachable(workdir, "--workdir")
  if any(c in os.fspath(workdir) for c in _GLOB_CHARACTERS):
    raise ConfigError(f"--workdir {workdir}: orbax reads {_GLOB_CHARACTERS} in a bucket path "
                      "as a pattern, and its checkpoints could not be restored; choose a "
                      "path without them.")
  probe = _in(workdir, f"{_WRITE_PROBE}-{uuid.uuid4().hex}")
  try:
    probe.write_text("")
    probe.unlink()
  except Exception as e:  # gcsfs and s3fs raise their own types for a missing bucket, a 403
    raise ConfigError(f"--workdir {workdir} is not writable: {type(e).__name__}: "
                      f"{str(e)[:300]}. Check that the bucket exists and that these "
                      "credentials may write to it.") from None


# Writing.

def write_json(path, payload: dict) -> None:
  """Writes JSON so a crash never leaves half a file: locally a temporary file and a rename,
  in an object store one upload (see the module docstring)."""
  if storage.is_remote(path):
    storage.write_whole(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def write_config(workdir, config) -> None:
  write_json(config_path(workdir), config.to_dict())


def write_classes(workdir, class_names) -> None:
  write_json(classes_path(workdir), {"class_names": list(class_names)})


def write_results(workdir, results: dict) -> None:
  write_json(results_path(workdir), results)


def write_skipped_examples(workdir, payload: dict) -> epath.Path:
  path = skipped_examples_path(workdir)
  write_json(path, payload)
  return path


def write_eval(workdir, split: str, step: int, result: dict) -> epath.Path:
  """eval/<split>_<step>.json; returns the path."""
  path = eval_path(workdir, split, step)
  write_json(path, {"split": split, "step": step, **result})
  return path


def json_line(record: dict) -> str:
  """One metrics.jsonl record: a line of JSON, written whole by one `write` call."""
  return json.dumps(record) + "\n"


def open_metrics_log(workdir):
  """metrics.jsonl opened for appending, one JSON record a line (see `truncate_metrics`).

  An object store cannot append: there the log keeps the file's text and uploads it whole at
  each flush (a reader sees the previous upload until then)."""
  if storage.is_remote(workdir):
    return _UploadedLog(metrics_path(workdir))
  os.makedirs(workdir, exist_ok=True)
  return open(metrics_path(workdir), "a", encoding="utf-8")


class _UploadedLog:
  """An appendable text file in an object store: written whole at each flush and at close."""

  def __init__(self, path: epath.Path):
    self.path = path
    self._text = path.read_text(encoding="utf-8") if path.exists() else ""
    self._uploaded = len(self._text)

  def write(self, text: str) -> None:
    self._text += text

  def flush(self) -> None:
    if len(self._text) != self._uploaded:
      storage.write_whole(self.path, self._text)
      self._uploaded = len(self._text)

  def close(self) -> None:
    self.flush()


def truncate_metrics(workdir, step: int) -> None:
  """Keeps the records of metrics.jsonl up to `step`, atomically.

  A resumed run replays the steps after its checkpoint and writes them again, and a killed
  run may have left half a line at the end.
  """
  path = metrics_path(workdir)
  if not path.exists():
    return
  kept = []
  with path.open(encoding="utf-8") as f:
    for line in f:
      try:
        if json.loads(line)["step"] <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except (ValueError, KeyError):
        continue  # the partial last line of a killed run
  storage.write_whole(path, "".join(kept))


# Reading.

def is_run_dir(workdir) -> bool:
  """Whether a run has written its metrics here (what the report command needs)."""
  storage.check_reachable(workdir, "--workdir")
  return metrics_path(workdir).exists()


def load_run_config(workdir) -> ml_collections.ConfigDict:
  """The config a run was trained with (config.json)."""
  storage.check_reachable(workdir, "--workdir")
  path = config_path(workdir)
  if not path.exists():
    raise FileNotFoundError(f"{path} does not exist: is {workdir} the --workdir of a run?")
  try:
    loaded = json.loads(path.read_text(encoding="utf-8"))
  except ValueError as e:  # not JSON (cut short, overwritten) or not UTF-8
    raise ValueError(f"{path} cannot be read as the run's config ({e}): the file is damaged; "
                     "put back a copy (training writes it at the start of each run).") from None
  if not isinstance(loaded, dict):
    raise ValueError(f"{path} holds a JSON {type(loaded).__name__}, not the run's config (an "
                     "object); put back a copy.")
  return ml_collections.ConfigDict(loaded)


def read_class_names(workdir) -> list | None:
  """The label names training wrote, or None for a run that has not written them."""
  path = classes_path(workdir)
  if not path.exists():
    return None
  return json.loads(path.read_text(encoding="utf-8"))["class_names"]


def read_metrics(workdir) -> dict:
  """split -> list of records, the last record of each step winning (a resume replays steps)."""
  by_split: dict = {}
  path = metrics_path(workdir)
  if not path.exists():
    return by_split
  with path.open(encoding="utf-8") as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a partial last line
      by_split.setdefault(record["split"], {})[record["step"]] = record
  return {split: [steps[s] for s in sorted(steps)] for split, steps in by_split.items()}


def latest_eval(workdir) -> dict | None:
  """The eval JSON with the highest step, or None."""
  steps = {}
  for path in _in(workdir, _EVAL_DIR).glob("*.json"):
    match = re.fullmatch(r".+_(\d+)\.json", path.name)
    if match:
      steps[path] = int(match.group(1))
  if not steps:
    return None
  return json.loads(max(steps, key=steps.get).read_text(encoding="utf-8"))


def read_export_info(directory) -> dict:
  return json.loads(export_info_path(directory).read_text(encoding="utf-8"))
