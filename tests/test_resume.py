"""Which checkpoint a run continues from: a flipped byte in any file of a step is found at
restore, a damaged step is named and (with fallback_to_previous) set aside with identical
results after, a stray step directory is named with the fix, and a run whose every step is
damaged stops instead of starting again from step 0."""

import shutil

import pytest

from jaxcls import checkpoint, resume
from jaxcls import workdir as workdir_lib
from helpers import assert_same_as_reference
from runner import REFERENCE_RUN as RUN, REFERENCE_STEPS as STEPS
from runner import completed_steps, run_main, run_tool


def largest_file(directory):
  return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


# One file of each kind a step holds: array data, orbax's metadata of the state, the OCDBT
# manifest, the data position (JSON), jaxcls's meta item (JSON), the step's own metadata.
DAMAGE_TARGETS = {
    "array_data": lambda step: largest_file(step / "state" / "ocdbt.process_0" / "d"),
    "state_metadata": lambda step: step / "state" / "_METADATA",
    "ocdbt_manifest": lambda step: step / "state" / "manifest.ocdbt",
    "data_position": lambda step: step / "data_position" / "metadata",
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
  problem, verified = resume.find_damage(checkpointer, STEPS)
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
              "incomplete: state/_METADATA, meta/metadata, data_position/metadata (the data "
              "position) missing "
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
