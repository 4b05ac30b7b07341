"""Fake CPU devices for a benchmark script: call `use(n)` before anything imports jax.

Layouts and collectives depend on the device count, not on the device kind, so N fake CPU
devices show them on any machine. Also puts the repository first on sys.path, so the script
runs this checkout's jaxcls.
"""

import os
import sys


def use(num_devices: int) -> None:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={num_devices}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
