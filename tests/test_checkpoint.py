"""Checkpoints: resume exactly after kill -9, refuse an incompatible config, fall back from a
damaged latest step, restore onto another mesh."""

import random
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import pytest

from jaxcls import build, checkpoint
from jaxcls import config as config_lib
from jaxcls import sharding as sharding_lib
from jaxcls import workdir as workdir_lib
from helpers import assert_same_as_reference
from runner import REFERENCE_RUN as RUN, REFERENCE_STEPS as STEPS
from runner import completed_steps, losses_by_step, run_main, run_tool, start_main
from runner import wait_for_line


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
  assert (tmp_path / "lock.json").exists()  # the killed run could not release it
  result = run_main(tmp_path, *RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Taking over the workdir from a run that ended without releasing it" in result.stdout
  assert_same_as_reference(tmp_path, reference)


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


def largest_file(directory):
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# One file of each kind a step holds: array data, orbax's metadata of the state, the OCDBT
# manifest, the data position (JSON), jaxcls's meta item (JSON), the step's own metadata.
DAMAGE_TARGETS = {
    "array_data": lambda step: largest_file(step / "state" / "ocdbt.process_0" / "d"),
    "state_metadata": lambda step: step / "state" / "_METADATA",
    "ocdbt_manifest": lambda step: step / "state" / "manifest.ocdbt",
    "data_position": lambda step: step / "data" / "process_0-of-1.json",
    "meta": lambda step: step / "meta" / "metadata",
    "step_metadata": lambda step: step / "_CHECKPOINT_METADATA",
}


def flip_byte(path, where=0.5):
  data = bytearray(path.read_bytes())
  data[int(len(data) * where)] ^= 0x04
  path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", sorted(DAMAGE_TARGETS))
def test_a_flipped_byte_in_any_file_is_found_at_restore(tmp_path, reference, kind):
  """Before the checksums, a flipped array byte restored "successfully" and the run died two
  steps later with a non-finite gradient, every restart again."""
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  latest = tmp_path / "checkpoints" / str(STEPS)
  target = DAMAGE_TARGETS[kind](latest)
  flip_byte(target)
  parts_config = workdir_lib.load_run_config(str(tmp_path))
  checkpointer = checkpoint.Checkpointer(str(tmp_path), parts_config.checkpoint, 1,
                                         checkpoint.run_metadata(parts_config), read_only=True)
  problem, verified = checkpointer.find_damage(STEPS)
  checkpointer.close()
  assert verified and problem == f"{target} changed since it was written (CRC-32 differs)"


@pytest.mark.parametrize("damage", ["flip", "delete"])  # truncation: tests/test_integrity.py
def test_damaged_latest_checkpoint_errors_then_falls_back_with_identical_results(
    tmp_path, reference, damage):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  latest = tmp_path / "checkpoints" / str(STEPS)
  target = DAMAGE_TARGETS["array_data"](latest)
  if damage == "flip":
    flip_byte(target)
  elif damage == "truncate":
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 3])
  else:
    target.unlink()
  failed = run_main(tmp_path, *RUN)
  assert failed.returncode != 0
  assert f"checkpoint error: Checkpoint step {STEPS} is damaged: {target} " in failed.stderr
  assert "fallback_to_previous" in failed.stderr and "Traceback" not in failed.stderr

  fallback = run_main(tmp_path, *RUN, "--config.checkpoint.fallback_to_previous=True")
  assert fallback.returncode == 0, fallback.stderr[-3000:]
  assert f"Resumed from {tmp_path / 'checkpoints' / str(STEPS - 4)}" in fallback.stdout
  assert list(tmp_path.glob(f"damaged_checkpoint_{STEPS}_*"))  # set aside, not deleted
  assert_same_as_reference(tmp_path, reference)  # steps 21-24 trained again, identically


def test_stray_or_empty_step_directory_is_named_with_the_fix(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  (tmp_path / "checkpoints" / "999").mkdir()
  expected = (f"Checkpoint step 999 is damaged: {tmp_path / 'checkpoints' / '999'} is "
              "incomplete: state/_METADATA, meta/metadata, data/ (the data position) missing "
              "or empty.")
  resumed = run_main(tmp_path, *RUN)
  assert resumed.returncode != 0 and expected in resumed.stderr, resumed.stderr[-2000:]
  evaluated = run_tool("jaxcls.evaluate", "--workdir", tmp_path)
  assert evaluated.returncode != 0 and expected in evaluated.stderr, evaluated.stderr[-2000:]
  assert "Traceback" not in resumed.stderr + evaluated.stderr
  assert "Choose another with --step" in evaluated.stderr


def test_every_step_set_aside_is_an_error_never_a_restart_from_0(tmp_path, reference):
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  for step in completed_steps(tmp_path):
    flip_byte(DAMAGE_TARGETS["meta"](tmp_path / "checkpoints" / str(step)))
  result = run_main(tmp_path, *RUN, "--config.checkpoint.fallback_to_previous=True")
  assert result.returncode != 0
  assert "could be restored: every step was damaged and set aside" in result.stderr
  assert "does not start again from step 0" in result.stderr
  assert "step  1/" not in result.stdout


def test_workdir_with_url_and_glob_characters_resumes(tmp_path):
  """`[x]` in the path made orbax's merge glob miss its files: training worked, resume did not."""
  workdir = tmp_path / "a%41b?c#d[x] e"
  short = [a for a in RUN if "num_train_steps" not in a]
  first = run_main(workdir, *short, "--config.num_train_steps=8")
  assert first.returncode == 0, first.stderr[-3000:]
  resumed = run_main(workdir, *short, "--config.num_train_steps=12")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {workdir / 'checkpoints' / '8'} (step 8)" in resumed.stdout
  assert sorted(losses_by_step(workdir)) == list(range(1, 13))
  evaluated = run_tool("jaxcls.evaluate", "--workdir", workdir)
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]


def test_restore_onto_another_mesh_reshards(tmp_path):
  """Saved on (data=4, fsdp=2), restored as (data=8) and on 4 devices as (data=4)."""

  def setup(mesh_config, devices):
    config = config_lib.base_config()
    config.model.name, config.model.width = "resnet_tiny", 16
    config.mesh.fsdp_min_size = 256
    config.mesh.update(mesh_config)
    mesh = sharding_lib.make_mesh(config.mesh, devices)
    model = build.create_model(config)
    _, tx = build.create_optimizer(config, 10, 10)
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


@pytest.fixture
def small_disk(tmp_path):
  """A 700 KB tmpfs: the first checkpoint of the reference run fits, the second does not."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=700k", "tmpfs", str(disk)],
                           capture_output=True, text=True)
  if mounted.returncode:
    pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
  yield disk
  subprocess.run(["umount", "-l", str(disk)], check=False)


def test_disk_full_during_a_save_is_one_line_and_the_resume_is_exact(small_disk, tmp_path,
                                                                     reference):
  """Before, 710 lines of orbax tracebacks from its save threads."""
  workdir = small_disk / "run"
  full = run_main(workdir, *RUN)
  assert full.returncode != 0
  assert full.stderr.strip().splitlines() == [full.stderr.strip()], full.stderr[-3000:]
  message = full.stderr.strip()
  assert message.startswith("checkpoint error: Disk full while saving step 8 to "
                            f"{workdir / 'checkpoints'} (")
  assert ("Nothing was lost: the last complete checkpoint, step 4, is kept in "
          f"{workdir / 'checkpoints' / '4'}. Free space") in message
  moved = shutil.copytree(workdir, tmp_path / "more_space")  # as a user freeing space would
  resumed = run_main(moved, *RUN)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {moved / 'checkpoints' / '4'} (step 4)" in resumed.stdout
  assert_same_as_reference(moved, reference)
