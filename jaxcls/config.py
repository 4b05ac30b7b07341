"""The base config every config file starts from, and the checks run before any compilation.

Config files under configs/ call `base_config()` and change what they need, so every key a
run can use is listed here once, with its default and a comment. A key that is not here is a
typo: `check_config` names it and suggests the closest known key.

Each module checks its own part of the config (`<module>.check_config`); `check_config` here
calls them all and adds only the checks that span modules (the batch over the mesh).
"""

import difflib
import importlib.util
import math
import os

import ml_collections

from jaxcls import checkpoint, distributed, ema, models, optim, sharding, steps
from jaxcls.data import augment, dali, image_folder, mixing, pipeline, sources, transforms
from jaxcls.errors import ConfigError, check_at_least, check_choice


def base_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: see jaxcls/data/. Images reach the device as uint8 and are normalized there.
  config.data = ml_collections.ConfigDict()
  # Sources (docs/guide.md "Bringing your data"): 'bundled', 'npz', 'image_folder', 'tfds',
  # 'array_record' (written by `python -m jaxcls.data.convert`) or 'synthetic'.
  config.data.source = "bundled"  # registry key in jaxcls.data.sources
  config.data.path = ""  # the data's directory; for 'tfds' the data_dir ('' = TFDS's default)
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.eval_path = ""  # image_folder: eval root with the same class folders as path
  config.data.eval_fraction = 0.0  # image_folder: > 0 holds out this fraction of each class
  config.data.eval_fraction_seed = 0  # not config.seed, so every run evaluates the same images
  config.data.follow_links = False  # image_folder: True also reads linked folders outside path
  config.data.tfds_name = ""  # tfds: e.g. 'cifar10', 'imagenet2012'
  config.data.tfds_image_key = "image"  # tfds: feature names of the image and the ClassLabel
  config.data.tfds_label_key = "label"
  config.data.skip_corrupt = False  # True: decode all once up front, drop and list bad images
  config.data.max_corrupt_fraction = 0.01  # with skip_corrupt: more bad images is an error
  # Images whose header gives more pixels are refused (or skipped) before decoding. Default:
  # PIL's Image.MAX_IMAGE_PIXELS; 0 = no limit.
  config.data.max_image_pixels = 89_478_485
  # 'cpu': grain workers decode and crop (the default); 'dali': NVIDIA DALI decodes and crops
  # on the GPU (pip install 'jaxcls[dali]'; jaxcls/data/dali.py).
  config.data.decoder = "cpu"
  config.data.num_classes = 10
  config.data.image_size = 32
  # Progressive resizing (data/resolution.py): ((epoch, size), ...) trains at `size` from
  # `epoch` on, e.g. ((0, 160), (30, 192)); () trains at image_size, which evaluation uses.
  config.data.resize_schedule = ()
  # Augmentation: crop, then optional policies, on the host; mixing on the device.
  config.data.train_augment = "pad_crop_flip"  # or 'random_resized_crop_flip' or 'none'
  config.data.crop_padding = 4
  config.data.auto_augment = "none"  # or 'randaugment' or 'trivialaugment', after the crop
  config.data.randaugment_num_ops = 2
  config.data.randaugment_magnitude = 9.0  # 0-10; 10 is each operation's maximum
  config.data.random_erasing = 0.0  # probability of replacing a random rectangle with noise
  config.data.mixup_alpha = 0.0  # > 0: mixup with lambda ~ Beta(alpha, alpha), per batch
  config.data.cutmix_alpha = 0.0  # > 0: cutmix; with mixup too, each batch picks one (50/50)
  config.data.mix_prob = 1.0  # fraction of batches mixed when an alpha is > 0
  config.data.eval_resize = 32  # shorter side before the center crop (ImageNet: 256 for 224)
  config.data.mean = (0.4914, 0.4822, 0.4465)  # in [0, 1], per RGB channel
  config.data.std = (0.2470, 0.2435, 0.2616)
  # grain worker processes that decode and augment; 0 works in the main process (in threads);
  # -1 picks from this process's cores (its share of the host: jaxcls/data/cores.py): 0 with
  # 4 or fewer, else cores - 2, no cap (logged at the start).
  config.data.num_workers = -1
  config.data.prefetch_batches = 2  # batches kept ready ahead of the step
  config.data.synthetic_size = 10_000  # examples of the 'synthetic' source

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"  # registry key in jaxcls.models
  config.model.stem = "small"  # 'small' (3x3 conv, no max-pool) or 'imagenet' (7x7/2 + pool)
  config.model.width = 64  # channels of the first stage
  # Compute dtype: float32, bfloat16, float16, or "auto" = bfloat16 on GPU / TPU and float32
  # on CPU (no fast bf16 there). Parameters stay float32.
  config.model.dtype = "auto"
  config.model.zero_init_residual = True  # last BatchNorm scale of each block starts at 0
  config.model.bn_momentum = 0.9
  # cnn only (the ResNets ignore it): each 3x3 conv's first min(in, out) filters start as the
  # identity (airbench's dirac init; models/cnn.py), the rest as usual.
  config.model.identity_init = False
  # cnn only: 'pool_then_conv' (each stage max-pools, then convolves) or 'conv_then_pool'
  # (airbench's layout: each stage's first conv before the pool, global max pool; models/cnn.py).
  config.model.downsample = "pool_then_conv"
  # Start training from these weights (docs/guide.md "Start from pretrained weights"): a
  # jaxcls export directory (a run's export/, or `python -m jaxcls.weights import`'s output)
  # or a torchvision / timm ResNet .safetensors. Another class count re-initializes the head.
  # A checkpoint in the workdir takes precedence: a resumed run continues from it.
  config.model.init_from = ""

  # Devices: named mesh axes; -1 takes the remaining devices. The global batch is split over
  # data x fsdp; the train state over fsdp as zero_stage says, and over model (tensor
  # parallel: output channels of large kernels). See jaxcls/sharding.py.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1
  config.mesh.fsdp = 1
  config.mesh.model = 1  # devices of one group see the same examples; keep it within a host
  # The axis that spans hosts on a multi-host run ('data' or 'fsdp'); the others stay inside
  # each host (jax mesh_utils.create_hybrid_device_mesh). Its size must divide by the hosts.
  config.mesh.across_hosts = "data"
  # ZeRO stage over fsdp: 0 all replicated, 1 optimizer state split, 2 gradients too
  # (reduce-scatter), 3 parameters too (FSDP). No effect while fsdp is 1. 0 is the fastest
  # for a model that fits (least communication; resnet18 on fsdp=8 CPU devices: stages 1, 2
  # and 3 at 0.97x, 0.96x, 0.91x of stage 0's images/s, benchmarks/README.md); raise it
  # when the state does not fit (jaxcls.memory).
  config.mesh.zero_stage = 0
  config.mesh.fsdp_min_size = 2**14  # arrays with fewer elements stay replicated
  # Per-array overrides of the split, first match wins: (("regex on 'a/b/kernel'", spec), ...)
  # where spec has one entry per dimension: None, an axis name or a tuple of names;
  # () keeps the array replicated. Optimizer state and gradients follow their parameter.
  config.mesh.rules = ()

  config.batch_size = 256  # global, over all processes and devices
  # Micro-batches per step, run one after another inside the step: the update sees the
  # whole batch_size, the activations take the memory of batch_size / grad_accum_steps.
  # Gradients cross devices once per step, after the last micro-batch; BatchNorm normalizes
  # each micro-batch by its own statistics (docs/guide.md "Concepts").
  config.grad_accum_steps = 1
  config.eval_batch_size = 512  # global; the last batch is padded and masked
  config.num_epochs = 10.0
  config.num_train_steps = -1  # > 0 overrides num_epochs

  config.optim = ml_collections.ConfigDict()
  # optax's 'sgd' (with momentum), 'lars' (layer-wise trust ratio, for very large batches),
  # 'lamb' or 'adamw'; docs/guide.md "Optimizers".
  config.optim.name = "sgd"
  config.optim.learning_rate = 0.1  # peak
  config.optim.lr_scaling = "none"  # 'linear': learning_rate * batch_size / base_batch_size
  config.optim.base_batch_size = 256
  # After the linear warmup: 'cosine' (to 0), 'constant', 'step' or 'polynomial'.
  config.optim.schedule = "cosine"
  config.optim.warmup_epochs = 1.0
  config.optim.step_boundaries = (0.5, 0.75)  # 'step': fractions of training
  config.optim.step_decay = 0.1  # 'step': factor at each boundary
  config.optim.polynomial_power = 2.0  # 'polynomial': (1 - t)^power from the peak ...
  config.optim.end_learning_rate = 0.0  # ... to this at the last step
  config.optim.momentum = 0.9  # sgd, lars
  config.optim.nesterov = True  # sgd, lars
  config.optim.b1 = 0.9  # lamb, adamw: decay of the first moment
  config.optim.b2 = 0.999  # lamb, adamw: decay of the second moment
  config.optim.eps = 1e-8  # lamb, adamw: added to the denominator; lars: to the trust ratio's
  config.optim.trust_coefficient = 0.001  # lars: the trust ratio's factor
  # On kernels only, not on BatchNorm or biases. sgd, lars: L2 added to the gradient (before
  # momentum; for lars before the trust ratio); lamb: decoupled, before the trust ratio;
  # adamw: decoupled, times the learning rate.
  config.optim.weight_decay = 5e-4
  config.optim.label_smoothing = 0.1
  # Fine-tuning (jaxcls/optim.py): parameters whose path ('stage1_block1/conv1/kernel')
  # matches `freeze` are not updated (their BatchNorm statistics still are, in training mode);
  # those not matching `head_params` train at learning_rate * backbone_lr_scale.
  config.optim.freeze = ""  # regex; "" freezes nothing
  config.optim.head_params = "^head/"  # regex: the parameters that keep the full learning rate
  config.optim.backbone_lr_scale = 1.0

  # Checkpoints in <workdir>/checkpoints (see jaxcls/checkpoint.py). A run started again with
  # the same workdir resumes from the latest complete one, data position included.
  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_epochs = 1.0  # also at the end and on SIGTERM / SIGINT
  config.checkpoint.every_steps = -1  # > 0 overrides every_epochs
  config.checkpoint.keep = 3  # the latest K are kept
  config.checkpoint.best_metric = ""  # e.g. 'accuracy': also keep the best eval checkpoint
  config.checkpoint.best_mode = "max"  # 'max' or 'min' for best_metric
  config.checkpoint.async_save = True  # write in the background while training goes on
  config.checkpoint.resume = True
  config.checkpoint.fallback_to_previous = False  # a damaged latest step: use the one before
  config.checkpoint.restart_data_on_mismatch = False  # see checkpoint.DATA_KEYS

  # Multi-process runs (jaxcls/distributed.py): explicit values here or the command-line
  # flags win, then JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, then the
  # launcher's variables (torchrun style), then JAX's cluster detection.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ""  # host:port of process 0
  config.distributed.num_processes = 0
  config.distributed.process_id = -1
  config.distributed.timeout_seconds = 300  # stop with an error if peers are not all there
  # A process silent this long is lost: the others stop with one line (liveness.py).
  config.distributed.peer_timeout_seconds = 30
  config.distributed.cluster_detection = "auto"  # 'auto' (see distributed.py), 'jax', 'off'

  # Process 0 holds <workdir>/lock.json while the run lives, renewing it every lease / 4
  # seconds; a second run on the same workdir is refused. A lock not renewed within the lease
  # (its holder on another host died) does not block a restart; on the same host a holder
  # whose process is gone never does.
  config.lock_lease_seconds = 300.0
  config.log_every_steps = 50
  config.eval_every_epochs = 0.0  # 0: evaluate only at the end
  # Persistent XLA compilation cache: a second start of the same config loads the compiled
  # steps instead of compiling them again. "" turns it off. Set by jaxcls.build. Default:
  # $XDG_CACHE_HOME/jaxcls/xla, or ~/.cache/jaxcls/xla when XDG_CACHE_HOME is not set.
  config.compilation_cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache",
                                              "jaxcls", "xla")
  config.eval_top_k = (1, 5)  # top-k accuracies to report (k >= the class count is skipped)
  # Test-time augmentation at every eval: 'flip' averages the softmax probabilities of each
  # image and its mirror image; 'flip_shift' also of one-pixel shifts (steps.tta_views: 6
  # views). Reported beside the plain metrics as tta_* (the same pass).
  config.eval_tta = "none"

  # Weight EMA (jaxcls/ema.py): an average of the parameters and BatchNorm statistics, kept
  # in the train state and checkpointed; evals also report it (ema_*). 0 = off.
  config.ema = ml_collections.ConfigDict()
  config.ema.decay = 0.0  # e.g. 0.9998; each step: ema = d * ema + (1 - d) * weights
  config.ema.warmup = True  # d = min(decay, (1 + step) / (10 + step))
  # The export holds the EMA weights, and evaluate / predict use them unless --weights raw.
  config.ema.use_for_inference = True
  return config


def _flat_keys(config, prefix="") -> dict:
  out = {}
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flat_keys(value, path + "."))
    else:
      out[path] = value
  return out


def _check_known(key: str, known, spell=lambda key: f"config.{key}") -> None:
  """A ConfigError for an unknown dotted key, with the closest known one (spelled alike)."""
  if key not in known:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean {spell(close[0])}?" if close else ""
    raise ConfigError(f"{spell(key)} is not a known config key.{hint} "
                      "Known keys are listed in jaxcls/config.py.")


def check_known_keys(config) -> None:
  known = _flat_keys(base_config())
  for key in _flat_keys(config):
    _check_known(key, known)


def load_config(path: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """Loads a config file's get_config() and applies {"dotted.key": value} overrides.

  The notebook form of `--config path[:arg] --config.key=value`: an unknown key or a value
  of the wrong type is a ConfigError naming the key.
  """
  path, _, arg = path.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} does not exist.")
  spec = importlib.util.spec_from_file_location(
      f"jaxcls_config_{abs(hash(os.path.abspath(path)))}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file {path!r} has no get_config() function.")
  config = module.get_config(arg) if arg else module.get_config()
  known = _flat_keys(base_config())
  for key, value in (overrides or {}).items():
    _check_known(key, known, spell=repr)
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    try:
      node[leaf] = value
    except TypeError as e:
      raise ConfigError(f"Override {key}={value!r}: {e}") from None
  check_known_keys(config)
  return config


def _check_batch_sizes(config, mesh_sizes: dict, process_count: int) -> None:
  """The global batches over the mesh, the micro-batches and the processes."""
  accum = config.grad_accum_steps
  if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
    raise ConfigError(f"config.grad_accum_steps={accum!r} must be a positive integer.")
  batch_shards = math.prod(mesh_sizes[axis] for axis in sharding.BATCH_AXES)
  for key, parts in (("batch_size", accum), ("eval_batch_size", 1)):
    size = config[key]
    pipeline.local_batch_size(size, process_count, key)  # positive, and splits over processes
    multiple = parts * batch_shards
    if size % multiple:
      problem = (f"does not split into {parts} micro-batches (config.grad_accum_steps) over "
                 f"the {batch_shards} data-parallel devices" if parts > 1 else
                 f"is not divisible by the {batch_shards} data-parallel devices (mesh data="
                 f"{mesh_sizes['data']} x fsdp={mesh_sizes['fsdp']})")
      raise ConfigError(f"config.{key}={size} {problem}. Use a multiple of {multiple}, e.g. "
                        f"--config.{key}={max(multiple, size // multiple * multiple)}.")


def check_config(config, num_devices: int, process_count: int = 1) -> None:
  """Everything that can be checked from the config and the device count alone."""
  check_known_keys(config)
  mesh_sizes = sharding.check_mesh_config(config.mesh, num_devices, process_count)
  _check_batch_sizes(config, mesh_sizes, process_count)
  models.check_config(config.model)
  models.check_init_from(config.model)
  optim.check_config(config.optim)
  for check_data in (sources.check_config, image_folder.check_config, transforms.check_config,
                     augment.check_config, mixing.check_config, pipeline.check_config,
                     dali.check_config):
    check_data(config.data)
  checkpoint.check_config(config.checkpoint)
  ema.check_config(config.ema)
  distributed.check_config(config.distributed)
  _check_run_keys(config)


def _check_run_keys(config) -> None:
  """The top-level keys: run length, cadences, seed, top-k, TTA, the workdir lock's lease."""
  check_at_least("num_epochs", config.num_epochs, 0.0)
  if config.num_train_steps != -1:
    check_at_least("num_train_steps", config.num_train_steps, 1, integer=True)
  elif config.num_epochs <= 0:
    raise ConfigError("Set config.num_epochs or config.num_train_steps to a positive number.")
  check_at_least("log_every_steps", config.log_every_steps, 1, integer=True)
  check_at_least("seed", config.seed, 0, integer=True)
  check_at_least("eval_every_epochs", config.eval_every_epochs, 0.0)
  check_at_least("lock_lease_seconds", config.lock_lease_seconds, 0.0, inclusive=False)
  check_choice("eval_tta", config.eval_tta, steps.TTA)
  for k in config.eval_top_k:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
      raise ConfigError(f"config.eval_top_k={tuple(config.eval_top_k)!r}: each k must be a "
                        "positive integer (top-1 is plain accuracy).")
