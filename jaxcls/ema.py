"""Weight EMA: an exponential moving average of the parameters and BatchNorm statistics.

With config.ema.decay > 0 the train state carries `ema = {"params", "batch_stats"}` next to
the trained values (steps.EmaTrainState), laid out like the parameters at every ZeRO stage,
checkpointed with them, and updated after every optimizer step:

    ema <- d * ema + (1 - d) * new,   d = min(decay, (1 + n) / (10 + n)) with warmup,
                                      d = decay without,

where n is the number of optimizer updates before this one (0 for the first). The warmup
is the one of tf.train.ExponentialMovingAverage's num_updates (timm's ModelEmaV3 offers a
similar one): early averages forget the random initialization quickly. Integer leaves (a
model's counters) are copied, not averaged.

Decay 0 (the default) turns it off: the state is then exactly the plain TrainState, so
checkpoints of runs without EMA restore as before.
"""

import jax
import jax.numpy as jnp

from jaxcls.errors import ConfigError, check_in_range

WEIGHTS = ("raw", "ema")  # which weights inference uses


def check_config(ema_config) -> None:
  check_in_range("ema.decay", ema_config.decay, 0.0, 1.0, high_inclusive=False)
  for key in ("warmup", "use_for_inference"):
    if not isinstance(ema_config[key], bool):
      raise ConfigError(f"config.ema.{key}={ema_config[key]!r} must be True or False.")


def enabled(config) -> bool:
  """Whether a run keeps an EMA; .get: the configs of runs written before the key existed."""
  ema_config = config.get("ema")
  return bool(ema_config) and float(ema_config.decay) > 0


def default_weights(config) -> str:
  """The weights export, evaluate and predict use unless told: 'ema' when the run keeps an
  EMA and config.ema.use_for_inference, else 'raw'."""
  return "ema" if enabled(config) and config.ema.use_for_inference else "raw"


def decay_at(ema_config, step) -> jax.Array:
  """The decay of the update after `step` optimizer updates (see the module docstring)."""
  decay = jnp.asarray(ema_config.decay, jnp.float32)
  if not ema_config.warmup:
    return decay
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def initial(params, batch_stats) -> dict:
  """The average before the first update: copies of the initial values (own buffers, so the
  donated train state never holds one buffer twice)."""
  return jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})


def update(average: dict, params, batch_stats, decay) -> dict:
  """One step of the average towards the new params and BatchNorm statistics."""

  def mix(old, new):
    if not jnp.issubdtype(new.dtype, jnp.floating):
      return new
    d = decay.astype(new.dtype)
    return d * old + (1 - d) * new

  return jax.tree.map(mix, average, {"params": params, "batch_stats": batch_stats})


def weights_for(state, weights: str):
  """The state with its params and BatchNorm statistics taken from `weights` ('raw' or
  'ema'); a ConfigError when the run kept no EMA. The other fields stay as they are."""
  if weights not in WEIGHTS:
    raise ConfigError(f"weights={weights!r}: use one of {', '.join(WEIGHTS)}.")
  if weights == "raw":
    return state
  average = getattr(state, "ema", None)
  if average is None:
    raise ConfigError("weights='ema', but this run kept no EMA of its weights (config.ema."
                      "decay was 0); use the raw weights.")
  return state.replace(params=average["params"], batch_stats=average["batch_stats"])
