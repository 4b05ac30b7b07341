"""Progressive resizing: the training image size by epoch (`config.data.resize_schedule`).

Training at a lower resolution first costs less per step (compute grows with the pixels) and
FFCV trains ResNet-50 this way, raising the size in the last epochs and evaluating at a
higher one. The schedule is ((epoch, size), ...): from `epoch` on, train at `size` x `size`;
before the first entry, and with no schedule at all, at `config.data.image_size`, which
is also the evaluation size. Sizes change only where a batch starts an epoch (rounded), so a
schedule is a list of (first batch, size) segments; the pipeline builds each segment's stream
and the loop takes the step compiled for its size (build.py compiles one per size, ahead).
"""

import ml_collections

from jaxcls.errors import ConfigError


def schedule(data_config) -> tuple[tuple[float, int], ...]:
  return tuple((float(epoch), int(size)) for epoch, size in data_config.get("resize_schedule", ()))


def check_config(data_config) -> None:
  """config.data.resize_schedule: ((epoch, size), ...) with rising epochs and positive sizes."""
  raw = data_config.get("resize_schedule", ())
  example = "e.g. ((0, 24), (10, 32)): 24 px from epoch 0, 32 px from epoch 10"
  try:
    entries = schedule(data_config)
  except (TypeError, ValueError):
    raise ConfigError(f"config.data.resize_schedule={raw!r}: give (epoch, size) pairs, "
                      f"{example}.") from None
  epochs = [epoch for epoch, _ in entries]
  if any(e < 0 for e in epochs) or epochs != sorted(set(epochs)):
    raise ConfigError(f"config.data.resize_schedule={raw!r}: the epochs must be >= 0 and "
                      f"rising, {example}.")
  if any(size < 1 for _, size in entries) or any(int(s) != s for _, s in raw):
    raise ConfigError(f"config.data.resize_schedule={raw!r}: each size must be a positive "
                      f"integer, {example}.")


def train_sizes(data_config) -> list[int]:
  """Every size the schedule trains at (the train step is compiled once for each)."""
  sizes = {size for _, size in schedule(data_config)}
  if not schedule(data_config) or schedule(data_config)[0][0] > 0:
    sizes.add(int(data_config.image_size))
  return sorted(sizes)


def segments(data_config, steps_per_epoch: int) -> list[tuple[int, int]]:
  """[(first batch, size), ...] in order; the first starts at batch 0."""
  result = [(0, int(data_config.image_size))]
  for epoch, size in schedule(data_config):
    start = int(round(epoch * steps_per_epoch))
    if start == 0:
      result = [(0, size)]
    elif size != result[-1][1]:
      result.append((start, size))
  return result


def segment_at(segment_list, batch: int) -> tuple[int, int | None]:
  """(size, first batch of the next segment or None) for the segment holding `batch`."""
  for i, (start, size) in enumerate(segment_list):
    following = segment_list[i + 1][0] if i + 1 < len(segment_list) else None
    if following is None or batch < following:
      return size, following
  raise AssertionError("unreachable: the last segment has no end")


def config_at_size(data_config, size: int):
  """data_config for a `size` x `size` stream: the crop size, and the eval-style resize
  (used by train_augment='none') scaled alike."""
  if size == data_config.image_size:
    return data_config
  scaled = ml_collections.ConfigDict(data_config.to_dict())
  scaled.eval_resize = max(size, round(data_config.eval_resize * size / data_config.image_size))
  scaled.image_size = size
  return scaled
