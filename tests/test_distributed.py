"""Multi-process runs: where the settings come from, clear errors for missing ones and
missing peers, and 2 processes x 4 devices training like 1 process x 8."""

import json
import sys

import numpy as np
import pytest

from jaxcls import config as config_lib
from jaxcls import distributed
from runner import REPO, free_port, run_command, run_main, start_processes, train_losses


def dist_config(**values):
  config = config_lib.base_config().distributed
  config.update(values)
  return config


def test_distributed_settings_come_in_order():
  resolve = distributed.resolve
  jax_env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4",
             "JAX_PROCESS_ID": "2"}
  torch_env = {"MASTER_ADDR": "10.0.0.9", "MASTER_PORT": "29500", "WORLD_SIZE": "2",
               "RANK": "1"}
  slurm_env = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2",
               "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}
  # Nothing anywhere: one process.
  assert resolve(dist_config(), environ={}) is None
  # Flags beat config, config beats the environment.
  explicit = resolve(dist_config(coordinator_address="h:1", num_processes=2, process_id=0),
                     "f:9", 3, 2, environ=jax_env)
  assert (explicit.coordinator_address, explicit.num_processes, explicit.process_id) == (
      "f:9", 3, 2)
  from_config = resolve(dist_config(coordinator_address="h:1", num_processes=2, process_id=1),
                        environ=jax_env)
  assert (from_config.coordinator_address, from_config.process_id) == ("h:1", 1)
  # JAX_* beat torchrun-style variables, which beat cluster detection.
  env = resolve(dist_config(), environ={**jax_env, **torch_env, **slurm_env})
  assert (env.coordinator_address, env.num_processes, env.process_id) == ("10.0.0.1:1234", 4, 2)
  env = resolve(dist_config(), environ={**torch_env, **slurm_env})
  assert (env.coordinator_address, env.num_processes, env.process_id) == ("10.0.0.9:29500", 2, 1)
  detected = resolve(dist_config(), environ=slurm_env)
  assert detected.coordinator_address is None and "slurm" in detected.source
  assert resolve(dist_config(cluster_detection="off"), environ=slurm_env) is None
  assert resolve(dist_config(), environ={**slurm_env, "SLURM_NTASKS": "1"}) is None
  assert resolve(dist_config(cluster_detection="jax"), environ={}).coordinator_address is None
  assert distributed.detect_cluster({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
  assert distributed.detect_cluster({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "4"}
                                    ) == "ompi"


@pytest.mark.parametrize("kwargs,environ,message", [
    ({"coordinator_address": "h:1"}, {}, "needs the coordinator address, the process count"),
    ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, {}, r"not in 0\.\.1"),
    ({}, {"JAX_NUM_PROCESSES": "2"}, "JAX_COORDINATOR_ADDRESS, JAX_PROCESS_ID not set"),
])
def test_incomplete_distributed_settings_say_what_is_missing(kwargs, environ, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(dist_config(**kwargs), environ=environ)


SMOKE = ("--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
         "--config.num_train_steps=3", "--config.log_every_steps=1", "--config.batch_size=32",
         "--config.eval_batch_size=512")


def test_missing_peers_end_in_a_clear_error_not_a_hang(tmp_path):
  result = run_main(tmp_path, *SMOKE, f"--coordinator_address=127.0.0.1:{free_port()}",
                    "--num_processes=2", "--process_id=0",
                    "--config.distributed.timeout_seconds=2", devices=4, timeout=60)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "process 0 of 2 could not join the multi-process run at 127.0.0.1:" in result.stderr, (
      result.stderr[-2000:])
  assert "within 2s" in result.stderr and "Check Failure" not in result.stderr


# 2 processes x 4 devices against 1 x 8 on the same global mesh, with ZeRO-2 over fsdp and the
# model axis. Not with grad_accum_steps > 1: each process reads its own share of the data, so
# the global batch holds the same examples in another order, and with BatchNorm the
# micro-batches (which examples are normalized together) depend on that order.
PARALLEL = (*SMOKE, "--config.mesh.fsdp=2", "--config.mesh.model=2",
            "--config.mesh.zero_stage=2", "--config.mesh.fsdp_min_size=256",
            "--config.optim.warmup_epochs=0")


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
  """The one-process run both launches of two processes must reproduce."""
  workdir = tmp_path_factory.mktemp("single")
  single = run_main(workdir, *PARALLEL)
  assert single.returncode == 0, single.stderr[-3000:]
  return workdir


def assert_same_run(multi, single):
  assert len(train_losses(multi)) == 3
  np.testing.assert_allclose(train_losses(multi), train_losses(single), rtol=1e-5)
  multi_eval = json.loads((multi / "eval" / "test_3.json").read_text())
  single_eval = json.loads((single / "eval" / "test_3.json").read_text())
  assert multi_eval["num_examples"] == 2000 and sum(multi_eval["per_class"]["support"]) == 2000
  assert multi_eval["confusion_matrix"] == single_eval["confusion_matrix"]  # every example once


def test_launch_local_two_processes_match_one_process(tmp_path, single_process_run):
  """scripts/launch_local.sh: the processes find each other through JAX_* variables."""
  # The script sets each process's device count (DEVICES_PER_PROCESS) in XLA_FLAGS.
  multi = run_command(
      ["bash", str(REPO / "scripts/launch_local.sh"), "2", "--config",
       str(REPO / "configs/default.py"), "--workdir", str(tmp_path / "multi"), *PARALLEL],
      devices=1, XLA_FLAGS="", PYTHON=sys.executable, DEVICES_PER_PROCESS="4")
  assert multi.returncode == 0, multi.stderr[-3000:]
  assert multi.stdout.count("step 3/3") == 1  # only process 0 logs
  assert "2 process(es)" in multi.stdout
  assert_same_run(tmp_path / "multi", single_process_run)


def test_two_processes_match_one_process(tmp_path, single_process_run):
  """--coordinator_address / --num_processes / --process_id on loopback."""
  procs = start_processes(tmp_path / "multi", *PARALLEL)
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "step 3/3" in outputs[0] and "step 3/3" not in outputs[1]  # only process 0 logs
  assert_same_run(tmp_path / "multi", single_process_run)
