"""Starts multi-process JAX when this run is one of several processes; a no-op otherwise.

Where the coordinator address, process count and process id come from, first found wins:
  1. explicit: command-line flags, else config.distributed;
  2. JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID (scripts/launch_local.sh);
  3. MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK, as torchrun and Kubernetes training
     operators set them (with LOCAL_RANK: one GPU per process);
  4. JAX's own cluster detection (SLURM under srun, Open MPI under mpirun, Kubernetes indexed
     jobs, TPU pods): with cluster_detection='auto' only when the environment shows a
     multi-process launch; with 'jax' always (a GCE TPU pod slice, which only the metadata
     server describes); never with 'off'.
"""

import dataclasses
import importlib.util
import os
import sys
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxcls import liveness
from jaxcls.errors import ConfigError, check_choice

CLUSTER_DETECTION = ("auto", "jax", "off")
# What a collective or the coordination service says when a peer process is gone.
_PEER_FAILURE_MARKERS = ("Connection reset by peer", "Connection refused", "Connection closed",
                         "heartbeat timeout", "unhealthy", "Broken pipe", "Gloo")
# jax.distributed's own connect timeout is a backstop behind our watchdog: when it expires
# the runtime aborts the process with a C++ stack trace instead of a Python error.
_JAX_TIMEOUT_MARGIN_S = 60


@dataclasses.dataclass(frozen=True)
class Settings:
  """What to pass to jax.distributed.initialize; None fields are left to cluster detection."""
  source: str
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


def check_config(dist_config) -> None:
  """config.distributed: the detection mode and the join timeout."""
  check_choice("distributed.cluster_detection", dist_config.cluster_detection,
               CLUSTER_DETECTION)
  for key in ("timeout_seconds", "peer_timeout_seconds"):
    if dist_config[key] <= 0:
      raise ConfigError(f"config.distributed.{key}={dist_config[key]} must be positive.")


def _int_env(environ, name: str) -> int:
  try:
    return int(environ[name])
  except ValueError:
    raise ValueError(f"Environment variable {name}={environ[name]!r} is not an integer.") from None


def _checked(settings: Settings) -> Settings | None:
  """Validates explicit values; None when there is only one process (nothing to join)."""
  n, i = settings.num_processes, settings.process_id
  if n is None:
    return settings
  if n < 1 or not 0 <= i < n:
    raise ValueError(f"{settings.source}: process id {i} is not in 0..{n - 1} "
                     f"({n} processes).")
  return None if n == 1 else settings


def detect_cluster(environ=None) -> str | None:
  """Names the multi-process launcher that the environment shows, if any."""
  env = os.environ if environ is None else environ

  def count(name):
    try:
      return int(env.get(name, "1"))
    except ValueError:
      return 1

  # JAX's SLURM support reads these; they are all set only inside `srun`.
  slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
           "SLURM_LOCALID")
  if all(name in env for name in slurm) and count("SLURM_NTASKS") > 1:
    return "slurm"
  if "OMPI_MCA_orte_hnp_uri" in env and count("OMPI_COMM_WORLD_SIZE") > 1:
    return "ompi"
  if ("," in env.get("TPU_WORKER_HOSTNAMES", "") or "," in env.get("TPU_PROCESS_ADDRESSES", "")
      or env.get("MEGASCALE_COORDINATOR_ADDRESS")):
    return "tpu"
  # JAX finds the peers of an indexed Job (or JobSet) through the Kubernetes API.
  if ("KUBERNETES_SERVICE_HOST" in env and "JOB_COMPLETION_INDEX" in env
      and importlib.util.find_spec("kubernetes") is not None):
    return "kubernetes"
  return None


def resolve(dist_config, coordinator_address: str = "", num_processes: int = 0,
            process_id: int = -1, environ=None) -> Settings | None:
  """Where this process's place in the run comes from; None for a single-process run.

  The keyword arguments are the command-line flags; set ones override dist_config.
  """
  check_config(dist_config)
  env = os.environ if environ is None else environ
  address = coordinator_address or dist_config.coordinator_address
  count = num_processes if num_processes > 0 else dist_config.num_processes
  index = process_id if process_id >= 0 else dist_config.process_id
  if address or count > 1:
    if not address or count <= 0 or index < 0:
      raise ValueError(
          "A multi-process run needs the coordinator address, the process count and this "
          "process's id together (--coordinator_address, --num_processes, --process_id or "
          f"config.distributed.*); got address={address!r}, num_processes={count}, "
          f"process_id={index}.")
    return _checked(Settings("flags / config.distributed", address, count, index))

  jax_names = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
  if "JAX_NUM_PROCESSES" in env or "JAX_PROCESS_ID" in env:
    missing = [name for name in jax_names if not env.get(name)]
    if missing:
      raise ValueError(f"{', '.join(missing)} not set, but other JAX_* process variables are: "
                       f"set all of {', '.join(jax_names)}.")
    return _checked(Settings(
        "JAX_* environment variables", env["JAX_COORDINATOR_ADDRESS"],
        _int_env(env, "JAX_NUM_PROCESSES"), _int_env(env, "JAX_PROCESS_ID")))

  torch_names = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
  if all(env.get(name) for name in torch_names) and _int_env(env, "WORLD_SIZE") > 1:
    local = None
    if "LOCAL_RANK" in env and _int_env(env, "LOCAL_WORLD_SIZE" if "LOCAL_WORLD_SIZE" in env
                                        else "WORLD_SIZE") > 1:
      local = (_int_env(env, "LOCAL_RANK"),)  # several processes per host: one GPU each
    return _checked(Settings(
        "MASTER_ADDR / WORLD_SIZE / RANK environment variables",
        f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}", _int_env(env, "WORLD_SIZE"),
        _int_env(env, "RANK"), local))

  mode = dist_config.cluster_detection
  if mode == "jax":
    return Settings("JAX's cluster detection")
  cluster = detect_cluster(env) if mode == "auto" else None
  return Settings(f"JAX's cluster detection ({cluster})") if cluster else None


def _join_failed_message(settings: Settings, timeout_s: float) -> str:
  who = (f"process {settings.process_id} of {settings.num_processes}"
         if settings.num_processes else "this process")
  where = settings.coordinator_address or "the detected coordinator"
  return (
      f"error: {who} could not join the multi-process run at {where} within {timeout_s:g}s "
      f"(settings from {settings.source}). Check that every process was started with the same "
      "coordinator address and process count and a distinct process id, that process 0 runs "
      "and its port is reachable from this host, and that no stale process holds the port. "
      "If the processes start far apart, raise config.distributed.timeout_seconds.")


def initialize(dist_config, coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> Settings | None:
  """Joins the other processes of a multi-process run; returns how, or None (one process).

  Waits at most dist_config.timeout_seconds for all processes to arrive, then ends this
  process with exit status 1 and a message that says what to check (the JAX runtime itself
  would abort with a C++ stack trace, or wait much longer).
  """
  settings = resolve(dist_config, coordinator_address, num_processes, process_id)
  if settings is None or jax.distributed.is_initialized():
    return None
  timeout_s = float(dist_config.timeout_seconds)  # positive: resolve() checked it
  # CPU collectives across processes need gloo (the default has none). Harmless on GPU/TPU,
  # and it must be set before the backend starts, so it cannot depend on the backend.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")

  joined = threading.Event()

  def watchdog():
    if not joined.wait(timeout_s):
      print(_join_failed_message(settings, timeout_s), file=sys.stderr, flush=True)
      sys.stdout.flush()
      os._exit(1)  # the main thread is blocked inside the runtime; nothing else can stop it

  threading.Thread(target=watchdog, name="distributed-join-watchdog", daemon=True).start()
  try:
    jax.distributed.initialize(
        settings.coordinator_address, num_processes=settings.num_processes,
        process_id=settings.process_id,
        local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None,
        initialization_timeout=int(timeout_s) + _JAX_TIMEOUT_MARGIN_S,
        # JAX's own heartbeat aborts with a C++ stack dump: liveness.py acts first.
        heartbeat_timeout_seconds=int(dist_config.peer_timeout_seconds) + _JAX_TIMEOUT_MARGIN_S)
  except ValueError as e:  # cluster detection found nothing, or inconsistent values
    raise ValueError(f"Could not start the multi-process run ({settings.source}): {e}") from None
  finally:
    joined.set()
  return settings


def is_peer_failure(error: BaseException) -> bool:
  """Whether `error` is the runtime reporting that another process of this run is gone.
  (A collective that fails at dispatch raises ValueError, one that fails while it runs
  JaxRuntimeError.)"""
  return (jax.process_count() > 1 and isinstance(error, (RuntimeError, ValueError))
          and any(marker in str(error) for marker in _PEER_FAILURE_MARKERS))


def exit_after_lost_peer(error: BaseException, checkpoint_note: str):
  """Ends this process at once with one line (liveness.exit_now says why at once)."""
  first_line = (str(error).strip().splitlines() or [""])[0][:300]
  liveness.exit_now(
      f"error: process {jax.process_index()} of {jax.process_count()} lost contact with "
      f"another process of this run ({first_line}). {checkpoint_note} Start every process "
      "again with the same command to resume.")


def agree_on_max(value: int) -> int:
  """The largest of every process's value: a failure anywhere is a failure everywhere."""
  if jax.process_count() == 1:
    return value
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))


def broadcast_text(text: str | None, size: int = 2048) -> str | None:
  """Process 0's text (or None) on every process (cut at `size` bytes)."""
  if jax.process_count() == 1:
    return text
  encoded = np.zeros(size + 1, np.uint8)
  if text is not None:
    raw = text.encode()[:size]
    encoded[0], encoded[1:len(raw) + 1] = 1, np.frombuffer(raw, np.uint8)
  encoded = np.asarray(multihost_utils.broadcast_one_to_all(encoded))
  return bytes(encoded[1:]).rstrip(b"\0").decode(errors="replace") if encoded[0] else None

