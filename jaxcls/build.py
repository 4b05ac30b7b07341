"""A run's parts, built from a config and a mesh: data sources, model, schedule and optimizer,
the train state's shapes and shardings, and both steps compiled; or, for inference, a run's
checkpoint restored onto the devices at hand.

Training, `jaxcls.evaluate`, `jaxcls.predict`, `jaxcls.memory`, the benchmarks and the
notebooks all build through here, so they build alike; and the persistent compilation cache
(config.compilation_cache_dir) is switched on here, before anything compiles, so every entry
point gets it.
"""

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxcls import checkpoint, ema, models, optim, resume, sharding, steps, weights
from jaxcls import workdir as workdir_lib
from jaxcls.data import pipeline, resolution, sources
from jaxcls.models import whitening
from jaxcls.errors import CheckpointError, ConfigError

# Steps that compile faster than this are not worth a cache file (and eager ops would add
# hundreds of tiny ones); the train and eval steps of every model here take longer.
CACHE_MIN_COMPILE_SECONDS = 0.3


def enable_compilation_cache(path: str) -> None:
  """Turns JAX's persistent compilation cache on at path ("" turns it off).

  Takes effect for every later compilation; a cache already opened by an earlier
  compilation in this process keeps its directory.
  """
  if not path:
    jax.config.update("jax_enable_compilation_cache", False)
    return
  path = os.path.expanduser(path)
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:  # a read-only home must not stop training
    logging.warning("Compilation cache off: cannot create %s (%s).", path, e)
    return
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)


def total_train_steps(config, steps_per_epoch: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return max(1, int(math.ceil(config.num_epochs * steps_per_epoch)))


def create_sources(config) -> tuple[sources.Source, sources.Source]:
  """-> (train source, eval source); a missing path, split or class count is a ConfigError."""
  try:
    return (sources.create_source(config.data, config.data.train_split),
            sources.create_source(config.data, config.data.eval_split))
  except ValueError as e:  # the message says which key or file
    raise ConfigError(str(e)) from None


def create_model(config):
  return models.create_model(config.model, config.data.num_classes)


def create_optimizer(config, num_steps: int = 1, steps_per_epoch: int = 1):
  """-> (learning-rate schedule, optax transformation).

  The optimizer state's structure does not depend on the schedule's numbers, so code that
  only needs shapes (inference, memory estimates) keeps the defaults.
  """
  schedule = optim.create_schedule(config.optim, config.batch_size, num_steps, steps_per_epoch)
  return schedule, optim.create_optimizer(config.optim, schedule)


def _initializer(model, tx, config):
  return lambda rng: steps.init_train_state(model, tx, config.data.image_size, rng,
                                            ema=ema.enabled(config))


def state_shapes(model, tx, config):
  """The train state as shapes and dtypes (jax.eval_shape): nothing is allocated."""
  return jax.eval_shape(_initializer(model, tx, config), jax.random.key(0))


def abstract_train_state(model, tx, config, mesh):
  """-> (train state of ShapeDtypeStructs with shardings, the shardings)."""
  shapes = state_shapes(model, tx, config)
  shardings = sharding.state_shardings(mesh, shapes, config.mesh)
  abstract = jax.tree.map(
      lambda leaf, leaf_sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                       sharding=leaf_sharding),
      shapes, shardings)
  return abstract, shardings


def create_train_state(model, tx, config, mesh, log=logging.info):
  """Builds the train state directly in its sharded layout: shapes -> shardings -> init.

  No device ever holds a full copy of a parameter that the mesh splits. With
  `config.model.init_from`, the parameters and BatchNorm statistics are then replaced by
  those weights (each array placed shard by shard) and the optimizer state made for them.
  Otherwise a model with a patch-whitening stem gets its filters from the training split.
  """
  _, shardings = abstract_train_state(model, tx, config, mesh)
  init = jax.jit(_initializer(model, tx, config), out_shardings=shardings)
  state = init(jax.random.key(config.seed))
  variables = None
  if config.model.get("init_from"):
    variables = weights.init_variables(
        config.model, {"params": state.params, "batch_stats": state.batch_stats}, log)
  elif whitening.has_whitening(state.params):
    source = create_sources(config)[0]
    images = pipeline.read_images(config.data, source, whitening.sample_indices(len(source)))
    normalized = (images / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)
    log(f"Patch-whitening filters computed from {len(images)} images of {source.name}.")
    variables = {"params": whitening.initialize(state.params, normalized),
                 "batch_stats": state.batch_stats}
  if variables is not None:
    variables = jax.tree.map(_place, variables,
                             {"params": state.params, "batch_stats": state.batch_stats})
    opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(variables["params"])
    if config.model.get("init_from"):
      log(f"Started from the weights in {config.model.init_from}.")
    state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"],
                          opt_state=opt_state)
    if ema.enabled(config):  # the average starts at the loaded weights too
      state = state.replace(ema=ema.initial(state.params, state.batch_stats))
  return state, shardings


def _place(value, like: jax.Array) -> jax.Array:
  """A host array laid out as `like` (each process builds only its own shards)."""
  if value is like:
    return like
  return jax.make_array_from_callback(like.shape, like.sharding, lambda index: value[index])


def batch_spec(mesh, global_batch_size: int, image_size: int, with_mask: bool = False):
  """Abstract global batch, for compiling the steps before the first batch arrives."""
  batch_sharding = sharding.batch_sharding(mesh)
  spec = {
      "image": jax.ShapeDtypeStruct((global_batch_size, image_size, image_size, 3), jnp.uint8,
                                    sharding=batch_sharding),
      "label": jax.ShapeDtypeStruct((global_batch_size,), jnp.int32, sharding=batch_sharding),
  }
  if with_mask:
    spec["mask"] = jax.ShapeDtypeStruct((global_batch_size,), jnp.bool_, sharding=batch_sharding)
  return spec


def _shardings_of(spec):
  return jax.tree.map(lambda s: s.sharding, spec)


def compile_train_step(train_step, abstract_state, state_shardings, mesh, config,
                       image_size: int | None = None):
  """jit once with explicit shardings and a donated state; compiled ahead of the first batch
  (for images of image_size, default config.data.image_size)."""
  spec = batch_spec(mesh, config.batch_size, image_size or config.data.image_size)
  jitted = jax.jit(train_step, in_shardings=(state_shardings, _shardings_of(spec)),
                   out_shardings=(state_shardings, sharding.replicated(mesh)),
                   donate_argnums=(0,))
  return jitted.lower(abstract_state, spec).compile()


def compile_eval_step(eval_step, abstract_state, state_shardings, mesh, spec):
  """jit once: the batch sharded like training; the per-example outputs stay sharded like
  the batch (jaxcls.evaluation copies each batch's to the host), the loss sums replicated."""
  batch_sharding = sharding.batch_sharding(mesh)
  outputs = jax.eval_shape(eval_step, abstract_state, spec)  # its keys: with TTA, tta_*
  out_shardings = {key: sharding.replicated(mesh) if key.endswith("loss") else batch_sharding
                   for key in outputs}
  jitted = jax.jit(eval_step, in_shardings=(state_shardings, _shardings_of(spec)),
                   out_shardings=out_shardings)
  return jitted.lower(abstract_state, spec).compile()


def config_train_step(config, mesh, schedule, abstract_state, state_shardings,
                      image_size: int | None = None):
  """config's train step (micro-batches, gradient layout, mixing seed), compiled for images
  of image_size (default config.data.image_size)."""
  return compile_train_step(
      steps.make_train_step(
          config.data, config.optim, schedule, config.grad_accum_steps,
          sharding.grad_shardings(mesh, abstract_state.params, config.mesh), seed=config.seed,
          ema_config=config.ema),
      abstract_state, state_shardings, mesh, config, image_size)


@dataclasses.dataclass(frozen=True)
class TrainingParts:
  """Everything the training loop runs, compiled before the first batch is read."""
  model: Any
  tx: Any
  abstract_state: Any  # ShapeDtypeStructs with shardings: what init and restore produce
  state_shardings: Any
  # {image size: compiled (state, batch) -> (state, metrics)}: one per size trained at
  # (several with config.data.resize_schedule)
  train_steps: dict
  eval_step: Callable  # compiled: (state, masked batch) -> per-example outputs
  compile_seconds: float

  def train_step_for(self, batch) -> Callable:
    """The step compiled for this batch's image size (config.data.resize_schedule)."""
    return self.train_steps[batch["image"].shape[1]]

  def compiled_message(self) -> str:
    if len(self.train_steps) == 1:
      return f"Compiled train and eval steps in {self.compile_seconds:.1f}s."
    return (f"Compiled train steps for {', '.join(map(str, self.train_steps))} px and the eval "
            f"step in {self.compile_seconds:.1f}s.")

  @property
  def train_step(self) -> Callable:
    """The train step of a run that trains at one size."""
    if len(self.train_steps) != 1:
      raise ValueError(f"This run trains at sizes {sorted(self.train_steps)}: use train_steps.")
    return next(iter(self.train_steps.values()))


def training_parts(config, mesh, num_steps: int, steps_per_epoch: int) -> TrainingParts:
  enable_compilation_cache(config.compilation_cache_dir)
  model = create_model(config)
  schedule, tx = create_optimizer(config, num_steps, steps_per_epoch)
  abstract_state, state_shardings = abstract_train_state(model, tx, config, mesh)
  start = time.time()
  train_steps = {size: config_train_step(config, mesh, schedule, abstract_state,
                                         state_shardings, size)
                 for size in resolution.train_sizes(config.data)}
  eval_step = compile_eval_step(
      steps.make_eval_step(config.data, config.eval_tta), abstract_state, state_shardings, mesh,
      batch_spec(mesh, config.eval_batch_size, config.data.image_size, with_mask=True))
  return TrainingParts(model, tx, abstract_state, state_shardings, train_steps, eval_step,
                       time.time() - start)


@dataclasses.dataclass(frozen=True)
class InferenceParts:
  """A run's checkpoint restored for inference on a data-parallel mesh of this host's devices."""
  config: Any  # the run's config, with the inference mesh
  model: Any
  mesh: Any
  state: Any
  state_shardings: Any
  step: int


def inference_config(config):
  """The run's config with a mesh for inference: every device takes a share of the batch."""
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp = -1, 1
  if "model" in config.mesh:
    config.mesh.model = 1
  return config


def restore_for_inference(workdir, step: int | None = None) -> InferenceParts:
  """The latest checkpoint of the run in workdir (or `step`), resharded onto this host.

  Safe on a run that is still training: the checkpoint manager is read-only (it never
  cleans up the run's in-progress saves), and a step the run deletes meanwhile (its keep
  policy) makes the newest one be read instead.
  """
  config = inference_config(workdir_lib.load_run_config(workdir))
  directory = workdir_lib.checkpoints_dir(workdir)
  # Checked before orbax opens the directory: its manager would create it, and its background
  # clean-up of temporary steps fails noisily when the process exits on this error.
  if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
    raise CheckpointError(f"No checkpoint in {directory}: the run in {workdir} has saved "
                          "none (it has only its config); train it, or pick a run that saved "
                          "one.")
  enable_compilation_cache(config.get("compilation_cache_dir", ""))
  mesh = sharding.make_mesh(config.mesh)
  model = create_model(config)
  _, tx = create_optimizer(config)
  abstract_state, state_shardings = abstract_train_state(model, tx, config, mesh)
  checkpointer = checkpoint.Checkpointer(workdir, config.checkpoint, 0,
                                         checkpoint.run_metadata(config), read_only=True)
  try:
    for attempt in range(3):
      chosen = _inference_step(checkpointer, step)
      problem, _ = resume.find_damage(checkpointer, chosen)
      if problem is None:
        try:
          state = checkpointer.restore(chosen, abstract_state)
          break
        except (FileNotFoundError, ValueError):
          checkpointer.manager.reload()
          if step is not None or chosen in checkpointer.manager.all_steps() or attempt == 2:
            raise
          continue  # deleted by the live run while we read it: take the newest
      raise CheckpointError(f"Checkpoint step {chosen} is damaged: {problem}. Choose another "
                            f"with --step (available: {sorted(checkpointer.manager.all_steps())}).")
  finally:
    checkpointer.close()
  return InferenceParts(config, model, mesh, state, state_shardings, chosen)


def _inference_step(checkpointer, step: int | None) -> int:
  available = checkpointer.manager.all_steps()
  if not available:
    raise CheckpointError(f"No checkpoint in {checkpointer.directory}.")
  if step is None:
    return max(available)
  if step not in available:
    raise CheckpointError(f"No checkpoint for step {step} in {checkpointer.directory}; "
                          f"available: {sorted(available)}.")
  return step
