"""Checkpoints: resume exactly after kill -9, refuse an incompatible config, fall back from a
damaged latest step, restore onto another mesh."""

import random
import shutil
import signal
import time

import jax
import numpy as np
import pytest

from jaxcls import build, checkpoint
from jaxcls import config as config_lib
from jaxcls import sharding as sharding_lib
from helpers import assert_same_as_reference
from runner import REFERENCE_RUN as RUN, REFERENCE_STEPS as STEPS
from runner import completed_steps, run_main, start_main, wait_for_line


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
