"""Checksums of a checkpoint step's files: written once the step is final, checked before restore.

orbax writes no checksum of the arrays it stores, so a flipped byte on disk can restore as
"successfully" read numbers and surface steps later as a non-finite loss. Every file of a
finalized step gets its size and CRC-32 recorded in `<step>/checksums.json`; a restore first
compares the files with it, so damage is found at restore, named by file, and
`checkpoint.fallback_to_previous` can take the step before.

A step saved by a run that was killed before its checksums were written has no record: it
is restored unverified (the caller says so). In a bucket the sizes come from one listing and
every file is read back once to compute its CRC-32 (a download of the step).
"""

import dataclasses
import json
import os
import zlib

from jaxcls import storage
from jaxcls import workdir as workdir_lib

_CHUNK = 1 << 22


def file_crc32(path) -> int:
  crc = 0
  with storage.as_path(path).open("rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _step_files(step_dir) -> dict[str, int]:
  """{file relative to step_dir: size} of every file of the step but the checksum record."""
  record = workdir_lib.step_checksums_path(step_dir).name
  return {relative: size for relative, size in storage.files_under(step_dir).items()
          if relative != record}


def write_checksums(step_dir) -> dict:
  """Records {file: [size, crc32]} for every file of a finalized step; returns the record."""
  step_dir = storage.as_path(step_dir)
  files = {relative: [size, file_crc32(step_dir / relative)]
           for relative, size in sorted(_step_files(step_dir).items())}
  record = {"algorithm": "crc32", "files": files}
  workdir_lib.write_json(workdir_lib.step_checksums_path(step_dir), record)
  return record


def disk_bytes(step_dir) -> int:
  """The space a step's files take on disk (allocated blocks, as du counts them; in an
  object store, their sizes)."""
  if storage.is_remote(step_dir):
    return sum(storage.files_under(step_dir).values())
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


def verify(step_dir) -> Verdict:
  """Compares a step's files with its checksum record: missing, truncated or changed files."""
  step_dir = storage.as_path(step_dir)
  if not step_dir.is_dir():
    return Verdict(verified=False, problems=(f"{step_dir} is missing",))
  path = workdir_lib.step_checksums_path(step_dir)
  if not path.exists():
    return Verdict(verified=False)
  try:
    recorded = json.loads(path.read_text(encoding="utf-8"))["files"]
  except (ValueError, KeyError, TypeError) as e:
    return Verdict(verified=True, problems=(f"{path} is unreadable ({e})",))
  present = _step_files(step_dir)  # one listing, not a request per file in a bucket
  problems = []
  for relative, (size, crc) in sorted(recorded.items()):
    file = step_dir / relative
    if relative not in present:
      problems.append(f"{file} is missing")
    elif present[relative] != size:
      problems.append(f"{file} has {present[relative]} bytes, {size} were written")
    elif file_crc32(file) != crc:
      problems.append(f"{file} changed since it was written (CRC-32 differs)")
  return Verdict(verified=True, problems=tuple(problems))
