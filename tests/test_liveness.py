"""A lost process of a multi-process run ends the others with one line, before JAX aborts."""

import signal


from jaxcls import liveness
from runner import start_processes, wait_for_line
from test_distributed import SMOKE


class FakeStore:
  """The coordination service's key-value store, shared by the PeerWatch of each process."""

  def __init__(self):
    self.values = {}
    self.down = False

  def key_value_set(self, key, value, allow_overwrite=False):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
    assert allow_overwrite or key not in self.values
    self.values[key] = value

  def key_value_dir_get(self, directory):
    if self.down:
      raise RuntimeError("UNAVAILABLE: failed to connect to all addresses")
    return [(k, v) for k, v in self.values.items() if k.startswith(directory)]


class Clock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def watches(count=3, timeout=10.0):
  store, clock = FakeStore(), Clock()
  return store, clock, [liveness.PeerWatch(store, i, count, timeout, clock) for i in range(count)]


def test_beating_peers_are_alive_and_a_silent_one_is_named_after_the_timeout():
  _, clock, (w0, w1, w2) = watches()
  for _ in range(5):  # all beat for a while
    clock.now += 4
    assert [w.check() for w in (w0, w1, w2)] == [None, None, None]
  # Process 2 is gone. Its last beat is seen at the next check; 8 s of silence after it are
  # within the timeout.
  for _ in range(3):
    clock.now += 4
    assert w0.check() is None and w1.check() is None
  clock.now += 4
  assert w0.check() == "process 2 has shown no sign of life for 12s"
  assert w1.check() == "process 2 has shown no sign of life for 12s"


def test_a_process_that_finished_is_not_waited_for():
  _, clock, (w0, w1, w2) = watches()
  clock.now += 1
  assert [w.check() for w in (w0, w1, w2)] == [None, None, None]
  w2.finish()
  for _ in range(10):
    clock.now += 4
    assert w0.check() is None and w1.check() is None


def test_an_error_in_one_process_stops_the_others_at_once():
  _, clock, (w0, w1, _) = watches()
  clock.now += 1
  w1.fail("data error: /data/cat/x.jpg: not an image")
  assert w0.check() == "process 1 stopped with an error (data error: /data/cat/x.jpg: not an image)"


def test_a_lost_coordinator_is_named_after_the_timeout():
  store, clock, (_, w1, _) = watches()
  clock.now += 1
  assert w1.check() is None
  store.down = True  # process 0 hosts the store
  clock.now += 6
  assert w1.check() is None
  clock.now += 6
  message = w1.check()
  assert message.startswith("process 0 (which coordinates the run) has not answered for 12s")
  assert "UNAVAILABLE" in message


# A run long enough to be killed mid-way, checkpointed every few steps, with a short timeout.
LONG = (*SMOKE[:3], *SMOKE[4:], "--config.num_train_steps=100000",
        "--config.checkpoint.every_steps=5", "--config.distributed.peer_timeout_seconds=6")


def run_and_kill(tmp_path, killed):
  """Starts two processes, kills one with SIGKILL once both train; the survivor's exit."""
  procs = start_processes(tmp_path / "run", *LONG)
  try:
    wait_for_line(procs[0], " 10/100000 |")  # both train (and a checkpoint exists)
    procs[killed].send_signal(signal.SIGKILL)
    survivor = procs[1 - killed]
    output = survivor.communicate(timeout=120)[0]
    return survivor.returncode, output
  finally:
    for p in procs:
      p.kill()


def test_kill_9_of_a_process_ends_the_other_with_one_line(tmp_path):
  returncode, output = run_and_kill(tmp_path, killed=1)
  assert returncode == 1, output[-3000:]
  # Before JAX's own heartbeat (66 s: 6 + its margin), which would abort with a stack dump:
  line = next(l for l in output.splitlines() if l.startswith("error: process"))
  assert line.startswith("error: process 0 of 2 stops: process 1 has shown no sign of life "), line
  assert "The newest checkpoint is step " in line and "Start every process again" in line
  for noise in ("Check failure", "Fatal Python error", "Traceback", "stack trace"):
    assert noise not in output, output[-3000:]


def test_kill_9_of_the_coordinator_ends_the_other_at_once(tmp_path):
  """Process 0 hosts JAX's coordination service: when it dies, jaxlib aborts the others
  from a C++ thread within a second (no Python hook exists). The run ends; it cannot hang."""
  returncode, output = run_and_kill(tmp_path, killed=0)  # within communicate's timeout
  assert returncode != 0, output[-3000:]
  assert "leader task was preempted/died" in output or "error: process 1 of 2 stops" in output
