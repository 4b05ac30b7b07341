"""Paths that may be local or in an object store (gs://, s3://): the one place that tells them apart.

Every path a user gives (--workdir, config.data.path, convert's --src / --dst, predict's
images) becomes an `etils.epath.Path` here; epath reaches a bucket through fsspec (gcsfs for
gs://, s3fs for s3://), and orbax and tensorstore take the same paths. Local paths behave as
they always did (os calls, temporary file and rename, O_EXCL). An object store differs:

- folders do not exist, only names holding '/': making one costs nothing and proves nothing;
- an object is written by one upload and appears whole or not at all, so a write in place is
  as safe as a local temporary file and rename (a reader sees the old or the new object, a
  failed upload leaves the old one), while a rename would be a copy and a delete: a reader
  could see neither, so JSON files are uploaded in place;
- nothing can be appended: a file that grows is uploaded again whole;
- create-only-if-absent is a precondition of the upload (fsspec's 'x' mode; on GCS
  ifGenerationMatch=0), which the run lock uses instead of O_EXCL.
"""

import os
import shutil

from etils import epath
import fsspec

from jaxcls.errors import ConfigError

# The fsspec package that reaches each scheme (what `pip install jaxcls[gcs]` brings).
_BACKENDS = {"gs": "gcsfs", "s3": "s3fs"}


def as_path(path) -> epath.Path:
  return path if isinstance(path, epath.Path) else epath.Path(path)


def scheme(path) -> str | None:
  """'gs' for gs://bucket/x, None for a local path."""
  text = os.fspath(path)
  return text.split("://", 1)[0] if "://" in text else None


def is_remote(path) -> bool:
  return scheme(path) is not None


def absolute(path) -> epath.Path:
  """A local path made absolute (as os.path.abspath); a bucket path as it is."""
  return as_path(path) if is_remote(path) else epath.Path(os.path.abspath(path))


def check_reachable(path, what: str) -> None:
  """A ConfigError naming `what` when path's scheme has no installed backend."""
  name = scheme(path)
  if name is None:
    return
  module = _BACKENDS.get(name)
  if module is None:
    raise ConfigError(f"{what} {path}: {name}:// is not supported; use a local path, gs:// or "
                      "s3://.")
  try:
    __import__(module)
  except ImportError:
    raise ConfigError(f"{what} {path} needs the package {module} to reach {name}:// "
                      f"(pip install {module}, or jaxcls[gcs] for gs://).") from None


def require_local(path, what: str, reader: str) -> None:
  """A ValueError for data on a bucket that `reader` cannot read, naming the fix."""
  if is_remote(path):
    bucket = os.fspath(path).split("://", 1)[1].split("/", 1)[0]
    raise ValueError(
        f"{what}={os.fspath(path)!r} is in an object store, but {reader} reads local files "
        f"only. Mount the bucket (e.g. `gcsfuse --implicit-dirs {bucket} /mnt/{bucket}`) and "
        f"give the path under the mount, e.g. /mnt/{bucket}/...")


def write_whole(path, data: bytes | str) -> None:
  """Writes a file so a reader never sees half of it: locally a temporary file renamed over
  the old one, in an object store one upload (see the module docstring)."""
  path = as_path(path)
  mode = "w" if isinstance(data, str) else "wb"
  encoding = "utf-8" if isinstance(data, str) else None
  if is_remote(path):
    with path.open(mode) as f:
      f.write(data)
    return
  tmp = f"{path}.tmp"
  with open(tmp, mode, encoding=encoding) as f:
    f.write(data)
  os.replace(tmp, path)


def create_new(path, text: str) -> None:
  """Creates the file with `text`, or raises FileExistsError when it exists (O_EXCL
  locally; a create-only-if-absent upload in an object store)."""
  if is_remote(path):  # epath has no 'x' mode; fsspec's "create" is the store's precondition
    fs, key = fsspec.core.url_to_fs(os.fspath(path))
    # One upload carrying it (gcsfs: multipart with ifGenerationMatch=0), not open("xb"),
    # whose resumable upload puts it on the session start only, where fake-gcs-server
    # (the tests' bucket) ignores it.
    fs.pipe_file(key, text.encode(), mode="create")
    return
  fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)


def size(path) -> int:
  return os.path.getsize(path) if not is_remote(path) else as_path(path).stat().length


def mtime(path) -> float:
  return os.path.getmtime(path) if not is_remote(path) else as_path(path).stat().mtime


def free_bytes(path) -> int | None:
  """Free space where path lives; None in an object store (no disk to fill)."""
  return None if is_remote(path) else shutil.disk_usage(path).free


def move(src, dst) -> None:
  """Moves a file or folder (in an object store: copies every object, then deletes them)."""
  if is_remote(src):
    as_path(src).rename(dst)
  else:
    shutil.move(os.fspath(src), os.fspath(dst))


def _raise_unless_missing(error: OSError) -> None:
  if not isinstance(error, (FileNotFoundError, NotADirectoryError)):
    raise error


def files_under(folder) -> dict[str, int]:
  """{path relative to folder: size} of every file under folder (in an object store, from
  one listing rather than a request per file)."""
  if not is_remote(folder):
    found = {}
    # A folder that cannot be read is an error, never "no files" (os.walk's default).
    for root, _, names in os.walk(folder, onerror=_raise_unless_missing):
      for name in names:
        path = os.path.join(root, name)
        found[os.path.relpath(path, folder)] = os.path.getsize(path)
    return found
  fs, root = fsspec.core.url_to_fs(os.fspath(folder))
  return {os.path.relpath(path, root): int(info["size"])
          for path, info in fs.find(root, detail=True).items()}
