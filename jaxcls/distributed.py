"""Starts multi-process JAX when this run is one of several processes; a no-op otherwise."""

import jax


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> None:
  """Joins the other processes of a multi-process run.

  With a coordinator address, the run is explicit (local launches, any cluster); with none,
  nothing happens and JAX runs as a single process.
  """
  if not coordinator_address:
    return
  if num_processes <= 0 or process_id < 0:
    raise ValueError(
        "--coordinator_address needs --num_processes and --process_id as well "
        f"(got num_processes={num_processes}, process_id={process_id}).")
  # CPU collectives across processes need gloo (the default has none). Harmless on GPU/TPU,
  # and it must be set before the backend starts, so it cannot depend on the backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                             process_id=process_id)
