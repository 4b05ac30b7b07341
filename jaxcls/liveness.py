"""Notices a lost process of a multi-process run before JAX's runtime does.

When a process dies (kill -9, a host lost), the others are often blocked in a collective
that never returns, or the coordination service declares the process dead after its own
heartbeat timeout and aborts every survivor with a C++ stack dump (jaxlib gives Python no
hook: a Python callback for it fails with std::bad_cast). So each process runs its own,
shorter heartbeat through the coordination service's key-value store: a counter under
`jaxcls/alive/<process>`, raised every few seconds by a daemon thread. A peer whose counter
has not moved for `config.distributed.peer_timeout_seconds`, or a store that cannot be
reached for as long (process 0, which hosts it, is gone), ends this process with one line
that names the lost process, before JAX's heartbeat timeout (set longer, see
distributed.py) would abort it.

A process that ends normally marks itself done; one that ends with an error leaves its
message for the others, which then stop at once instead of waiting in a collective.
"""

import os
import sys
import threading
import time

from jax._src import distributed as jax_distributed

_PREFIX = "jaxcls/"
_ALIVE = _PREFIX + "alive/"
_DONE = _PREFIX + "done/"
_FAILED = _PREFIX + "failed/"
_BEATS_PER_TIMEOUT = 6


def _process_of(key: str) -> int:
  return int(key.rstrip("/").rsplit("/", 1)[-1])


class PeerWatch:
  """One process's view of the others' heartbeats. `check` is the whole decision (tests call
  it with a fake store and clock); `start` runs it in a thread."""

  def __init__(self, store, process_index: int, process_count: int, timeout_s: float,
               clock=time.monotonic):
    self.store = store
    self.process_index = process_index
    self.process_count = process_count
    self.timeout_s = timeout_s
    self.clock = clock
    self._beats = 0
    now = clock()
    self._last_change = {i: now for i in range(process_count) if i != process_index}
    self._last_value = {}
    self._store_ok_since = now  # the last time the store answered
    self._stopped = threading.Event()

  def _entries(self, directory: str) -> dict[int, str]:
    return {_process_of(key): value for key, value in self.store.key_value_dir_get(directory)}

  def check(self) -> str | None:
    """Beats once and reads the others; a sentence naming a lost process, or None."""
    now = self.clock()
    try:
      self._beats += 1
      self.store.key_value_set(f"{_ALIVE}{self.process_index}", str(self._beats),
                               allow_overwrite=True)
      alive, done, failed = (self._entries(d) for d in (_ALIVE, _DONE, _FAILED))
    except Exception as e:  # the store is process 0's coordination service
      if now - self._store_ok_since > self.timeout_s:
        first_line = (str(e).strip().splitlines() or [""])[0][:200]
        return (f"process 0 (which coordinates the run) has not answered for "
                f"{now - self._store_ok_since:.0f}s ({first_line})")
      return None
    self._store_ok_since = now
    for peer, message in sorted(failed.items()):
      if peer != self.process_index:
        return f"process {peer} stopped with an error ({message})"
    for peer in self._last_change:
      if peer in done:
        continue
      value = alive.get(peer)
      if value != self._last_value.get(peer):
        self._last_value[peer] = value
        self._last_change[peer] = now
      elif now - self._last_change[peer] > self.timeout_s:
        return f"process {peer} has shown no sign of life for {now - self._last_change[peer]:.0f}s"
    return None

  def run(self, on_lost) -> None:
    interval = self.timeout_s / _BEATS_PER_TIMEOUT
    while not self._stopped.wait(interval):
      lost = self.check()
      if lost and not self._stopped.is_set():
        on_lost(lost)
        return

  def start(self, on_lost) -> "PeerWatch":
    self._thread = threading.Thread(target=self.run, args=(on_lost,), daemon=True,
                                    name="jaxcls-peer-watch")
    self._thread.start()
    return self

  def wait_for_verdict(self) -> None:
    """Gives the thread the time to name a lost peer (and end this process)."""
    self._thread.join(self.timeout_s * 1.5)

  def finish(self) -> None:
    """This process ended normally: the others stop expecting its heartbeat."""
    self._stopped.set()
    self._mark(_DONE, "done")

  def fail(self, message: str) -> None:
    """This process ends with `message`: the others stop too, saying why."""
    self._stopped.set()
    self._mark(_FAILED, message[:300])

  def _mark(self, directory: str, value: str) -> None:
    try:
      self.store.key_value_set(f"{directory}{self.process_index}", value, allow_overwrite=True)
    except Exception:  # the coordinator is gone already: nobody is left to tell
      pass


def exit_now(message: str) -> None:
  """Prints `message` and ends the process at once: a normal exit would run JAX's shutdown,
  which waits for the lost process and then aborts with a C++ stack dump."""
  sys.stdout.flush()
  print(message, file=sys.stderr, flush=True)
  os._exit(1)


def watch_peers(process_index: int, process_count: int, timeout_s: float,
                checkpoint_note) -> PeerWatch:
  """Starts the heartbeat thread of a joined multi-process run; `checkpoint_note()` says
  which checkpoint a restart would resume from."""
  store = jax_distributed.global_state.client

  def on_lost(lost: str):
    exit_now(f"error: process {process_index} of {process_count} stops: {lost}. "
             f"{checkpoint_note()} Start every process again with the same command to resume.")

  return PeerWatch(store, process_index, process_count, timeout_s).start(on_lost)
