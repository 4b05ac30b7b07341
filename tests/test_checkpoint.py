"""Checkpoints and faults: resume exactly after SIGTERM or kill -9, refuse bad state."""

import pathlib
import random
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from jaxcls import checkpoint
from runner import losses_by_step, run_main, start_main, start_processes

STEPS = 24
RUN = ("--config.model.name=resnet_tiny", "--config.model.width=8",
       f"--config.num_train_steps={STEPS}", "--config.log_every_steps=1",
       "--config.batch_size=64", "--config.checkpoint.every_steps=4",
       "--config.eval_batch_size=512")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run every fault test must reproduce bit for bit."""
  workdir = tmp_path_factory.mktemp("reference")
  result = run_main(workdir, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def exported_params(workdir):
  variables, info = checkpoint.load_export(str(pathlib.Path(workdir) / "export"))
  assert info["step"] == STEPS
  return variables


def assert_same_as_reference(workdir, reference):
  assert losses_by_step(workdir) == losses_by_step(reference)  # exact, every step
  assert len(losses_by_step(workdir)) == STEPS
  jax.tree.map(np.testing.assert_array_equal, exported_params(workdir),
               exported_params(reference))


def wait_for_line(proc, text, timeout=300):
  deadline = time.time() + timeout
  lines = []
  while time.time() < deadline:
    line = proc.stdout.readline()
    if not line:
      break
    lines.append(line)
    if text in line:
      return lines
  raise AssertionError(f"never saw {text!r}; output:\n{''.join(lines)[-3000:]}")


def completed_steps(workdir):
  root = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


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


def test_kill_9_three_times_then_finish_matches_uninterrupted(tmp_path, reference):
  """kill -9 at seeded random moments (saves every 4 steps are often in flight)."""
  rng = random.Random(1234)
  for attempt in range(3):
    proc = start_main(tmp_path, *RUN)
    wait_for_line(proc, "Compiled")
    time.sleep(rng.uniform(0.5, 3.0))
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # Whatever the moment, only complete steps carry a step number.
    for step in completed_steps(tmp_path):
      assert (tmp_path / "checkpoints" / str(step) / "commit_success.txt").exists(), attempt
  result = run_main(tmp_path, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  assert_same_as_reference(tmp_path, reference)


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  result = run_main(tmp_path, *RUN, "--config.optim.learning_rate=1e30",
                    "--config.optim.warmup_epochs=0", "--config.checkpoint.every_steps=1")
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert "training stopped: Non-finite" in message
  bad_step = int(message.split(" at step ")[1].split()[0])
  assert completed_steps(tmp_path) and max(completed_steps(tmp_path)) == bad_step - 1


def test_incompatible_config_is_refused_and_safe_changes_resume(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  wider = run_main(tmp_path, *RUN, "--config.model.width=16")
  assert wider.returncode != 0
  assert "config.model.width: checkpoint 8, now 16" in wider.stderr
  assert "Traceback" not in wider.stderr
  longer = run_main(tmp_path, *RUN, f"--config.num_train_steps={STEPS + 4}",
                    "--config.eval_every_epochs=0.5")
  assert longer.returncode == 0, longer.stderr[-3000:]
  assert f"(step {STEPS})" in longer.stdout and f"step {STEPS + 4}/{STEPS + 4}" in longer.stdout


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_errors_then_falls_back(tmp_path, reference, damage):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  latest = tmp_path / "checkpoints" / str(STEPS)
  data_files = [p for p in (latest / "state").rglob("*") if p.is_file() and "/d/" in str(p)]
  assert data_files
  for path in data_files:
    if damage == "truncate":
      path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    else:
      path.unlink()
  more = (f"--config.num_train_steps={STEPS + 2}",)
  failed = run_main(tmp_path, *RUN, *more)
  assert failed.returncode != 0
  assert f"checkpoint error: The checkpoint in {latest} cannot be read" in failed.stderr
  assert "fallback_to_previous" in failed.stderr

  fallback = run_main(tmp_path, *RUN, *more, "--config.checkpoint.fallback_to_previous=True")
  assert fallback.returncode == 0, fallback.stderr[-3000:]
  assert f"Resumed from {tmp_path / 'checkpoints' / str(STEPS - 4)}" in fallback.stdout
  assert list(tmp_path.glob(f"damaged_checkpoint_{STEPS}_*"))  # set aside, not deleted


def test_restore_onto_another_mesh_reshards(tmp_path):
  """Saved on (data=4, fsdp=2), restored as (data=8) and on 4 devices as (data=4)."""
  from jaxcls import build, config as config_lib, models, optim
  from jaxcls import sharding as sharding_lib

  def setup(mesh_config, devices):
    config = config_lib.base_config()
    config.model.name, config.model.width = "resnet_tiny", 16
    config.mesh.fsdp_min_size = 256
    config.mesh.update(mesh_config)
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    model = models.create_model(config.model, 10)
    tx = optim.create_optimizer(config.optim, optim.create_schedule(config.optim, 256, 10, 10))
    return config, mesh, model, tx

  config, mesh, model, tx = setup({"data": 4, "fsdp": 2}, jax.devices())
  state, _ = build.create_train_state(model, tx, config, mesh)
  saver = checkpoint.Checkpointer(str(tmp_path), config.checkpoint, 1,
                                  checkpoint.run_metadata(config))
  saver.manager.save(1, args=checkpoint.ocp.args.Composite(
      state=checkpoint.ocp.args.StandardSave(state)))
  saver.close()
  saved = jax.device_get(state)
  for mesh_config, devices in (({"data": 8, "fsdp": 1}, jax.devices()),
                               ({"data": 4, "fsdp": 1}, jax.devices()[:4])):
    config, mesh, model, tx = setup(mesh_config, devices)
    abstract, shardings = build.abstract_train_state(model, tx, config, mesh)
    loader = checkpoint.Checkpointer(str(tmp_path), config.checkpoint, 1,
                                     checkpoint.run_metadata(config))
    restored = loader.restore(1, abstract, None, restore_data=False)
    loader.close()
    for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved),
                         strict=True):
      np.testing.assert_array_equal(got, want)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
      assert leaf.sharding == sharding
      assert len(leaf.sharding.device_set) == len(devices)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
  run = (*RUN, "--config.checkpoint.preemption_check_steps=2")
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
  assert sorted(p.name for p in (state_dir / "data").glob("process_*")) == [
      "process_0-of-2.json", "process_1-of-2.json"]

  procs = start_processes(tmp_path, *RUN)
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  assert f"(step {stopped_at}), data position included" in outputs[0]
  assert f"step {STEPS}/{STEPS}" in outputs[0]
