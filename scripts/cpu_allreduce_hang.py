"""How often XLA:CPU stops in an all-reduce when the host runs many steps ahead.

    python scripts/cpu_allreduce_hang.py                     # 2 and 8 devices, 50 and 4 ahead
    python scripts/cpu_allreduce_hang.py --devices 8 --ahead 50,10,4 --tries 5

Each try is a fresh process that runs a small data-parallel train step (a gradient all-reduce)
300 times on `--xla_force_host_platform_device_count=N` devices, waiting for a result only
every `ahead` steps. A try that hangs ends when XLA's collective timeout (set here to
--timeout seconds) aborts it. jaxcls's loops wait at most 4 steps back (jaxcls/dispatch.py);
the figures are in benchmarks/README.md ("XLA:CPU and steps ahead").
"""

import argparse
import os
import subprocess
import sys
import time

TRY = """
import jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((jax.device_count(),), ("data",))
x = jax.device_put(jnp.ones((8 * jax.device_count(), 64)), NamedSharding(mesh, P("data")))
w = jax.device_put(jnp.ones((64, 64)), NamedSharding(mesh, P()))

@jax.jit
def step(w, x):
  grad = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)
  return w - 1e-3 * grad

for i in range(300):
  w = step(w, x)
  if i % AHEAD == 0:
    jax.block_until_ready(w)
jax.block_until_ready(w)
"""


def one_try(devices: int, ahead: int, timeout: int) -> bool:
  """True when the try finished, False when XLA aborted it in a stuck collective."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={devices} "
      f"--xla_cpu_collective_call_terminate_timeout_seconds={timeout}"))
  result = subprocess.run([sys.executable, "-c", f"AHEAD = {ahead}\n{TRY}"], env=env,
                          capture_output=True, text=True, timeout=timeout + 300)
  if result.returncode != 0 and "Termination timeout" not in result.stderr:
    raise RuntimeError(f"{devices} devices: the try failed for another reason:\n"
                       f"{result.stderr[-2000:]}")
  return result.returncode == 0


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", default="2,8", help="comma-separated device counts")
  parser.add_argument("--ahead", default="50,4", help="comma-separated steps between waits")
  parser.add_argument("--tries", type=int, default=6)
  parser.add_argument("--timeout", type=int, default=8,
                      help="seconds a collective may wait before XLA aborts the try")
  flags = parser.parse_args()
  import jax  # pylint: disable=import-outside-toplevel
  print(f"jax {jax.__version__}, {os.cpu_count()} CPUs")
  print("| fake devices | steps ahead | hung tries | seconds |\n| --- | --- | --- | --- |")
  for devices in [int(d) for d in flags.devices.split(",")]:
    for ahead in [int(a) for a in flags.ahead.split(",")]:
      start = time.perf_counter()
      hung = sum(not one_try(devices, ahead, flags.timeout) for _ in range(flags.tries))
      print(f"| {devices} | {ahead} | {hung} of {flags.tries} | "
            f"{time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
  main()
