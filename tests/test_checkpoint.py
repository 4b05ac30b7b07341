"""Checkpoints: resume exactly after kill -9 (with another worker count too), refuse an
incompatible config, restore onto another mesh, a full disk in one line; the guide's plain-orbax reading of a
checkpoint and an export, and load_export, on 1 device after training on 8."""

import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxcls import build, checkpoint
from jaxcls import config as config_lib
from jaxcls import sharding as sharding_lib
from helpers import assert_same_as_reference
from runner import REFERENCE_RUN as RUN, REFERENCE_STEPS as STEPS
from runner import REPO, completed_steps, losses_by_step, main_env, run_main, run_tool
from runner import start_main, wait_for_line

sys.path.insert(0, str(REPO / "scripts"))
import run_guide  # pylint: disable=g-import-not-at-top,wrong-import-position


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


def test_kill_9_with_2_workers_then_with_0_then_finish_with_1_matches_uninterrupted(
    tmp_path, reference):
  """The data position does not depend on the worker count (grain's iterator state did)."""
  for workers, kill_after in ((2, 10), (0, 18)):  # saves every 4 steps
    proc = start_main(tmp_path, *RUN, f"--config.data.num_workers={workers}")
    lines = wait_for_line(proc, f"step {kill_after}/{STEPS}")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    # A save starts after the previous one is complete, so the one before the last is there.
    assert completed_steps(tmp_path)[-1] >= kill_after - 6, lines[-5:]
  assert any("data position included" in line for line in lines), lines
  result = run_main(tmp_path, *RUN, "--config.data.num_workers=1")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "data position included" in result.stdout
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
  # Another batch size moves the data: refused, naming the key, unless asked to restart it.
  other_batch = ("--config.batch_size=32", f"--config.num_train_steps={STEPS + 6}")
  refused = run_main(tmp_path, *RUN, *other_batch)
  assert refused.returncode != 0 and "Traceback" not in refused.stderr
  assert "(batch_size: checkpoint 64, now 32)" in refused.stderr, refused.stderr[-2000:]
  assert "restart_data_on_mismatch=True" in refused.stderr
  restarted = run_main(tmp_path, *RUN, *other_batch,
                       "--config.checkpoint.restart_data_on_mismatch=True")
  assert restarted.returncode == 0, restarted.stderr[-3000:]
  assert f"(step {STEPS + 4}), data restarted at the next epoch." in restarted.stdout


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
    restored = loader.restore(1, abstract)
    loader.close()
    for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved),
                         strict=True):
      np.testing.assert_array_equal(got, want)
    for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
      assert leaf.sharding == sharding
      assert len(leaf.sharding.device_set) == len(devices)


@pytest.fixture
def small_disk(tmp_path):
  """A 900 KB tmpfs: the first checkpoint of the reference run fits, three do not.

  A checkpoint of the reference run takes 330 to 530 KB on disk (orbax's ocdbt files differ
  in number and size from save to save), so which save fills the disk, step 8 or 12, varies."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=900k", "tmpfs", str(disk)],
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
  failed = re.match(r"checkpoint error: Disk full while saving step (\d+) to (\S+) \(", message)
  assert failed and failed[2] == str(workdir / "checkpoints"), message
  kept = int(failed[1]) - 4  # saves every 4 steps
  assert kept >= 4, message
  assert (f"Nothing was lost: the last complete checkpoint, step {kept}, is kept in "
          f"{workdir / 'checkpoints' / str(kept)}. Free space") in message
  moved = shutil.copytree(workdir, tmp_path / "more_space")  # as a user freeing space would
  resumed = run_main(moved, *RUN)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {moved / 'checkpoints' / str(kept)} (step {kept})" in resumed.stdout
  assert_same_as_reference(moved, reference)


def test_the_guides_plain_orbax_block_and_load_export_read_an_8_device_run_on_1(
    trained_workdir, tmp_path):
  """docs/guide.md's block, run as written (on `runs/resume`, here the session's run trained
  on 8 devices) in a process with 1 device; then jaxcls's load_export in the same process."""
  [block] = [b["code"] for b in run_guide.blocks((REPO / "docs" / "guide.md").read_text())
             if b["section"] == "Reading a checkpoint or an export with plain orbax"]
  (tmp_path / "runs").mkdir()
  (tmp_path / "runs" / "resume").symlink_to(trained_workdir)
  code = block + textwrap.dedent("""
      from jaxcls import checkpoint
      loaded, info = checkpoint.load_export(str(run / "export"))
      equal = jax.tree.map(np.array_equal, loaded, jax.device_get(variables))
      print("load_export:", info["step"], all(jax.tree.leaves(equal)))
  """)
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**main_env(devices=1),
                                                      "PYTHONPATH": str(REPO)})
  assert result.returncode == 0, result.stderr[-3000:]
  step = completed_steps(trained_workdir)[-1]
  assert result.stdout.splitlines() == [
      f"checkpoint {step}: step {step}, next batch {step}, on 1 device(s)",
      "the export holds the last checkpoint's params: True",
      f"load_export: {step} True"], result.stdout
