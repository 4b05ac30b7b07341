"""The errors jaxcls raises for things a user can fix; each message names what and where.

Imports nothing of jaxcls, so any module can raise them without pulling in another concern.
The command lines (jaxcls.main, evaluate, predict) print them as one readable line.
"""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and the fix."""


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used; the message names the step directory and the way out."""


class DataError(ValueError):
  """Data that cannot be read as asked: the message names the file, split or record."""


class WeightsError(ValueError):
  """A weights file that cannot be read or mapped: the message names the file and the keys."""


def check_in_range(key: str, value, low: float, high: float, *, high_inclusive: bool = True):
  """Raises ConfigError unless low <= value <= high (< high when not high_inclusive)."""
  if not (low <= value <= high if high_inclusive else low <= value < high):
    raise ConfigError(f"config.{key}={value} must be in [{low}, {high}"
                      f"{']' if high_inclusive else ')'}.")


def check_at_least(key: str, value, low: float, *, integer: bool = False,
                   inclusive: bool = True) -> None:
  """Raises ConfigError unless value is a finite number >= low (> low when not inclusive)."""
  kind = "an integer" if integer else "a finite number"
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
        and (not integer or float(value).is_integer())
        and value == value and abs(value) != float("inf")  # not nan, not inf
        and (value >= low if inclusive else value > low))
  if not ok:
    raise ConfigError(f"config.{key}={value!r} must be {kind} {'>=' if inclusive else '>'} "
                      f"{low}.")


def check_choice(key: str, value, choices) -> None:
  """Raises ConfigError unless value is one of choices, listing them."""
  if value not in choices:
    raise ConfigError(f"config.{key}={value!r} is not known; use one of "
                      f"{', '.join(map(str, choices))}.")
