"""Which checkpoint a run continues from: a flipped byte in any file of a step is found at
restore, a damaged step is named and (with fallback_to_previous) set aside with identical
results after, a stray step directory is named with the fix, a run whose every step is
damaged stops instead of starting again from step 0, and a checkpoint written before the
data_position item (grain's iterator states) continues exactly with another worker count."""

import errno
import pathlib
import re
import shutil

from absl import flags
from etils import epath
import grain
import pytest

from jaxcls import build, checkpoint, integrity, resume, sharding, storage
from jaxcls import workdir as workdir_lib
from jaxcls.data import pipeline
from jaxcls.errors import CheckpointError
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


def test_a_step_with_grain_states_from_before_resumes_exactly_with_another_worker_count(
    tmp_path, reference):
  """Before the data_position item a step held each process's grain iterator state, whose
  shape follows the worker count: here one saved by 2 workers, continued with none."""
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  old = 16
  for step in completed_steps(tmp_path):
    if step > old:
      shutil.rmtree(tmp_path / "checkpoints" / str(step))
  shutil.rmtree(tmp_path / "export")  # the resumed run must write its own
  step_dir = tmp_path / "checkpoints" / str(old)
  shutil.rmtree(step_dir / "data_position")
  # The iterator train.run read from before, and grain's orbax handler, as it saved them.
  config = workdir_lib.load_run_config(str(tmp_path))
  config.data.num_workers = 2
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  train_source, _ = build.create_sources(config)
  iterator = iter(pipeline.prefetch_to_device(
      pipeline.create_train_dataset(config.data, train_source, config.batch_size, config.seed),
      sharding.batch_sharding(sharding.make_mesh(config.mesh)), config.data.prefetch_batches))
  try:
    for _ in range(old):
      next(iterator)
    (step_dir / "data").mkdir()
    grain.checkpoint.CheckpointHandler().save(
        epath.Path(step_dir / "data"), args=grain.checkpoint.CheckpointSave(iterator))
  finally:
    iterator.close()
  assert "iterators_in_use_states" in (step_dir / "data" / "process_0-of-1.json").read_text()
  integrity.write_checksums(str(step_dir))

  resumed = run_main(tmp_path, *RUN, "--config.data.num_workers=0")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resumed from {step_dir} (step {old}), data position included." in resumed.stdout
  assert_same_as_reference(tmp_path, reference)
  assert (tmp_path / "checkpoints" / str(STEPS) / "data_position" / "metadata").exists()


# Damage is what the files prove. An error while restoring a step without checksums (killed
# before they were written) sets it aside only when it shows damaged files.
RESTORE_ERRORS = {
    "io_error": (OSError(errno.EIO, "Input/output error"), False),
    "tensorstore_unavailable": (ValueError("UNAVAILABLE: Error reading: connection reset"), False),
    "any_other_exception": (RuntimeError("a bug"), False),
    "tensorstore_data_loss": (ValueError("DATA_LOSS: Error reading chunk: bad checksum"), True),
    "file_missing": (FileNotFoundError(errno.ENOENT, "No such file", "manifest.ocdbt"), True),
}


def checkpointer_of(workdir, fallback=True):
  config = workdir_lib.load_run_config(str(workdir))
  config.checkpoint.fallback_to_previous = fallback
  return checkpoint.Checkpointer(str(workdir), config.checkpoint, 1,
                                 checkpoint.run_metadata(config))


@pytest.mark.parametrize("kind", sorted(RESTORE_ERRORS))
def test_only_an_error_that_proves_damage_sets_a_step_aside(tmp_path, reference, monkeypatch,
                                                            kind):
  error, proves_damage = RESTORE_ERRORS[kind]
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  pathlib.Path(workdir_lib.step_checksums_path(str(tmp_path / "checkpoints" / str(STEPS)))).unlink()
  checkpointer = checkpointer_of(tmp_path)

  def restore(step, abstract_state):
    if step == STEPS:
      raise error
    return f"state of step {step}"

  monkeypatch.setattr(checkpointer, "restore", restore)
  try:
    if proves_damage:
      assert resume.restore_latest(checkpointer, None, print) == (
          f"state of step {STEPS - 4}", STEPS - 4, STEPS - 4)
    else:
      with pytest.raises(CheckpointError, match="Nothing shows that its files are damaged: "
                         "this may be a passing storage error, and nothing was moved"):
        resume.restore_latest(checkpointer, None, print)
  finally:
    checkpointer.close()
  assert (STEPS in completed_steps(tmp_path)) != proves_damage
  assert bool(list(tmp_path.glob("damaged_checkpoint_*"))) == proves_damage


def test_a_file_that_cannot_be_read_for_its_checksum_moves_nothing(tmp_path, reference,
                                                                    monkeypatch):
  """An I/O error is no proof of damage; nor does it make a file "missing"."""
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)

  def unreadable(path):
    raise OSError(errno.EIO, "Input/output error", path)

  checkpointer = checkpointer_of(tmp_path)
  try:
    for module, broken in ((integrity, "file_crc32"), (storage, "files_under")):
      with monkeypatch.context() as patch:
        patch.setattr(module, broken, unreadable)
        with pytest.raises(CheckpointError, match="could not be read to check them .*Input/"
                           "output error.*Nothing shows that they are damaged"):
          resume.restore_latest(checkpointer, None, print)
  finally:
    checkpointer.close()
  assert completed_steps(tmp_path)[-1] == STEPS and not list(tmp_path.glob("damaged_*"))


@pytest.mark.parametrize("peer, message", [
    (2, re.escape("could not be read (another process could not read it)")),
    (3, "Another process refused to restore"),
], ids=["failed", "refused"])
def test_what_another_process_saw_stops_this_one_too(tmp_path, reference, monkeypatch, peer,
                                                     message):
  """Every process acts on the worst outcome of a restore (a peer that failed or refused to
  restore): none goes on to train, and none waits in a collective for a peer that left."""
  shutil.copytree(reference, tmp_path, dirs_exist_ok=True)
  checkpointer = checkpointer_of(tmp_path, fallback=False)
  monkeypatch.setattr(checkpointer, "restore", lambda step, abstract_state: "restored here")
  agreed = iter([lambda verified: verified, lambda outcome: max(outcome, peer)])
  monkeypatch.setattr(resume.distributed, "agree_on_max", lambda value: next(agreed)(value))
  try:
    with pytest.raises(CheckpointError, match=message):
      resume.restore_latest(checkpointer, None, print)
  finally:
    checkpointer.close()
