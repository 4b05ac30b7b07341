"""What the in-process tests share: small configs, seeded steps on a device mesh, image files
whose pixels spell their index, and the checks against the session's reference run.

Imported after tests/conftest.py has given JAX its 8 fake CPU devices.
"""

import collections
import functools
import io
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from jaxcls import build, checkpoint, sharding, steps
from jaxcls import config as config_lib
from runner import REFERENCE_STEPS, losses_by_step

# Configs.

MIN_SIZE = 256  # small enough that the tiny model's 3x3 kernels are "large"


def tiny_config(**mesh):
  config = config_lib.base_config()
  config.model.name = "resnet_tiny"
  config.model.width = 8
  config.batch_size = 16
  config.data.image_size = 16
  config.mesh.data = mesh.get("data", -1)
  config.mesh.fsdp = mesh.get("fsdp", 1)
  config.mesh.fsdp_min_size = 256  # small enough that the tiny model's kernels get split
  config.mesh.zero_stage = 3  # fsdp splits all it can (zero_config picks another stage)
  config.optim.warmup_epochs = 0.0
  config.optim.learning_rate = 0.05
  return config


def zero_config(stage=3, accum=1, data=-1, fsdp=1, model=1):
  """tiny_config with a ZeRO stage, micro-batches and a model axis."""
  config = tiny_config(data=data, fsdp=fsdp)
  config.model.zero_init_residual = False  # every kernel gets a gradient from step 1
  config.mesh.model = model
  config.mesh.zero_stage = stage
  config.grad_accum_steps = accum
  assert config.mesh.fsdp_min_size == MIN_SIZE
  return config


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The base config's data section, no worker processes unless asked."""
  config = config_lib.base_config().data
  config.update(dict(num_workers=0))
  config.update(overrides)
  return config


# 8x8 images, no random crop: cheap, and every pixel of an image reaches the batch.
SMALL = dict(image_size=8, eval_resize=8, train_augment="none")


def small_data_config(**overrides) -> ml_collections.ConfigDict:
  return data_config(**{**SMALL, **overrides})


def folder_config(root, **overrides):
  return small_data_config(**{"source": "image_folder", "path": str(root), "num_classes": 3,
                              **overrides})


def array_record_config(path, **overrides):
  return small_data_config(**{"source": "array_record", "path": str(path), "num_classes": 3,
                              **overrides})


# Seeded train steps on a mesh of the fake devices.

NUM_STEPS = 3


def synthetic_batches(config, num_steps, seed=0):
  rng = np.random.default_rng(seed)
  size = config.data.image_size
  return [{
      "image": rng.integers(0, 256, (config.batch_size, size, size, 3), dtype=np.uint8),
      "label": rng.integers(0, config.data.num_classes, (config.batch_size,), dtype=np.int32),
  } for _ in range(num_steps)]


def put_batch(batch, mesh):
  """A host batch on the mesh, its batch dimension split as training splits it."""
  batch_sharding = sharding.batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.device_put(x, batch_sharding), batch)


def train_on_mesh(config, devices, batches):
  """Trains from config.seed's initial state, built on this mesh; -> (losses, params, state)."""
  mesh = sharding.make_mesh(config.mesh, devices)
  model = build.create_model(config)
  schedule, tx = build.create_optimizer(config, 10, 10)
  state, state_shardings = build.create_train_state(model, tx, config, mesh)
  train_step = build.compile_train_step(
      steps.make_train_step(config.data, config.optim, schedule),
      state, state_shardings, mesh, config)
  losses = []
  for batch in batches:
    state, metrics = train_step(state, put_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state


class NoBatchNormNet(nn.Module):
  """Conv-ReLU-pool-Dense, plus a call counter in the batch_stats collection."""
  bn_axis_name: Any = None  # the models' field (gradient accumulation sets it); no BatchNorm

  @nn.compact
  def __call__(self, x, train: bool):
    calls = self.variable("batch_stats", "calls", lambda: jnp.zeros((), jnp.int32))
    if train:
      calls.value += 1
    x = nn.relu(nn.Conv(16, (3, 3))(x))
    return nn.Dense(10)(jnp.mean(x, axis=(1, 2)))


Run = collections.namedtuple("Run", "losses params state grads hlo")


@functools.cache
def model_and_optimizer(model_name):
  """One model and optimizer for all runs, so that one initial state serves every mesh."""
  config = zero_config()
  model = build.create_model(config) if model_name == "resnet_tiny" else NoBatchNormNet()
  schedule, tx = build.create_optimizer(config, 10, 10)
  return model, schedule, tx


@functools.cache
def initial_state(model_name):
  """The seeded initial state on the host: placed on each mesh with device_put, which is
  much cheaper than compiling the initializer once per mesh."""
  model, _, tx = model_and_optimizer(model_name)
  config = zero_config(data=1)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  return jax.device_get(build.create_train_state(model, tx, config, mesh)[0])


def train_run(config, devices, model_name="resnet_tiny", with_grads=True):
  """NUM_STEPS seeded steps; also the gradients of the first batch in the stage's layout.

  The gradients are an intermediate of the train step, so they are measured by jitting the
  step's own gradient function (steps.make_compute_grads, with the same grad shardings)
  and reading the shards of its outputs.
  """
  mesh = sharding.make_mesh(config.mesh, devices)
  model, schedule, tx = model_and_optimizer(model_name)
  _, state_shardings = build.abstract_train_state(model, tx, config, mesh)
  state = jax.device_put(initial_state(model_name), state_shardings)
  grad_shardings = sharding.grad_shardings(mesh, state.params, config.mesh)
  train_step = build.compile_train_step(
      steps.make_train_step(config.data, config.optim, schedule,
                            config.grad_accum_steps, grad_shardings),
      state, state_shardings, mesh, config)
  batches = synthetic_batches(config, NUM_STEPS)
  grads = None
  if with_grads:
    compute_grads = jax.jit(steps.make_compute_grads(
        config.data, config.optim, config.grad_accum_steps, grad_shardings))
    grads = compute_grads(state, put_batch(batches[0], mesh))[0]
  losses = []
  for batch in batches:
    state, metrics = train_step(state, put_batch(batch, mesh))
    losses.append(float(metrics["loss"]))
  return Run(losses, jax.device_get(state.params), state, grads, train_step.as_text())


def assert_same_training(run, reference, label):
  np.testing.assert_allclose(run.losses, reference.losses, rtol=2e-5, atol=2e-5, err_msg=label)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5,
                                                       err_msg=label),
               run.params, reference.params)


# Images that spell their index, to trace one through a pipeline.


def color(i: int) -> tuple[int, int, int]:
  """A colour that spells i."""
  return (i % 256, i // 256, 7)


def index_of(image: np.ndarray) -> int:
  """The i of an image coloured color(i)."""
  return int(image[0, 0, 0]) + 256 * int(image[0, 0, 1])


def indices_of(images: np.ndarray) -> np.ndarray:
  """index_of for each image of a batch."""
  return images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **kwargs)
  return buffer.getvalue()


def write_image(path: pathlib.Path, i: int, fmt: str | None = None, size=(8, 8)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, color(i)).save(path, format=fmt)


# The `folder` fixture (tests/conftest.py): formats by extension, any case; hidden files and
# folders and other files are ignored.
LAYOUT = {
    "cat/a.png": "PNG", "cat/b.PNG": "PNG", "cat/sub/c.bmp": "BMP", "cat/d.webp": "WEBP",
    "dog/e.gif": "GIF", "dog/f.JPEG": "JPEG", "dog/g.jpg": "JPEG",
    "zebra/h.png": "PNG",
}
IGNORED = ["cat/.hidden.png", ".git/x.png", "dog/.cache/y.png"]


def write_layout(root: pathlib.Path) -> pathlib.Path:
  for i, (name, fmt) in enumerate(LAYOUT.items()):
    write_image(root / name, i, fmt, size=(8 + i, 8))
  for name in IGNORED:
    write_image(root / name, 99, "PNG")
  (root / "cat" / "notes.txt").write_text("not an image")
  return root


# The `damaged` fixture: 12 good images of 2 classes and these bad files (None: truncated).
BAD_FILES = {
    "cat/zero.jpg": b"",
    "cat/text.png": b"label,file\n1,foo.png\n",
    "dog/truncated.jpg": None,
}


def write_damaged(root: pathlib.Path) -> pathlib.Path:
  for i in range(12):
    write_image(root / ("cat" if i % 2 else "dog") / f"{i:02d}.png", i)
  for name, data in BAD_FILES.items():
    if data is None:
      data = encode(Image.new("RGB", (32, 32), (9, 9, 9)), "JPEG")[:200]
    (root / name).write_bytes(data)
  return root


def flat_gray_jpeg(width: int, height: int) -> bytes:
  """A valid baseline JPEG of width x height mid-grey (128) pixels, written without holding
  the pixels: every 8x8 block is a DC difference of 0 ('00') and an end of block ('1010'),
  so 20000 x 20000 takes 4.7 MB, as the decompression bomb of issue #18 did."""
  def segment(marker: int, body: bytes) -> bytes:
    return bytes([0xFF, marker]) + (len(body) + 2).to_bytes(2, "big") + body
  # The standard luminance tables (ITU T.81 K.3): 12 DC categories and the 162 AC symbols.
  dc = bytes([0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0]) + bytes(range(12))
  ac_counts = bytes([0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D])
  ac_symbols = bytes([1, 2, 3, 0, 4, 0x11, 5, 0x12, 0x21, 0x31, 0x41, 6, 0x13, 0x51, 0x61, 7])
  ac_symbols += bytes(162 - len(ac_symbols))  # only the first 16 matter: EOB is '1010'
  blocks = -(-width // 8) * -(-height // 8)
  # 4 blocks = 24 bits = b"\x28\xa2\x8a"; the last, partial group padded with 1 bits.
  bits = "001010" * (blocks % 4)
  bits += "1" * (-len(bits) % 8)
  tail = int(bits, 2).to_bytes(len(bits) // 8, "big") if bits else b""
  return (b"\xff\xd8"
          + segment(0xDB, b"\x00" + bytes([1] * 64))
          + segment(0xC0, b"\x08" + height.to_bytes(2, "big") + width.to_bytes(2, "big")
                    + b"\x01\x01\x11\x00")
          + segment(0xC4, b"\x00" + dc) + segment(0xC4, b"\x10" + ac_counts + ac_symbols)
          + segment(0xDA, b"\x01\x01\x00\x00\x3f\x00")
          + b"\x28\xa2\x8a" * (blocks // 4) + tail + b"\xff\xd9")


# The session's reference run (tests/conftest.py `reference`, runner.REFERENCE_RUN).


def exported_params(workdir):
  variables, info = checkpoint.load_export(str(pathlib.Path(workdir) / "export"))
  assert info["step"] == REFERENCE_STEPS
  return variables


def assert_same_as_reference(workdir, reference):
  assert losses_by_step(workdir) == losses_by_step(reference)  # exact, every step
  assert len(losses_by_step(workdir)) == REFERENCE_STEPS
  jax.tree.map(np.testing.assert_array_equal, exported_params(workdir),
               exported_params(reference))
