"""How many CPU cores this process may use: sizes thread pools and worker processes."""

import os
import re

# Launchers that start several processes per host say how many: torchrun, SLURM, Open MPI.
_PROCESSES_PER_HOST_VARS = ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE",
                            "OMPI_COMM_WORLD_LOCAL_SIZE")


def _affinity() -> int:
  try:
    return len(os.sched_getaffinity(0))  # respects taskset / container CPU limits
  except AttributeError:  # not on Linux
    return os.cpu_count() or 1


def processes_on_this_host(environ=None) -> int:
  """Training processes sharing this host, as the launcher's environment says (default 1)."""
  environ = os.environ if environ is None else environ
  for name in _PROCESSES_PER_HOST_VARS:
    match = re.match(r"\s*(\d+)", environ.get(name, ""))  # SLURM may say "8(x2)"
    if match and int(match.group(1)) > 0:
      return int(match.group(1))
  return 1


def available_cores(environ=None) -> int:
  """This process's cores: its CPU affinity, shared with the other processes on the host.

  When the affinity is already a part of the machine (SLURM's --cpus-per-task binding,
  taskset), the launcher split the cores and that part is the answer. When every process
  sees all of them (torchrun, 8 processes on a host of 8 GPUs), each gets its share, so 8
  processes do not each start a pool of workers for the whole machine.
  """
  cores = _affinity()
  if cores < (os.cpu_count() or cores):
    return cores
  return max(1, cores // processes_on_this_host(environ))
