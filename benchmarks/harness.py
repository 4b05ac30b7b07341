"""Shared by the speed benchmarks: configs as a user gives them, jaxcls's own train step, and
alternating timed phases in one process (these machines are noisy: compare only ratios of
phases measured side by side).
"""

import ast
import dataclasses
import pathlib
import platform
import statistics
import time
from typing import Callable

import jax

from jaxcls import build, sharding
from jaxcls import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(spec: str, overrides=()):
  """'configs/x.py[:arg]' plus ['key.sub=value', ...] -> ConfigDict, as `jaxcls.main` builds it.

  Values are Python literals (`512`, `'resnet50'`, `(0.5, 0.5, 0.5)`); anything else is a string.
  """
  path, sep, arg = spec.partition(":")
  if not pathlib.Path(path).is_absolute() and not pathlib.Path(path).exists():
    path = str(REPO / path)
  values = {}
  for item in overrides:
    key, eq, text = item.partition("=")
    if not eq:
      raise ValueError(f"override {item!r}: use key=value")
    try:
      values[key] = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      values[key] = text
  return config_lib.load_config(path + sep + arg, values)


@dataclasses.dataclass
class JaxclsStep:
  """jaxcls's compiled train step and a fresh state, built as train.run builds them."""
  config: object
  mesh: object
  step: Callable
  state: object


def jaxcls_train_step(config, num_steps: int = 1000, steps_per_epoch: int = 100) -> JaxclsStep:
  """Built by jaxcls.build as train.run builds it (compilation cache included), minus the
  data and the loop."""
  config_lib.check_config(config, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  parts = build.training_parts(config, mesh, num_steps, steps_per_epoch)
  state, _ = build.create_train_state(parts.model, parts.tx, config, mesh)
  return JaxclsStep(config, mesh, parts.train_step, state)


def device_batch(config, mesh, seed: int = 0) -> dict:
  """A random uint8 global batch, already on the devices in the train step's layout."""
  key_image, key_label = jax.random.split(jax.random.key(seed))
  size, n = config.data.image_size, config.batch_size
  batch_sharding = sharding.batch_sharding(mesh)
  make = jax.jit(lambda: {
      "image": jax.random.randint(key_image, (n, size, size, 3), 0, 256).astype("uint8"),
      "label": jax.random.randint(key_label, (n,), 0, config.data.num_classes),
  }, out_shardings=batch_sharding)
  return jax.block_until_ready(make())


class Contender:
  """One thing to time: run(n) does n steps and returns the seconds until they are done."""

  name: str = ""
  images_per_step: int = 0

  def run(self, n: int) -> float:
    raise NotImplementedError


def warm_up(contenders, steps: int = 2) -> None:
  """Untimed steps first: compilation (a plain jit compiles at its first call), autotuning,
  allocations."""
  for c in contenders:
    c.run(steps)


def calibrate(contenders, seconds: float, min_steps: int, max_steps: int = 10_000) -> int:
  """Steps per phase so that the slowest (warmed-up) contender's phase lasts about `seconds`."""
  slowest = max(c.run(2) / 2 for c in contenders)
  return int(min(max_steps, max(min_steps, round(seconds / max(slowest, 1e-9)))))


def alternate(contenders, steps: int, rounds: int, log=print) -> dict:
  """Runs the contenders in turn, `rounds` times, the order reversed every other round
  (A B, B A, ...) so a drift in machine speed hits each side alike.

  -> {name: [images/s of each round]}.
  """
  rates = {c.name: [] for c in contenders}
  for r in range(rounds):
    order = contenders if r % 2 == 0 else contenders[::-1]
    for c in order:
      seconds = c.run(steps)
      rates[c.name].append(c.images_per_step * steps / seconds)
    log(f"  round {r + 1}/{rounds}: " + "  ".join(
        f"{c.name} {rates[c.name][-1]:,.0f}" for c in contenders) + " images/s")
  return rates


def ratio(rates: dict, numerator: str, denominator: str) -> tuple[float, float, float]:
  """Median, min and max over rounds of numerator / denominator (each round's own pair)."""
  per_round = [a / b for a, b in zip(rates[numerator], rates[denominator])]
  return statistics.median(per_round), min(per_round), max(per_round)


def machine() -> str:
  device = jax.devices()[0]
  kind = getattr(device, "device_kind", device.platform)
  return (f"{platform.node()}: {jax.device_count()} x {kind} ({jax.default_backend()}), "
          f"jax {jax.__version__}, {time.strftime('%Y-%m-%d')}")
