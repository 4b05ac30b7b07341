"""`python -m jaxcls.main` end to end, in a subprocess as a user runs it."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from runner import REPO, records, run_main

SMOKE = ("--config.model.name=resnet_tiny", "--config.num_train_steps=6",
         "--config.log_every_steps=3", "--config.batch_size=64", "--config.eval_batch_size=512")


def test_smoke_run_writes_every_workdir_file(tmp_path):
  result = run_main(tmp_path, *SMOKE, "--config.mesh.fsdp=2")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 6/6" in result.stdout and "img/s" in result.stdout and "ETA" in result.stdout

  config = json.loads((tmp_path / "config.json").read_text())
  assert config["model"]["name"] == "resnet_tiny" and config["mesh"]["fsdp"] == 2

  records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_records = [r for r in records if r["split"] == "train"]
  assert [r["step"] for r in train_records] == [3, 6]
  for record in train_records:
    for key in ("loss", "accuracy", "learning_rate", "images_per_sec"):
      assert key in record and record[key] == record[key], key  # present and not NaN
  eval_records = [r for r in records if r["split"] == "eval"]
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
])
def test_config_errors_fail_before_compiling(tmp_path, override, message):
  result = run_main(tmp_path, *SMOKE, override)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  assert "Traceback" not in result.stderr, result.stderr[-2000:]
  assert "Compiled" not in result.stdout


def free_port():
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def train_losses(workdir):
  return [r["loss"] for r in records(workdir)]


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 4 devices on loopback train like 1 process x 8 devices."""
  steps = ("--config.model.name=resnet_tiny", "--config.num_train_steps=4",
           "--config.log_every_steps=1", "--config.batch_size=64", "--config.mesh.fsdp=2")
  single = run_main(tmp_path / "single", *steps)
  assert single.returncode == 0, single.stderr[-3000:]

  port = free_port()
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen(
      [sys.executable, "-m", "jaxcls.main", "--config", str(REPO / "configs/default.py"),
       "--workdir", str(tmp_path / "multi"), *steps,
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "step 4/4" in outputs[0][0] and "step 4/4" not in outputs[1][0]  # only process 0 logs
  assert len(train_losses(tmp_path / "multi")) == 4
  assert train_losses(tmp_path / "multi") == pytest.approx(train_losses(tmp_path / "single"),
                                                           rel=1e-5)
  multi = json.loads((tmp_path / "multi" / "eval" / "test_4.json").read_text())
  single = json.loads((tmp_path / "single" / "eval" / "test_4.json").read_text())
  assert multi["num_examples"] == 2000 and sum(multi["per_class"]["support"]) == 2000
  assert multi["confusion_matrix"] == single["confusion_matrix"]  # every example once
