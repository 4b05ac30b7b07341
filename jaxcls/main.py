"""Command line: `python -m jaxcls.main --config configs/default.py --workdir runs/default`.

Parses flags, starts multi-process JAX if asked, and calls jaxcls.train.run; no training
logic lives here (not even the compilation cache: jaxcls.build switches it on), so a notebook can call train.run(config, workdir) the same way.
Any config key can be overridden: `--config.batch_size=512 --config.model.name=resnet50`.
"""

import os
import sys
import traceback

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


def _config_file(argv) -> str:
  """The path given to --config (without its `:argument`), or ''."""
  for i, arg in enumerate(argv):
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1].partition(":")[0]
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1].partition(":")[0]
  return ""


def parse_flags(argv):
  """absl parsing, but a bad --config.key=value ends with one readable line, no traceback."""
  # Checked first: ml_collections would load it while parsing an override, or at first use,
  # and end in a traceback either way.
  config_file = _config_file(argv[1:])
  if config_file and not os.path.isfile(config_file):
    sys.exit(f"error: --config {config_file}: no such file (give the path of a config .py "
             "file, e.g. configs/default.py).")
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to list the flags.")
  except (AttributeError, KeyError, ValueError, TypeError) as e:
    message = (str(e).strip("'\"").replace("\\n", " ").replace('\\"', '"')
               .replace("\\'", "'"))
    sys.exit(f"error: bad config override: {message}")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  # Imported after flag parsing: grain worker processes read absl flags.
  from jaxcls import config as config_lib
  from jaxcls import checkpoint, distributed, liveness, train
  from jaxcls.errors import CheckpointError, ConfigError, DataError

  logging.set_verbosity(logging.WARNING)
  config = _CONFIG.value
  try:
    config_lib.check_known_keys(config)  # before config.distributed is read
    joined = distributed.initialize(config.distributed, _COORDINATOR.value,
                                    _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ConfigError as e:
    sys.exit(f"config error: {e}")
  except ValueError as e:  # inconsistent process settings
    sys.exit(f"error: {e}")
  watch = None
  if joined:
    import jax  # only now: jax.distributed has started
    watch = liveness.watch_peers(jax.process_index(), jax.process_count(),
                                 config.distributed.peer_timeout_seconds,
                                 lambda: checkpoint.newest_step_note(_WORKDIR.value))

  def stop(message: str):
    if watch is None:
      sys.exit(message)
    # The others may be waiting for this process in a collective: tell them, and skip JAX's
    # shutdown, which would wait for them (train.run has already finished its saves).
    watch.fail(message)
    liveness.exit_now(message)

  try:
    train.run(_CONFIG.value, _WORKDIR.value)
  except ConfigError as e:
    stop(f"config error: {e}")
  except CheckpointError as e:
    stop(f"checkpoint error: {e}")
  except DataError as e:  # an image that does not decode, reached by the pipeline
    stop(f"data error: {e}")
  except FloatingPointError as e:
    stop(f"training stopped: {e}")
  except Exception as e:
    if distributed.is_peer_failure(e):  # another process of the run died
      if watch is not None:
        watch.wait_for_verdict()  # it names the lost process
      distributed.exit_after_lost_peer(e, checkpoint.newest_step_note(_WORKDIR.value))
    if watch is None:
      raise
    traceback.print_exc()
    stop(f"error: {type(e).__name__}: {e}")
  if watch is not None:
    watch.finish()


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
