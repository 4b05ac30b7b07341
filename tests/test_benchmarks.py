"""The speed benchmarks run at tiny sizes and print their ratios.

No test here asserts a time: these machines are shared and noisy.
"""

import json
import math
import shutil
import sys

import pytest

from runner import REPO, run_command

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_benchmark(script, tmp_path, *args, devices=1):
  # HOME: the compilation cache and --work default go there.
  return run_command([sys.executable, str(REPO / "benchmarks" / script), *args], devices,
                     HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO))


def test_load_config_applies_overrides_like_the_command_line():
  config = harness.load_config(
      "configs/default.py",
      ["batch_size=64", "model.name='resnet_tiny'", "optim.learning_rate=1", "data.mean=(0.5, 0.5, 0.5)"])
  assert config.batch_size == 64 and config.model.name == "resnet_tiny"
  assert config.optim.learning_rate == 1.0 and isinstance(config.optim.learning_rate, float)
  assert tuple(config.data.mean) == (0.5, 0.5, 0.5)
  with pytest.raises(ValueError, match="not a known config key"):
    harness.load_config("configs/default.py", ["batch_sise=64"])


def test_train_step_benchmark_prints_the_ratio(tmp_path):
  out = tmp_path / "train_step.json"
  # Two devices: the minimal step's replicated state meets a sharded batch, as on a GPU host.
  result = run_benchmark("train_step.py", tmp_path, "--rows", "smoke", "--rounds", "1",
                         "--steps", "2", "--torch", "--json", str(out), devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ratio jaxcls/minimal:" in result.stdout
  row = json.loads(out.read_text())["rows"][0]
  assert row["jaxcls"] > 0 and row["minimal"] > 0 and row["jaxcls/minimal"] > 0
  if "torch" not in row:
    assert "torch row skipped" in result.stdout


def test_end_to_end_benchmark_prints_the_pipeline_ratios(tmp_path):
  data = tmp_path / "cifar"
  data.mkdir()
  shutil.copy(REPO / "jaxcls" / "data" / "bundled" / "cifar10_sample_train.npz", data / "train.npz")
  out = tmp_path / "e2e.json"
  result = run_benchmark(
      "end_to_end.py", tmp_path, "--cifar", str(data), "--limit", "256", "--rounds", "1",
      "--steps", "2", "--work", str(tmp_path / "work"), "--json", str(out),
      "--set", "model.name='resnet_tiny'", "--set", "model.stem='small'", "--set", "model.width=8", "--set", "batch_size=64",
      "--set", "data.num_workers=0")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["input"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"device batch", "array_record", "image_folder"}
  assert all(r["ratio"] > 0 for r in rows.values())
  assert "| image_folder |" in result.stdout
  assert len(list((tmp_path / "work" / "cifar10_folder_256").rglob("*.jpg"))) == 256



def test_decode_benchmark_prints_the_ratios_and_the_fidelity(tmp_path):
  out = tmp_path / "decode.json"
  result = run_benchmark("decode.py", tmp_path, "--rounds", "1", "--seconds", "0.01",
                         "--seeds", "2", "--json", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())["rows"]
  train = {r["size"]: r for r in rows if r["path"] == "train"}
  assert set(train) == {"500x375", "1024x768"}
  assert all(r["reduced/main"] > 0 and r["reduced/pil"] > 0 for r in train.values())
  fidelity = {r["size"]: r for r in rows if r["path"] == "fidelity"}
  assert fidelity["500x375"]["train changed"]["crops"] == 0  # no reduction at 500x375
  assert 0 < fidelity["1024x768"]["train changed"]["mean_abs"] < 1.5
  assert "1024x768 fidelity" in result.stdout and "reduced/main" in result.stdout


def test_eval_metrics_benchmark_prints_the_ratio_against_sklearn(tmp_path):
  result = run_benchmark("eval_metrics.py", tmp_path, "--examples", "3000", "--classes", "40",
                         "--sklearn_classes", "10")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ROC-AUC of those 10 classes equal to sklearn's" in result.stdout
  assert "ratio sklearn/jaxcls:" in result.stdout


def test_zero_stages_benchmark_prints_step_time_and_xla_memory_per_stage(tmp_path):
  result = run_benchmark(
      "zero_stages.py", tmp_path, "--devices", "2", "--stages", "0,3", "--rounds", "1",
      "--seconds", "0.1", "--set", "model.name='resnet_tiny'", "--set", "model.stem='small'", "--set", "model.width=8",
      "--set", "data.image_size=8", "--set", "batch_size=8", "--set", "mesh.fsdp_min_size=256")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = [line for line in result.stdout.splitlines() if line.startswith("| 3 |")]
  assert len(rows) == 1 and "ratio stage 3/stage 0:" in result.stdout
  arguments = [float(line.split("|")[4]) for line in result.stdout.splitlines()
               if line.startswith(("| 0 |", "| 3 |"))]
  assert arguments[1] < arguments[0]  # stage 3 holds half the parameters per device


def test_training_compute_counts_flops_in_proportion_to_the_steps(tmp_path):
  out = tmp_path / "compute.json"
  epochs = harness.load_config("configs/default.py").num_epochs
  steps_per_epoch = 10_000 // harness.load_config("configs/default.py").batch_size
  result = run_benchmark("training_compute.py", tmp_path, "configs/default.py",
                         "--set", f"num_epochs={2 * epochs}", "--json", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads(out.read_text())
  given, double = rows["as given"], rows[f"num_epochs={2 * epochs}"]
  assert given["steps"] == math.ceil(epochs * steps_per_epoch)
  assert double["steps"] == math.ceil(2 * epochs * steps_per_epoch)
  assert double["step_gflops"] == pytest.approx(given["step_gflops"]) and given["step_gflops"] > 1
  assert double["train_gflops"] == pytest.approx(given["train_gflops"] * double["steps"]
                                                 / given["steps"])
  # Each evaluation costs the same; the longer run may make more of them.
  assert double["eval_gflops"] / double["evals"] == pytest.approx(
      given["eval_gflops"] / given["evals"])
  ratio = double["total_gflops"] / given["total_gflops"]
  assert f"ratio overrides/as given: {ratio:.3f}" in result.stdout


def test_decode_breakdown_times_each_part(tmp_path):
  result = run_benchmark("decode_breakdown.py", tmp_path)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if " us  " in l]
  assert len(lines) == 7 and all(float(l.split()[0]) > 0 for l in lines)
  assert "jaxcls's whole path" in lines[0] and "median box width" in result.stdout


def test_recipe_search_reports_accuracy_and_flops_of_a_short_run(tmp_path):
  out = tmp_path / "runs.jsonl"
  result = run_benchmark("recipe_search.py", tmp_path, "--epochs", "0.05", "--whiten", "2",
                         "--widths", "0,8,16,32", "--dirac", "1", "--tta", "3",
                         "--bias_lr", "2", "--bn_scale", "0", "--jsonl", str(out))
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(out.read_text().splitlines()[-1])
  assert 0.0 <= line["acc"] <= 1.0 and line["train_gflop"] > 0
  assert json.loads(result.stdout.splitlines()[-1]) == line
