"""`python -m jaxcls.main` end to end, in a subprocess as a user runs it."""

import json
import os
import signal
import socket

import pytest

from helpers import write_image
from runner import completed_steps, main_command, records, run_command, run_main, start_main
from runner import wait_for_line

SMOKE = ("--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
         "--config.num_train_steps=6", "--config.log_every_steps=3", "--config.batch_size=64",
         "--config.eval_batch_size=512")


def test_smoke_run_writes_every_workdir_file(tmp_path):
  result = run_main(tmp_path, *SMOKE, "--config.mesh.fsdp=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 6/6" in result.stdout and "img/s" in result.stdout and "ETA" in result.stdout

  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"]["name"] == "resnet_tiny" and config["mesh"]["fsdp"] == 2

  train_records = records(tmp_path)
  assert [r["step"] for r in train_records] == [3, 6]
  for record in train_records:
    for key in ("loss", "accuracy", "learning_rate", "images_per_sec"):
      assert key in record and record[key] == record[key], key  # present and not NaN
  eval_records = records(tmp_path, "eval")
  assert len(eval_records) == 1 and eval_records[0]["num_examples"] == 2000

  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  final = json.loads((tmp_path / "eval" / "test_6.json").read_text())
  assert final["num_examples"] == 2000 and 0.0 <= final["accuracy"] <= 1.0
  assert (tmp_path / "checkpoints" / "6" / "commit_success.txt").exists()
  assert (tmp_path / "export" / "model.json").exists()
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["eval"]["accuracy"] == final["accuracy"] and results["step"] == 6


@pytest.mark.parametrize("override,message", [
    ("--config.batchsize=64", 'Did you mean "batch_size"'),
    ("--config.batch_size=100", "config.batch_size=100 is not divisible by the 8 data-parallel"),
    ("--config.model.name=resnet19", "config.model.name"),
    ("--config.data.source=nowhere", "config.data.source"),
    ("--config.data.num_classes=7", "config.data.num_classes=7, but bundled"),
    ("--config.mesh.fsdp=3", "config.mesh"),
    ("--config.num_epochs=nan", "config.num_epochs=nan must be a finite number"),
    ("--config.optim.learning_rate=-1", "config.optim.learning_rate=-1.0 must be"),
])
def test_config_errors_fail_before_compiling(tmp_path, override, message):
  result = run_main(tmp_path, *SMOKE, override)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert "Compiled" not in result.stdout



def test_an_image_that_does_not_decode_is_a_data_error_naming_it(tmp_path):
  """Without skip_corrupt the run stops when the pipeline reaches the file: one line naming
  it and the way out, no traceback."""
  root = tmp_path / "images"
  for i in range(40):
    write_image(root / ("ant" if i % 2 else "bee") / f"{i:02d}.png", i)
  (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  result = run_main(
      tmp_path / "run", "--config.model.name=cnn", "--config.model.width=4",
      "--config.data.source=image_folder", f"--config.data.path={root}",
      "--config.data.eval_fraction=0.2", "--config.data.num_classes=2",
      "--config.data.image_size=8", "--config.data.eval_resize=8", "--config.batch_size=16",
      "--config.eval_batch_size=16", "--config.num_train_steps=4",
      "--config.data.num_workers=0")
  assert result.returncode == 1
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith(f"data error: {root / 'bee' / 'broken.jpg'}: not an image")
  assert "config.data.skip_corrupt=True" in message
  assert "Traceback" not in result.stderr


@pytest.mark.parametrize("case,message", [
    ("missing_config", "error: --config {tmp}/nope.py: no such file"),
    ("empty_workdir", "config error: --workdir is empty"),
    ("workdir_is_a_file", "config error: --workdir {tmp}/file is a file, not a directory"),
    ("checkpoints_is_a_file", "config error: {tmp}/run/checkpoints is a file, but the run "
                              "keeps a directory there"),
    ("read_only_workdir", "config error: --workdir {tmp}/locked is not writable"),
])
def test_unusable_command_line_is_one_line_before_compiling(tmp_path, case, message):
  workdir, config = tmp_path / "run", "configs/default.py"
  if case == "missing_config":
    config = str(tmp_path / "nope.py")
  elif case == "empty_workdir":
    workdir = ""
  elif case == "workdir_is_a_file":
    workdir = tmp_path / "file"
    workdir.write_text("not a directory")
  elif case == "checkpoints_is_a_file":
    workdir.mkdir()
    (workdir / "checkpoints").write_text("")
  else:
    workdir = tmp_path / "locked"
    workdir.mkdir(mode=0o555)
    if os.access(workdir, os.W_OK):
      pytest.skip("running as a user that can write anywhere (root): nothing to refuse")
  result = run_command(main_command(workdir, *SMOKE, config=config))
  assert result.returncode != 0
  assert message.format(tmp=tmp_path) in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr and "Compiled" not in result.stdout


def test_second_run_on_a_live_workdir_is_refused_and_the_first_keeps_its_metrics(tmp_path):
  """Before the lock, the second run truncated the first's metrics.jsonl and both saved."""
  run = (*SMOKE[:3], "--config.num_train_steps=2000", "--config.log_every_steps=1",
         *SMOKE[5:])
  first = start_main(tmp_path, *run)
  wait_for_line(first, "Compiled")
  second = run_main(tmp_path, *run)
  assert first.poll() is None, "the first run ended before the second was refused"
  assert second.returncode != 0
  assert (f"config error: {tmp_path} is in use by a live run: pid {first.pid} on "
          f"{socket.gethostname()}, started ") in second.stderr, second.stderr[-2000:]
  assert "Compiled" not in second.stdout
  first.send_signal(signal.SIGTERM)  # the first run saves and ends as usual
  out, _ = first.communicate(timeout=600)
  assert first.returncode == 0 and "Stopped by SIGTERM" in out, out[-3000:]
  stopped_at = max(completed_steps(tmp_path))
  assert [r["step"] for r in records(tmp_path)] == list(range(1, stopped_at + 1))
  assert not (tmp_path / "lock.json").exists()  # released at the end
