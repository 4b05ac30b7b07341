"""One live run per workdir: a lock file that names its holder and is renewed while it lives.

Two runs writing one workdir would truncate each other's metrics.jsonl and interleave their
checkpoints. Process 0 of a run creates `<workdir>/lock.json` (host, pid, start time, a
token) only if it does not exist (O_EXCL; in a bucket, an upload with a
create-only-if-absent precondition: storage.create_new) and renews it every lease / 4
seconds. A second run finds it and stops at once naming the holder. A holder that is gone does not block a restart after a crash or a
preemption: on the same host, a pid that is no longer alive (or is now another process);
from another host, a lock not renewed within its lease.

In a bucket the renewal is a plain overwrite after reading the token back, as it is locally,
so two runs that take over the same stale lock at the same moment may both start; the
create-only-if-absent upload keeps the common case (a second run while the first lives) out.
"""

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxcls import storage
from jaxcls import workdir as workdir_lib
from jaxcls.errors import ConfigError


class WorkdirLockedError(ConfigError):
  """The workdir is held by another live run."""


def _process_start_ticks(pid: int) -> int | None:
  """The kernel's start time of `pid` (Linux /proc), to tell a reused pid from the holder."""
  try:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
      return int(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, IndexError, ValueError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # alive, another user's
  return True


def stale_reason(holder: dict, now: float) -> str | None:
  """Why a lock's holder no longer holds the workdir, or None while it may still be running."""
  age = now - float(holder.get("renewed", 0))
  if holder.get("host") == socket.gethostname():
    pid = int(holder.get("pid", -1))
    if pid <= 0 or not _pid_alive(pid):
      return f"process {pid} is no longer running"
    ticks = holder.get("start_ticks")
    if ticks is not None and _process_start_ticks(pid) not in (None, ticks):
      return f"pid {pid} now belongs to another process"
    return None
  if age > float(holder.get("lease_seconds", 0)):
    return f"not renewed for {age:.0f}s (lease {holder.get('lease_seconds')}s)"
  return None


def describe(holder: dict) -> str:
  return (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}")


class RunLock:
  """Held by process 0 of a run from before its first write to the workdir until it ends."""

  def __init__(self, workdir, lease_seconds: float, log=print):
    self.path = workdir_lib.lock_path(workdir)
    self.workdir = workdir
    self.lease_seconds = float(lease_seconds)
    self.log = log
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread = None

  def _record(self) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "start_ticks": _process_start_ticks(os.getpid()),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "renewed": time.time(), "lease_seconds": self.lease_seconds, "token": self.token}

  def _read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text(encoding="utf-8"))
    except FileNotFoundError:
      return None
    except ValueError:  # a holder killed while creating it: judge by the file's age
      return {"renewed": storage.mtime(self.path), "lease_seconds": self.lease_seconds,
              "host": None, "pid": None, "started": "unknown"}

  def acquire(self) -> None:
    storage.as_path(self.workdir).mkdir(parents=True, exist_ok=True)
    self.record = self._record()
    for _ in range(3):
      try:
        storage.create_new(self.path, json.dumps(self.record))
      except FileExistsError:
        holder = self._read()
        if holder is None:
          continue  # released meanwhile
        reason = stale_reason(holder, time.time())
        if reason is None:
          raise WorkdirLockedError(
              f"{self.workdir} is in use by a live run: {describe(holder)} (lock {self.path}). "
              "Wait for it to end or stop it, or use another --workdir. If that run is "
              f"really gone (e.g. its host died), delete {self.path}.")
        self.log(f"Taking over the workdir from a run that ended without releasing it "
                 f"({describe(holder)}: {reason}).")
        try:
          if storage.is_remote(self.path):
            self.path.unlink()
          else:
            os.replace(self.path, f"{self.path}.stale.{os.getpid()}")
            os.unlink(f"{self.path}.stale.{os.getpid()}")
        except FileNotFoundError:
          pass  # another starting run took it over first; the next try finds its lock
        continue
      self._thread = threading.Thread(target=self._renew, daemon=True, name="jaxcls-runlock")
      self._thread.start()
      return
    raise WorkdirLockedError(f"Could not take the lock {self.path}: other runs keep taking it.")

  def _renew(self) -> None:
    while not self._stop.wait(self.lease_seconds / 4):
      try:
        holder = self._read()
        if holder is None or holder.get("token") != self.token:
          self.log(f"warning: the workdir lock {self.path} was taken by another run "
                   f"({describe(holder or {})}).")
          return
        workdir_lib.write_json(self.path, {**self.record, "renewed": time.time()})
      except OSError as e:  # a full disk must not end the run; the lease may lapse
        self.log(f"warning: could not renew {self.path}: {e}")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
      self._thread = None
      holder = self._read()
      if holder is not None and holder.get("token") == self.token:
        self.path.unlink()

  def __enter__(self):
    self.acquire()
    return self

  def __exit__(self, *exc):
    self.release()


@contextlib.contextmanager
def hold(workdir, lease_seconds: float, log=print):
  """The run's hold on workdir: process 0 takes the lock, every process learns the outcome
  (so a refused run stops on all of them, and none waits for a peer that left)."""
  lock = RunLock(workdir, lease_seconds, log) if jax.process_index() == 0 else None
  error = None
  if lock is not None:
    try:
      lock.acquire()
    except WorkdirLockedError as e:
      error = e
  if jax.process_count() > 1:
    refused = multihost_utils.process_allgather(np.int32(error is not None))
    if np.any(refused) and error is None:
      error = WorkdirLockedError(f"{workdir} is in use by another run: process 0 could not "
                                 "take its lock (its output names the holder).")
  if error is not None:
    raise error
  try:
    yield lock
  finally:
    if lock is not None:
      lock.release()
