"""The speed benchmarks run at tiny sizes and print their ratios; the compilation cache works.

No test here asserts a time: these machines are shared and noisy.
"""

import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from runner import REPO, main_command, main_env

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # pylint: disable=g-import-not-at-top,wrong-import-position


def run_benchmark(script, tmp_path, *args, devices=1):
  env = main_env(devices)
  env["HOME"] = str(tmp_path / "home")  # the compilation cache and --work default go there
  env["PYTHONPATH"] = str(REPO)
  return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], env=env,
                        cwd=REPO, capture_output=True, text=True, timeout=600)


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
      "--set", "model.name='resnet_tiny'", "--set", "model.width=8", "--set", "batch_size=64",
      "--set", "data.num_workers=0")
  assert result.returncode == 0, result.stderr[-3000:]
  rows = {r["input"]: r for r in json.loads(out.read_text())["rows"]}
  assert set(rows) == {"device batch", "array_record", "image_folder"}
  assert all(r["ratio"] > 0 for r in rows.values())
  assert "| image_folder |" in result.stdout
  assert len(list((tmp_path / "work" / "cifar10_folder_256").rglob("*.jpg"))) == 256


def test_second_start_loads_the_compiled_steps_from_the_cache(tmp_path):
  cache = tmp_path / "xla_cache"
  args = ("--config.model.name=resnet_tiny", "--config.num_train_steps=2",
          "--config.batch_size=64", f"--config.compilation_cache_dir={cache}")
  env = main_env(2)
  env["JAX_DEBUG_LOG_MODULES"] = "jax._src.compiler"  # logs each persistent-cache hit
  for run in ("first", "second"):
    result = subprocess.run(main_command(tmp_path / run, *args), env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(p.name.startswith("jit_train_step") for p in cache.iterdir())
    hit = "Persistent compilation cache hit for 'jit_train_step'" in result.stderr
    assert hit == (run == "second"), result.stderr[-3000:]


def test_empty_cache_dir_turns_the_cache_off():
  code = ("import jax; from jaxcls import build; build.enable_compilation_cache('');"
          "print(jax.config.jax_enable_compilation_cache)")
  out = subprocess.run([sys.executable, "-c", code], env=main_env(1), cwd=REPO,
                       capture_output=True, text=True, timeout=120)
  assert out.stdout.strip() == "False", out.stderr
