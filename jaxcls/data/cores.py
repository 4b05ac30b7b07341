"""How many CPU cores this process may use: sizes thread pools and worker processes."""

import os


def available_cores() -> int:
  try:
    return len(os.sched_getaffinity(0))  # respects taskset / container CPU limits
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1
