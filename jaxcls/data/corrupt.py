"""config.data.skip_corrupt: find undecodable examples before training, drop them, report them.

Without skip_corrupt a bad image stops the run when the pipeline reaches it, with an error
naming it. With it, every example is decoded once up front (each process checks its share in
threads, then the processes share what they found), so the dropped set is the same on every
process and every run, and the pipeline's batches stay deterministic. The dropped examples are
listed by `write_skip_report`; more than `max_corrupt_fraction` of them is an error.
"""

import concurrent.futures
from typing import Any

import numpy as np

from jaxcls import workdir as workdir_lib
from jaxcls.data import cores
from jaxcls.data import images

_BLOCK = 256  # examples per thread task: few tasks, so little bookkeeping under the GIL


def check_example(source, index: int, max_pixels: int = images.MAX_PIXELS) -> str | None:
  """None if example `index` reads and decodes, else the reason (naming the file); an image
  of more than `max_pixels` pixels is refused from its header, not decoded."""
  try:
    element = source[index]
    images.decode_image(element["image"], element.get("id"), max_pixels)
  except (images.CorruptImageError, OSError) as e:
    return str(e)
  return None


def find_corrupt(source, indices, threads: int | None = None,
                 max_pixels: int = images.MAX_PIXELS) -> dict[int, str]:
  """-> {index: reason} for the examples among `indices` that do not decode."""
  indices = np.asarray(indices)
  blocks = [indices[i:i + _BLOCK] for i in range(0, len(indices), _BLOCK)]

  def check_block(block):
    return {int(i): r for i in block
            if (r := check_example(source, int(i), max_pixels)) is not None}

  found = {}
  with concurrent.futures.ThreadPoolExecutor(threads or cores.available_cores()) as pool:
    for bad in pool.map(check_block, blocks):
      found.update(bad)
  return found


class FilteredSource:
  """`source` without the examples in `skipped` ({index: reason})."""

  def __init__(self, source, skipped: dict[int, str]):
    self._source = source
    self.name = source.name
    self.class_names = source.class_names
    self.num_classes = source.num_classes
    self.num_scanned = len(source)
    self.not_read = getattr(source, "not_read", [])
    self.skipped = skipped
    keep = np.ones(len(source), bool)
    keep[list(skipped)] = False
    self._keep = np.flatnonzero(keep)

  def __len__(self) -> int:
    return len(self._keep)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self._keep[index])]

  def __repr__(self) -> str:
    return f"FilteredSource({self._source!r}, skipped={len(self.skipped)})"


def _gather_any(local: np.ndarray) -> np.ndarray:
  """Element-wise OR of a bool array over all processes."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return np.asarray(multihost_utils.process_allgather(local.astype(np.uint8))).any(axis=0)


def drop_corrupt(source, max_fraction: float, *, max_pixels: int = images.MAX_PIXELS,
                 process_index: int | None = None,
                 process_count: int | None = None) -> FilteredSource:
  """Checks every example once; returns the source without the ones that do not decode or
  have more than `max_pixels` pixels."""
  if process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index, process_count = jax.process_index(), jax.process_count()
  n = len(source)
  skipped = find_corrupt(source, np.arange(process_index, n, process_count),
                         max_pixels=max_pixels)
  if process_count > 1:
    bad = np.zeros(n, bool)
    bad[list(skipped)] = True
    # The others' finds come as indices only; re-checking them here gives their reasons.
    others = np.flatnonzero(_gather_any(bad) & ~bad)
    skipped.update(find_corrupt(source, others, max_pixels=max_pixels))
  skipped = dict(sorted(skipped.items()))
  if len(skipped) > max_fraction * n:
    examples = "\n  ".join(list(skipped.values())[:5])
    raise ValueError(
        f"{len(skipped)} of the {n} examples of {source.name} ({len(skipped) / n:.2%}) cannot "
        f"be decoded, more than config.data.max_corrupt_fraction={max_fraction}. For "
        f"example:\n  {examples}")
  return FilteredSource(source, skipped)


def write_skip_report(workdir: str, sources: dict[str, Any]) -> str | None:
  """Writes the run directory's skipped_examples.json: per split, the examples skip_corrupt
  left out, and the entries an image folder's scan did not read ("not_read": links not
  followed, files that are not regular files).

  `sources` maps split names to sources; returns the file written, or None when there is
  nothing to list (skip_corrupt off and every entry read).
  """
  report = {}
  for split, s in sources.items():
    entry = {}
    if isinstance(s, FilteredSource):
      entry = {"checked": s.num_scanned, "skipped": len(s.skipped),
               "examples": list(s.skipped.values())}
    if getattr(s, "not_read", None):
      entry["not_read"] = list(s.not_read)
    if entry:
      report[split] = {"source": s.name, **entry}
  if not report:
    return None
  return workdir_lib.write_skipped_examples(workdir, report)
