"""SIGTERM / SIGINT: finish the current step, save, and exit cleanly, on every process alike.

A signal only sets a flag. With one process the loop checks the flag after every step. With
several, each may get the signal at a different step, so they compare flags (one tiny
all-gather) and all stop at the same step: they save the same checkpoint and none waits
forever for a peer that already left. They compare only at steps where the host waits for
the devices anyway (log steps, saves, evaluations), so the agreement costs the loop no
extra sync; a signal stops the run within `config.log_every_steps` steps.

(JAX's own preemption sync point, `multihost_utils.reached_preemption_sync_point`, hears
only the SIGTERM that its C++ notifier catches, not Ctrl-C, and would need a host sync of
its own at every step it is asked.)
"""

import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils


class PreemptionGuard:
  """Catches SIGTERM and SIGINT while active; a second SIGINT interrupts at once."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None  # the signal's name once one arrived
    self._previous = {}

  def __enter__(self):
    # Signal handlers can only be set from the main thread (not, e.g., in a worker thread).
    if threading.current_thread() is threading.main_thread():
      for sig in self.SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.received and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the save
    self.received = signal.Signals(signum).name

  @property
  def source(self) -> str:
    """What stopped the run, for its last message."""
    return self.received or "a signal to another process"

  def should_stop(self, host_waits: bool) -> bool:
    """True on the step every process stops at (the same step on all of them). With several
    processes they compare only where `host_waits` (a step the host syncs at anyway), which
    every process must agree on."""
    if jax.process_count() > 1 and not host_waits:
      return False
    return self.any_process_received()

  def any_process_received(self) -> bool:
    """Whether a signal reached any process; with several, every process must call it."""
    if jax.process_count() == 1:
      return self.received is not None
    flags = multihost_utils.process_allgather(np.int32(self.received is not None))
    return bool(np.any(flags))
