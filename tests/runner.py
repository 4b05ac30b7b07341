"""Running `python -m jaxcls.main` in a subprocess, as a user does, for the end-to-end tests."""

import json
import os
import pathlib
import socket
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def main_command(workdir, *overrides, config="configs/default.py"):
  return [sys.executable, "-m", "jaxcls.main", "--config", str(REPO / config),
          "--workdir", str(workdir), *overrides]


def main_env(devices=8):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  return env


def run_main(workdir, *overrides, devices=8, timeout=600):
  return subprocess.run(main_command(workdir, *overrides), env=main_env(devices), cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)


def start_main(workdir, *overrides, devices=8):
  """A running main with stdout piped line by line (stderr merged)."""
  return subprocess.Popen(main_command(workdir, *overrides), env=main_env(devices), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_processes(workdir, *overrides, num_processes=2, devices=4):
  """One run as num_processes processes on loopback, each with `devices` CPU devices."""
  port = free_port()
  return [start_main(workdir, *overrides, f"--coordinator_address=127.0.0.1:{port}",
                     f"--num_processes={num_processes}", f"--process_id={i}", devices=devices)
          for i in range(num_processes)]


def records(workdir, split="train"):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def losses_by_step(workdir):
  """step -> loss, the last record of each step winning (as after a resume)."""
  return {r["step"]: r["loss"] for r in records(workdir)}
