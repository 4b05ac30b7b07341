"""Preemption: SIGTERM saves the step it is on and exits 0, the resume is bit-identical (also
from a run with worker processes, resumed without); a signal to one of two processes stops
both at the same step."""

import json
import signal
import time

import numpy as np
import pytest

from helpers import assert_same_as_reference
from jaxcls import preemption
from runner import REFERENCE_RUN as RUN, REFERENCE_STEPS as STEPS
from runner import completed_steps, run_main, signal_group, start_main
from runner import start_processes, still_running, wait_for_line


def test_sigterm_saves_exits_0_and_resume_is_bit_identical(tmp_path, reference):
  proc = start_main(tmp_path, *RUN)
  wait_for_line(proc, f"step 10/{STEPS}")
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert "Stopped by SIGTERM" in out
  stopped_at = completed_steps(tmp_path)[-1]
  assert 10 <= stopped_at < STEPS  # the step it was on, not the last interval checkpoint

  resumed = run_main(tmp_path, *RUN)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {tmp_path / 'checkpoints' / str(stopped_at)}" in resumed.stdout
  assert_same_as_reference(tmp_path, reference)


def test_sigterm_to_the_group_with_2_workers_saves_and_resumes_with_0_bit_identical(
    tmp_path, reference):
  """The signal reaches grain's worker processes too (a terminal's or a scheduler's group
  signal): they ignore it and end with the run, which saves the step its loop was on. The
  workers had read batches ahead; the resume without workers continues with the batches
  the loop had not taken."""
  returncode, out, kids, workers = signal_group(tmp_path, *RUN, "--config.data.num_workers=2",
                                                after=f"step 10/{STEPS}", sig=signal.SIGTERM)
  assert returncode == 0, out[-3000:]
  assert "Stopped by SIGTERM" in out and "Traceback" not in out, out[-3000:]
  assert len(workers) == 2 and still_running(kids, 10) == []
  stopped_at = completed_steps(tmp_path)[-1]
  assert 10 <= stopped_at < STEPS

  resumed = run_main(tmp_path, *RUN, "--config.data.num_workers=0")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"(step {stopped_at}), data position included" in resumed.stdout
  assert_same_as_reference(tmp_path, reference)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  # Saves only on the signal and at the end: the interval saves (every 4 steps) are two-process
  # commits that nothing here checks.
  run = (*RUN, "--config.log_every_steps=2",
         f"--config.checkpoint.every_steps={STEPS}")
  procs = start_processes(tmp_path, *run)
  wait_for_line(procs[0], f"step 10/{STEPS}")
  procs[1].send_signal(signal.SIGTERM)  # only one process hears it
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert "Stopped by a signal to another process" in outputs[0]
  stopped_at = completed_steps(tmp_path)[-1]
  assert stopped_at % 2 == 0 and 10 <= stopped_at < STEPS  # a common check step
  state_dir = tmp_path / "checkpoints" / str(stopped_at)
  assert (state_dir / "commit_success.txt").exists()
  # One data position for both: each took one batch a step.
  assert json.loads((state_dir / "data_position" / "metadata").read_text()) == {
      "version": 1, "next_batch": stopped_at}

  procs = start_processes(tmp_path, *run)
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert f"(step {stopped_at}), data position included" in outputs[0]
  assert f"step {STEPS}/{STEPS}" in outputs[0]


def test_sigterm_during_the_final_evaluation_saves_exits_0_and_resumes_to_the_end(
    tmp_path, reference):
  """Before, the guard was gone by the final evaluation: exit -15, no message, and the last
  checkpoint left as a temporary directory."""
  # 32 eval batches: time to be signalled (8, one example a device, trips an XLA:CPU
  # rendezvous timeout on 2 cores with or without a signal)
  slow_eval = (*RUN, "--config.eval_batch_size=64")
  proc = start_main(tmp_path, *slow_eval)
  wait_for_line(proc, f"step {STEPS}/{STEPS}")
  time.sleep(0.5)  # past the loop's last signal check: in the final save's wait or the eval
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-3000:]
  assert (f"Stopped by SIGTERM during the final evaluation; step {STEPS} is saved in "
          f"{tmp_path / 'checkpoints' / str(STEPS)}") in out
  assert completed_steps(tmp_path)[-1] == STEPS
  assert not list((tmp_path / "checkpoints").glob("*tmp*"))
  assert not (tmp_path / "results.json").exists()

  resumed = run_main(tmp_path, *slow_eval)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"(step {STEPS})" in resumed.stdout and "Done:" in resumed.stdout
  final = json.loads((tmp_path / "results.json").read_text())["eval"]
  expected = json.loads((reference / "results.json").read_text())["eval"]
  assert final["accuracy"] == expected["accuracy"]
  assert final["loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_several_processes_compare_flags_only_where_the_host_waits_anyway(monkeypatch):
  """Between log steps the loop makes no host sync of its own: no all-gather is asked."""
  gathered = []
  monkeypatch.setattr(preemption.jax, "process_count", lambda: 2)
  monkeypatch.setattr(preemption.multihost_utils, "process_allgather",
                      lambda flag: gathered.append(int(flag)) or np.array([int(flag), 1]))
  guard = preemption.PreemptionGuard()
  assert not guard.should_stop(host_waits=False) and gathered == []
  assert guard.should_stop(host_waits=True) and gathered == [0]  # the other process's signal
