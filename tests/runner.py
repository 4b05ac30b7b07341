"""Running `python -m jaxcls.main` (and the other commands) in a subprocess, as a user does,
for the end-to-end tests; reading back what a run wrote."""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# The run that tests/conftest.py's `reference` fixture trains once per session: every fault
# test (kill -9, SIGTERM, a damaged checkpoint) must reproduce it bit for bit.
REFERENCE_STEPS = 24
REFERENCE_RUN = ("--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
                 f"--config.num_train_steps={REFERENCE_STEPS}", "--config.log_every_steps=1",
                 "--config.batch_size=64", "--config.checkpoint.every_steps=4",
                 "--config.eval_batch_size=512")


def main_command(workdir, *overrides, config="configs/default.py"):
  return [sys.executable, "-m", "jaxcls.main", "--config", str(REPO / config),
          "--workdir", str(workdir), *overrides]


def main_env(devices=8, **extra):
  """This environment with `devices` fake CPU devices, unbuffered output, and `extra`."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env.update(extra)
  return env


def run_command(command, devices=8, timeout=600, **env):
  """Runs command to its end from the repository root; stdout and stderr captured as text."""
  return subprocess.run(command, env=main_env(devices, **env), cwd=REPO, capture_output=True,
                        text=True, timeout=timeout)


def run_main(workdir, *overrides, devices=8, timeout=600, config="configs/default.py", **env):
  return run_command(main_command(workdir, *overrides, config=config), devices, timeout, **env)


def run_tool(module, *args, devices=2, timeout=600):
  """`python -m module args` (evaluate, predict, report, ...); on 2 devices unless told, not
  the 8 a run trains on."""
  return run_command([sys.executable, "-m", module, *map(str, args)], devices, timeout)


def start_main(workdir, *overrides, devices=8, own_group=False):
  """A running main with stdout piped line by line (stderr merged); with own_group, in a
  process group of its own (os.killpg reaches it and its workers, as a terminal's Ctrl-C)."""
  return subprocess.Popen(main_command(workdir, *overrides), env=main_env(devices), cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=own_group)


def signal_group(workdir, *overrides, after: str, sig: int):
  """Runs main in a process group of its own and, once a line contains `after`, sends sig to
  the whole group (main and its grain workers, as a terminal's Ctrl-C or a scheduler does).
  -> (exit status, the output after that line, main's child processes at the signal, the
  grain workers among them)."""
  proc = start_main(workdir, *overrides, own_group=True)
  try:
    wait_for_line(proc, after)
    kids = children(proc.pid)
    workers = list(filter(is_worker, kids))  # read while they run: /proc forgets them
    os.killpg(proc.pid, sig)
    out, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGKILL)
  return proc.returncode, out, kids, workers


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


def wait_for_line(proc, text, timeout=300):
  """Reads proc's stdout until a line contains text; -> the lines read."""
  deadline = time.time() + timeout
  lines = []
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"never saw {text!r}; output:\n{''.join(lines)[-3000:]}")


def copy_run(workdir, tmp_path):
  """A copy of a run directory, for a test that changes it (the original is shared)."""
  return shutil.copytree(workdir, pathlib.Path(tmp_path) / "run")


def records(workdir, split="train"):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  return [r for r in map(json.loads, path.read_text().splitlines()) if r["split"] == split]


def train_losses(workdir):
  """Every train record's loss, in the order written."""
  return [r["loss"] for r in records(workdir)]


def losses_by_step(workdir):
  """step -> loss, the last record of each step winning (as after a resume)."""
  return {r["step"]: r["loss"] for r in records(workdir)}


def completed_steps(workdir):
  """The step numbers of the complete checkpoints in workdir, in order."""
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


# The processes a run started (grain's worker processes), from /proc.


def children(pid: int) -> list[int]:
  """The processes whose parent is pid, from /proc."""
  found = []
  for entry in os.listdir("/proc"):
    try:
      with open(f"/proc/{entry}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the name before ")" may hold spaces
    except (OSError, IndexError):
      continue
    if entry.isdigit() and int(fields[1]) == pid:
      found.append(int(entry))
  return found


def running(pid: int) -> bool:
  """Whether pid is a live process (a zombie waiting for init to reap it has ended)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


def is_worker(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
      return b"multiprocessing.spawn" in f.read()
  except OSError:
    return False


def still_running(pids, seconds: float) -> list[int]:
  """The pids still running after up to `seconds` of waiting for them to end."""
  deadline = time.time() + seconds
  while time.time() < deadline and any(map(running, pids)):
    time.sleep(0.2)
  return [p for p in pids if running(p)]
