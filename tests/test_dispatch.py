"""The host stays a few steps ahead of the device: the bound itself, and the hang it prevents."""

import pytest

from jaxcls import dispatch
from runner import run_main


def test_the_host_waits_for_the_step_limit_back_and_keeps_the_rest_pending():
  waited = []
  in_flight = dispatch.StepsInFlight(limit=4, wait=waited.append)
  for step in range(1, 11):
    in_flight.add(step)
    assert len(in_flight) == min(step, 4)
  assert waited == [1, 2, 3, 4, 5, 6]  # in order, each once
  with pytest.raises(ValueError, match="at least 1"):
    dispatch.StepsInFlight(limit=0)


def test_a_long_log_interval_on_eight_cpu_devices_does_not_hang(tmp_path):
  """150 steps with no fetch between them: without the bound, XLA:CPU stopped in the gradient
  all-reduce in every try (2 of 2 on a 2-core AMD EPYC); its collective timeout is set short here
  so a regression fails in seconds, not minutes."""
  result = run_main(
      tmp_path, "--config.model.name=resnet_tiny", "--config.model.stem=small",
      "--config.model.width=8", "--config.num_train_steps=150", "--config.batch_size=64",
      "--config.log_every_steps=150", "--config.eval_every_epochs=0",
      "--config.data.source=synthetic", "--config.data.synthetic_size=1024",
      XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                "--xla_cpu_collective_call_terminate_timeout_seconds=10")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "step 150/150" in result.stdout and "may be stuck" not in result.stderr
