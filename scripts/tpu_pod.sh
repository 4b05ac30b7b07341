#!/usr/bin/env bash
# Runs jaxcls on every host of a Cloud TPU pod slice: one process per host, using all of the
# host's chips. JAX learns the slice (hosts, this host's index, the coordinator) from the TPU
# metadata server, so the run uses config.distributed.cluster_detection='jax'.
#
#   TPU_NAME=my-v5p-32 ZONE=us-east5-a scripts/tpu_pod.sh configs/imagenet_resnet50.py \
#       /mnt/shared/runs/r50 --config.batch_size=2048 --config.mesh.fsdp=4
#
# Environment: TPU_NAME and ZONE (required), PROJECT (optional), REPO_DIR (the checkout on
# the hosts, default ~/jaxcls), COPY=1 to copy this checkout there and install it first
# (pip install '.[tpu]'). The workdir must be a path every host can write (a shared disk or a
# gcsfuse mount): every process writes its part of each checkpoint.
set -euo pipefail

if [[ $# -lt 2 || -z "${TPU_NAME:-}" || -z "${ZONE:-}" ]]; then
  echo "usage: TPU_NAME=NAME ZONE=ZONE $0 CONFIG WORKDIR [--config.key=value ...]" >&2
  exit 2
fi
config=$1
workdir=$2
shift 2
repo_dir=${REPO_DIR:-'~/jaxcls'}
gcloud_args=(--zone "$ZONE")
if [[ -n "${PROJECT:-}" ]]; then gcloud_args+=(--project "$PROJECT"); fi

if [[ "${COPY:-0}" == 1 ]]; then
  here=$(cd "$(dirname "$0")/.." && pwd)
  gcloud compute tpus tpu-vm scp --recurse "$here" "$TPU_NAME:$repo_dir" --worker=all \
      "${gcloud_args[@]}"
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_args[@]}" \
      --command "cd $repo_dir && python3 -m pip install -q '.[tpu]'"
fi

# Quote every argument for the remote shell.
args=$(printf '%q ' --config "$config" --workdir "$workdir" \
    --config.distributed.cluster_detection=jax "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${gcloud_args[@]}" \
    --command "cd $repo_dir && python3 -m jaxcls.main $args"
