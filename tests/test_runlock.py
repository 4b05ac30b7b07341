"""The workdir lock: a second run is refused naming the holder; a holder that is gone (dead
pid on this host, or a lease not renewed from another host) does not block a restart."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from jaxcls import runlock


def write_holder(workdir, **fields):
  holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-12-01T10:00",
            "renewed": time.time(), "lease_seconds": 300, "token": "theirs", **fields}
  (workdir / "lock.json").write_text(json.dumps(holder))
  return holder


def dead_pid():
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_second_lock_is_refused_naming_the_holder_and_release_frees_it(tmp_path):
  first = runlock.RunLock(str(tmp_path), 300)
  first.acquire()
  with pytest.raises(runlock.WorkdirLockedError) as refused:
    runlock.RunLock(str(tmp_path), 300).acquire()
  message = str(refused.value)
  assert f"pid {os.getpid()} on {socket.gethostname()}, started " in message
  assert str(tmp_path / "lock.json") in message
  first.release()
  assert not (tmp_path / "lock.json").exists()
  with runlock.RunLock(str(tmp_path), 300):
    assert (tmp_path / "lock.json").exists()


def test_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
  pid = dead_pid()
  write_holder(tmp_path, pid=pid)
  said = []
  with runlock.RunLock(str(tmp_path), 300, log=said.append) as lock:
    assert json.loads((tmp_path / "lock.json").read_text())["token"] == lock.token
  assert said == [f"Taking over the workdir from a run that ended without releasing it (pid "
                  f"{pid} on {socket.gethostname()}, started 2026-12-01T10:00: process {pid} "
                  "is no longer running)."]


def test_reused_pid_is_not_the_holder(tmp_path):
  """The pid is alive but started at another time: it is some other process now."""
  write_holder(tmp_path, start_ticks=1)
  with runlock.RunLock(str(tmp_path), 300, log=lambda _: None):
    pass


def test_other_host_blocks_until_its_lease_lapses(tmp_path):
  write_holder(tmp_path, host="node-17", pid=1234)
  with pytest.raises(runlock.WorkdirLockedError, match="pid 1234 on node-17"):
    runlock.RunLock(str(tmp_path), 300).acquire()
  write_holder(tmp_path, host="node-17", pid=1234, renewed=time.time() - 301)
  said = []
  with runlock.RunLock(str(tmp_path), 300, log=said.append):
    pass
  assert "not renewed for 301s (lease 300s)" in said[0]


def test_half_written_lock_is_judged_by_its_age(tmp_path):
  (tmp_path / "lock.json").write_text('{"host": "n')
  with pytest.raises(runlock.WorkdirLockedError):
    runlock.RunLock(str(tmp_path), 300).acquire()
  old = time.time() - 400
  os.utime(tmp_path / "lock.json", (old, old))
  with runlock.RunLock(str(tmp_path), 300, log=lambda _: None):
    pass


def test_holder_renews_its_lease(tmp_path):
  with runlock.RunLock(str(tmp_path), 0.2):
    first = json.loads((tmp_path / "lock.json").read_text())["renewed"]
    time.sleep(0.5)
    assert json.loads((tmp_path / "lock.json").read_text())["renewed"] > first
