"""How far the host may run ahead of the device: a bound on the steps dispatched but not done.

JAX dispatches a jitted step asynchronously, so a loop that never reads a result can queue
hundreds of steps. XLA:CPU (jaxlib 0.10.2) with several devices then deadlocks in the step's
all-reduce: a small data-parallel step run 300 times on 2 cores, waiting every 50 steps, hung
in 5 of 5 tries on 2 and on 8 fake devices; waiting every 4, in none
(scripts/cpu_allreduce_hang.py, benchmarks/README.md "XLA:CPU and steps ahead",
tests/test_dispatch.py). A few steps ahead is all a device needs to stay busy while the host
dispatches the next one, so the loop waits for the step `limit` back before going on.
"""

import collections

import jax

STEPS_AHEAD = 4  # steps dispatched beyond the one the host last waited for


class StepsInFlight:
  """Call `add(outputs)` after each step: it waits until at most `limit` steps are pending."""

  def __init__(self, limit: int = STEPS_AHEAD, wait=jax.block_until_ready):
    if limit < 1:
      raise ValueError(f"limit must be at least 1, got {limit}")
    self.limit = limit
    self._wait = wait
    self._pending = collections.deque()

  def add(self, outputs) -> None:
    """outputs: any pytree of arrays the step returned (its metrics are enough: a step's
    outputs are ready together)."""
    self._pending.append(outputs)
    if len(self._pending) > self.limit:
      self._wait(self._pending.popleft())

  def __len__(self) -> int:
    return len(self._pending)
