"""Command line: `python -m jaxcls.main --config configs/default.py --workdir runs/default`.

Parses flags, starts multi-process JAX if asked, and calls jaxcls.train.run; no training
logic lives here, so a notebook can call train.run(config, workdir) the same way.
Any config key can be overridden: `--config.batch_size=512 --config.model.name=resnet50`.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (a .py with get_config()).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics, logs and results.")
# Multi-process runs: these override config.distributed.*; without them the environment
# or JAX's cluster detection decide (see jaxcls/distributed.py).
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0, for a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in the run.")
flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl parsing, but a bad --config.key=value ends with one readable line, no traceback."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to list the flags.")
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    message = (str(e).strip("'\"").replace("\\n", " ").replace('\\"', '"')
               .replace("\\'", "'"))
    sys.exit(f"error: bad config override: {message}")


# Steps that compile faster than this are not worth a cache file (and eager ops would add
# hundreds of tiny ones); the train and eval steps of every model here take longer.
CACHE_MIN_COMPILE_SECONDS = 0.3


def enable_compilation_cache(path: str) -> None:
  """Turns JAX's persistent compilation cache on at path ("" turns it off); before any jit."""
  import jax  # pylint: disable=g-import-not-at-top

  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  path = os.path.expanduser(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # a read-only home must not stop training
    logging.warning("Compilation cache off: cannot create %s (%s).", path, e)
    return
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  # Imported after flag parsing: grain worker processes read absl flags.
  from jaxcls import checkpoint
  from jaxcls import config as config_lib
  from jaxcls import distributed, train

  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    config_lib.check_known_keys(config)  # before config.distributed is read
    enable_compilation_cache(config.compilation_cache_dir)
    distributed.initialize(config.distributed, _COORDINATOR.value, _NUM_PROCESSES.value,
                           _PROCESS_ID.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  except ValueError as e:  # inconsistent process settings
    sys.exit(f"error: {e}")
  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f"config error: {e}")
  except checkpoint.CheckpointError as e:
    sys.exit(f"checkpoint error: {e}")
  except FloatingPointError as e:
    sys.exit(f"training stopped: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
