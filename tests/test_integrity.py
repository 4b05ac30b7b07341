"""Checksums of a checkpoint step: every kind of damage to a file is found and named, an
intact step passes, a step without a record is reported as unverified."""

import pytest

from jaxcls import integrity


def make_step(root):
  """A step directory shaped like orbax's: nested items, a large and an empty file."""
  step = root / "12"
  (step / "state" / "ocdbt.process_0" / "d").mkdir(parents=True)
  (step / "data").mkdir()
  (step / "state" / "ocdbt.process_0" / "d" / "ab12").write_bytes(bytes(range(256)) * 40)
  (step / "state" / "_METADATA").write_text('{"tree": 1}')
  (step / "data" / "process_0-of-1.json").write_text('{"next_index": 640}')
  (step / "commit_success.txt").write_text("")
  return step


def test_intact_step_verifies_and_the_record_is_not_listed_in_itself(tmp_path):
  step = make_step(tmp_path)
  record = integrity.write_checksums(str(step))
  assert set(record["files"]) == {"state/ocdbt.process_0/d/ab12", "state/_METADATA",
                                  "data/process_0-of-1.json", "commit_success.txt"}
  verdict = integrity.verify(str(step))
  assert verdict.verified and not verdict.damaged
  integrity.write_checksums(str(step))  # again: the record does not checksum itself
  assert not integrity.verify(str(step)).damaged


@pytest.mark.parametrize("damage,expected", [
    ("flip", "changed since it was written (CRC-32 differs)"),
    ("truncate", "has 5120 bytes, 10240 were written"),
    ("delete", "is missing"),
])
def test_damage_to_a_file_is_found_and_named(tmp_path, damage, expected):
  step = make_step(tmp_path)
  integrity.write_checksums(str(step))
  target = step / "state" / "ocdbt.process_0" / "d" / "ab12"
  data = bytearray(target.read_bytes())
  if damage == "flip":
    data[4321] ^= 0x01  # one bit
    target.write_bytes(bytes(data))
  elif damage == "truncate":
    target.write_bytes(bytes(data[:len(data) // 2]))
  else:
    target.unlink()
  verdict = integrity.verify(str(step))
  assert verdict.damaged
  assert verdict.problems == (f"{target} {expected}",)


def test_a_changed_digit_in_a_json_item_is_found(tmp_path):
  """The data position is JSON: a flipped digit still parses, only the checksum sees it."""
  step = make_step(tmp_path)
  integrity.write_checksums(str(step))
  (step / "data" / "process_0-of-1.json").write_text('{"next_index": 650}')
  assert "process_0-of-1.json changed" in integrity.verify(str(step)).describe()


def test_step_without_record_is_unverified_and_damaged_record_is_damage(tmp_path):
  step = make_step(tmp_path)
  verdict = integrity.verify(str(step))
  assert not verdict.verified and not verdict.damaged
  integrity.write_checksums(str(step))
  (step / "checksums.json").write_text('{"files": ')
  verdict = integrity.verify(str(step))
  assert verdict.damaged and "checksums.json is unreadable" in verdict.describe()


def test_describe_shows_the_first_problems_and_counts_the_rest():
  verdict = integrity.Verdict(verified=True, problems=tuple(f"f{i} is missing" for i in range(5)))
  assert verdict.describe() == "f0 is missing; f1 is missing; f2 is missing; and 2 more"
