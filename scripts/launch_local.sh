#!/usr/bin/env bash
# Runs N jaxcls processes on this machine, the way N hosts would run, to try multi-host
# training without a cluster. Each process gets its own fake CPU devices; they talk over
# gloo on 127.0.0.1 and find each other through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
# JAX_PROCESS_ID (jaxcls/distributed.py).
#
#   scripts/launch_local.sh 2 --config configs/default.py --workdir runs/local2 \
#       --config.mesh.fsdp=2 --config.num_train_steps=20
#
# Environment: DEVICES_PER_PROCESS (default 4), PORT (default: a free one), PYTHON (default
# python3). Only process 0 prints progress and writes metrics; every process joins in
# checkpoints. If one process fails, the others are stopped and its exit status is returned.
set -euo pipefail

if [[ $# -lt 1 || ! "$1" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NUM_PROCESSES --config CONFIG --workdir WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
num_processes=$1
shift
python=${PYTHON:-python3}
devices=${DEVICES_PER_PROCESS:-4}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}

pids=()
stop_all() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap stop_all INT TERM

for ((i = 0; i < num_processes; i++)); do
  # The device-count flag goes last, so it wins over one already in XLA_FLAGS.
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}" \
  JAX_PLATFORMS=cpu \
  JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}" \
  JAX_NUM_PROCESSES="${num_processes}" \
  JAX_PROCESS_ID="${i}" \
  LOCAL_WORLD_SIZE="${num_processes}" \
    "$python" -m jaxcls.main "$@" &
  pids+=($!)
done

status=0
for ((i = 0; i < num_processes; i++)); do
  # The first failure decides the exit status; the processes stopped after it do not.
  wait -n || { code=$?; if ((status == 0)); then status=$code; fi; stop_all; }
done
exit "$status"
