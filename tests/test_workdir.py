"""The run directory: JSON written atomically, metrics.jsonl cut back for a resume and read
with the last record of a step winning, the latest eval by step, the run's config."""

import json
import re

import pytest

from jaxcls import config as config_lib
from jaxcls import workdir


def write_lines(path, *lines):
  path.write_text("".join(lines))


def record(step, split="train", **values):
  return json.dumps({"step": step, "split": split, **values}) + "\n"


def test_write_json_round_trips_and_leaves_no_temporary_file(tmp_path):
  path = tmp_path / "eval" / "test_3.json"  # the folder is made on the way
  payload = {"loss": 0.25, "per_class": {"support": [3, 0]}, "absent_classes": ["b"],
             "roc_auc_macro": None}
  workdir.write_json(str(path), payload)
  assert json.loads(path.read_text()) == payload
  workdir.write_json(str(path), {"loss": 0.5})  # replaced whole, not merged
  assert json.loads(path.read_text()) == {"loss": 0.5}
  assert [p.name for p in path.parent.iterdir()] == ["test_3.json"]


def test_write_json_that_fails_halfway_leaves_the_old_file_whole(tmp_path, monkeypatch):
  path = tmp_path / "results.json"
  workdir.write_json(str(path), {"step": 1})

  def crash(payload, f, **kwargs):
    f.write('{"step": ')
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(workdir.json, "dump", crash)
  with pytest.raises(OSError):
    workdir.write_json(str(path), {"step": 2})
  assert json.loads(path.read_text()) == {"step": 1}


def test_truncate_metrics_keeps_the_records_up_to_the_step_and_drops_a_partial_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  write_lines(path, record(1), record(2), record(2, "eval", accuracy=0.5), record(3),
              '{"step": 4, "split": "tr')  # a run killed while writing
  workdir.truncate_metrics(str(tmp_path), 2)
  assert path.read_text() == record(1) + record(2) + record(2, "eval", accuracy=0.5)
  workdir.truncate_metrics(str(tmp_path / "elsewhere"), 2)  # no metrics yet: nothing to do
  assert not (tmp_path / "elsewhere").exists()


def test_read_metrics_by_split_the_last_record_of_a_step_winning(tmp_path):
  write_lines(tmp_path / "metrics.jsonl",
              record(1, loss=3.0), record(3, loss=1.0), record(2, loss=2.0),
              record(2, "eval", accuracy=0.25),
              record(3, loss=1.5),  # step 3 again, after a resume from step 2
              '{"step": 4, "split": "tr')
  by_split = workdir.read_metrics(str(tmp_path))
  assert set(by_split) == {"train", "eval"}
  assert [(r["step"], r["loss"]) for r in by_split["train"]] == [(1, 3.0), (2, 2.0), (3, 1.5)]
  assert by_split["eval"] == [{"step": 2, "split": "eval", "accuracy": 0.25}]
  assert workdir.read_metrics(str(tmp_path / "no_run")) == {}


def test_latest_eval_is_the_highest_step_not_the_last_name(tmp_path):
  assert workdir.latest_eval(str(tmp_path)) is None
  for step in (9, 10, 2):
    workdir.write_eval(str(tmp_path), "test", step, {"accuracy": step / 100})
  (tmp_path / "eval" / "notes.json").write_text("{}")  # no step in the name: not an eval
  latest = workdir.latest_eval(str(tmp_path))
  assert (latest["step"], latest["split"], latest["accuracy"]) == (10, "test", 0.1)


def test_load_run_config_names_the_missing_file(tmp_path):
  missing = tmp_path / "nowhere"
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing / "config.json"))):
    workdir.load_run_config(str(missing))


def test_the_run_config_and_class_names_read_back_as_written(tmp_path):
  config = config_lib.base_config()
  config.model.width = 8
  assert workdir.read_class_names(str(tmp_path)) is None  # not written yet
  workdir.write_config(str(tmp_path), config)
  workdir.write_classes(str(tmp_path), ("cat", "dog"))
  loaded = workdir.load_run_config(str(tmp_path))
  assert loaded.model.width == 8 and loaded.data.source == config.data.source
  assert loaded.to_dict() == json.loads(json.dumps(config.to_dict()))  # tuples come back as lists
  assert workdir.read_class_names(str(tmp_path)) == ["cat", "dog"]


def test_load_run_config_names_a_damaged_file(tmp_path):
  path = tmp_path / "config.json"
  for text, message in [('{"model": {\n', r"cannot be read as the run's config \(Expecting"),
                        ("[1, 2]", r"holds a JSON list, not the run's config")]:
    path.write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(path)) + " " + message):
      workdir.load_run_config(str(tmp_path))
