"""Checksums of a checkpoint step's files: written once the step is final, checked before restore.

orbax writes no checksum of the arrays it stores, so a flipped byte on disk can restore as
"successfully" read numbers and surface steps later as a non-finite loss. Every file of a
finalized step gets its size and CRC-32 recorded in `<step>/checksums.json`; a restore first
compares the files with it, so damage is found at restore, named by file, and
`checkpoint.fallback_to_previous` can take the step before.

A step saved by a run that was killed before its checksums were written has no record: it
is restored unverified (the caller says so).
"""

import dataclasses
import json
import os
import zlib

from jaxcls import workdir as workdir_lib

_CHUNK = 1 << 22


def file_crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def file_size(path: str) -> int | None:
  """The size of the file at path; None when nothing is there. Another error (EIO, a
  permission) is raised: a read that failed is no proof that a file is missing."""
  try:
    return os.stat(path).st_size
  except (FileNotFoundError, NotADirectoryError):
    return None


def _step_files(step_dir: str) -> list[str]:
  """Every file under step_dir, relative to it, but the checksum record itself."""
  record = os.path.basename(workdir_lib.step_checksums_path(step_dir))
  files = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), step_dir)
      if relative != record:
        files.append(relative)
  return sorted(files)


def write_checksums(step_dir: str) -> dict:
  """Records {file: [size, crc32]} for every file of a finalized step; returns the record."""
  files = {}
  for relative in _step_files(step_dir):
    path = os.path.join(step_dir, relative)
    files[relative] = [os.path.getsize(path), file_crc32(path)]
  record = {"algorithm": "crc32", "files": files}
  workdir_lib.write_json(workdir_lib.step_checksums_path(step_dir), record)
  return record


def disk_bytes(step_dir: str) -> int:
  """The space a step's files take on disk (allocated blocks, as du counts them)."""
  total = 0
  for root, _, names in os.walk(step_dir):
    for name in names:
      try:
        total += os.stat(os.path.join(root, name)).st_blocks * 512
      except FileNotFoundError:
        pass  # deleted meanwhile by the keep policy
  return total


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What `verify` found: `problems` empty means every recorded file is intact."""
  verified: bool  # False: the step has no checksum record (nothing was checked)
  problems: tuple[str, ...] = ()

  @property
  def damaged(self) -> bool:
    return bool(self.problems)

  def describe(self, limit: int = 3) -> str:
    shown = "; ".join(self.problems[:limit])
    more = len(self.problems) - limit
    return shown + (f"; and {more} more" if more > 0 else "")


def verify(step_dir: str) -> Verdict:
  """Compares a step's files with its checksum record: missing, truncated or changed files."""
  if file_size(step_dir) is None:
    return Verdict(verified=False, problems=(f"{step_dir} is missing",))
  path = workdir_lib.step_checksums_path(step_dir)
  if file_size(path) is None:
    return Verdict(verified=False)
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)["files"]
  except (ValueError, KeyError, TypeError) as e:
    return Verdict(verified=True, problems=(f"{path} is unreadable ({e})",))
  problems = []
  for relative, (size, crc) in sorted(recorded.items()):
    file = os.path.join(step_dir, relative)
    actual = file_size(file)
    if actual is None:
      problems.append(f"{file} is missing")
    elif actual != size:
      problems.append(f"{file} has {actual} bytes, {size} were written")
    elif file_crc32(file) != crc:
      problems.append(f"{file} changed since it was written (CRC-32 differs)")
  return Verdict(verified=True, problems=tuple(problems))
