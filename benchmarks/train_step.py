"""Images/s of jaxcls's training step against a minimal hand-written Flax step, in one process.

jaxcls's step comes from its own modules, built from a config file as a user's run builds it
(benchmarks/harness.py: jaxcls_train_step). The minimal step below is what one would write by
hand for the same model, batch, dtype, optimizer and loss: one jitted function with donated
buffers. Both read the same synthetic uint8 batch that is already on the device, and run in
alternating phases; the ratio jaxcls / minimal is what counts (target: >= 0.97).

    python benchmarks/train_step.py                  # CPU sizes (two rows, a few minutes)
    python benchmarks/train_step.py --gpu            # ResNet-50 224px b256/b512, ResNet-18 32px b512
    python benchmarks/train_step.py --gpu --torch    # + torchvision under torch.compile
    python benchmarks/train_step.py --config configs/cifar10_resnet18.py --set batch_size=256

Run from the repository root with the package importable (`pip install .` or PYTHONPATH=.).
"""

import argparse
import json
import os
import sys
import time

import flax
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec
import optax

import harness
from jaxcls import dispatch, models

# preset -> rows of (label, config file, overrides, compare with torch when --torch). The GPU
# rows are those of ../shared/DESIGN.md's reference figures (torch only where it has one).
ROWS = {
    "cpu": [
        ("cnn w16 32px b128 (default.py)", "configs/default.py", [], False),
        ("resnet18 w16 32px b128", "configs/cifar10_resnet18.py",
         ["model.width=16", "batch_size=128"], False),
    ],
    "gpu": [
        ("resnet50 224px b256", "configs/imagenet_resnet50.py", ["batch_size=256"], True),
        ("resnet50 224px b512", "configs/imagenet_resnet50.py", ["batch_size=512"], False),
        ("resnet18 32px b512", "configs/cifar10_resnet18.py", ["batch_size=512"], True),
    ],
    # For tests: seconds, not minutes.
    "smoke": [
        ("resnet_tiny w8 32px b16", "configs/default.py",
         ["model.name='resnet_tiny'", "model.stem='small'", "model.width=8", "batch_size=16"],
         True),
    ],
}


class JaxclsContender(harness.Contender):

  def __init__(self, built, batch):
    self.name = "jaxcls"
    self.images_per_step = built.config.batch_size
    self._step, self._state, self._batch = built.step, built.state, batch

  def run(self, n):
    start = time.perf_counter()
    state, in_flight = self._state, dispatch.StepsInFlight()
    for _ in range(n):
      state, metrics = self._step(state, self._batch)
      in_flight.add(metrics)  # metrics stay on the device; a few steps ahead, as in the loop
    jax.block_until_ready(state)
    self._state = state
    return time.perf_counter() - start


class MinimalContender(harness.Contender):
  """A hand-written Flax step: no framework, same arithmetic."""

  def __init__(self, config, mesh, batch):
    self.name = "minimal"
    self.images_per_step = config.batch_size
    model = models.create_model(config.model, config.data.num_classes)
    size, num_classes = config.data.image_size, config.data.num_classes
    mean = jnp.asarray(config.data.mean, jnp.float32)
    std = jnp.asarray(config.data.std, jnp.float32)
    smoothing = config.optim.label_smoothing

    schedule = optax.warmup_cosine_decay_schedule(0.0, config.optim.learning_rate, 100, 1000)

    def decay_mask(params):
      flat = flax.traverse_util.flatten_dict(params)
      return flax.traverse_util.unflatten_dict(
          {k: k[-1] not in ("bias", "scale") for k in flat})

    tx = optax.chain(
        optax.add_decayed_weights(config.optim.weight_decay, mask=decay_mask),
        optax.sgd(schedule, momentum=config.optim.momentum, nesterov=config.optim.nesterov))

    def init(rng):
      variables = model.init(rng, jnp.zeros((1, size, size, 3)), train=False)
      params = variables["params"]
      return params, variables.get("batch_stats", {}), tx.init(params)

    def step(params, batch_stats, opt_state, images, labels):
      x = (images.astype(jnp.float32) / 255.0 - mean) / std

      def loss_fn(params):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=True, mutable=["batch_stats"])
        targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes), smoothing)
        loss = optax.softmax_cross_entropy(logits, targets).mean()
        return loss, updates.get("batch_stats", batch_stats)

      (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    replicated = NamedSharding(mesh, PartitionSpec())
    self._carry = jax.jit(init, out_shardings=replicated)(jax.random.key(1))
    self._step = jax.jit(step, donate_argnums=(0, 1, 2))
    self._images, self._labels = batch["image"], batch["label"]

  def run(self, n):
    start = time.perf_counter()
    carry, in_flight = self._carry, dispatch.StepsInFlight()
    for _ in range(n):
      *carry, loss = self._step(*carry, self._images, self._labels)
      in_flight.add(loss)  # the same bound as jaxcls's loop
    jax.block_until_ready(carry)
    self._carry = carry
    return time.perf_counter() - start


class TorchContender(harness.Contender):
  """torchvision's same ResNet under torch.compile: channels_last, bf16 autocast on CUDA."""

  def __init__(self, config):
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision

    cfg = config.model
    if not cfg.name.startswith("resnet") or cfg.name == "resnet_tiny" or cfg.width != 64:
      raise ValueError(f"torchvision has no {cfg.name} of width {cfg.width}")
    self.name = "torch"
    self.images_per_step = config.batch_size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest convolutions once
    self._sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    model = getattr(torchvision.models, cfg.name)(num_classes=config.data.num_classes)
    if cfg.stem == "small":  # the CIFAR stem, as jaxcls's 'small': 3x3 conv, no max-pool
      model.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
      model.maxpool = torch.nn.Identity()
    model = model.to(device, memory_format=torch.channels_last).train()
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": config.optim.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=config.optim.learning_rate, momentum=config.optim.momentum,
                  nesterov=config.optim.nesterov)
    try:
      self._opt = torch.optim.SGD(groups, fused=device == "cuda", **kwargs)
    except (RuntimeError, TypeError):
      self._opt = torch.optim.SGD(groups, **kwargs)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=config.optim.label_smoothing)
    bf16 = device == "cuda" and cfg.dtype in ("bfloat16", "auto")
    mean = torch.tensor(config.data.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(config.data.std, device=device).view(1, 3, 1, 1)

    def forward_loss(images, labels):
      # NHWC uint8 -> NCHW float: a permuted view, which is channels_last memory already.
      x = (images.permute(0, 3, 1, 2).float() / 255 - mean) / std
      with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
        return loss_fn(model(x), labels)

    # One compiled graph from uint8 images to the loss, as jaxcls's step normalizes inside.
    self._forward_loss = torch.compile(forward_loss)
    shape = (config.batch_size, config.data.image_size, config.data.image_size, 3)
    generator = torch.Generator(device=device).manual_seed(0)
    self._images = torch.randint(0, 256, shape, dtype=torch.uint8, device=device,
                                 generator=generator)
    self._labels = torch.randint(0, config.data.num_classes, (config.batch_size,),
                                 device=device, generator=generator)

  def _step(self):
    loss = self._forward_loss(self._images, self._labels)
    self._opt.zero_grad(set_to_none=True)
    loss.backward()
    self._opt.step()

  def run(self, n):
    start = time.perf_counter()
    for _ in range(n):
      self._step()
    self._sync()
    return time.perf_counter() - start


def bench_row(label, spec, overrides, with_torch, args):
  """Builds the contenders of one row, alternates them and prints the figures; -> summary."""
  config = harness.load_config(spec, overrides)
  dtype = models.resolve_dtype(config.model.dtype).dtype.name
  print(f"\n== {label}: {spec} {' '.join(overrides)} (compute {dtype})", flush=True)
  start = time.perf_counter()
  built = harness.jaxcls_train_step(config)
  batch = harness.device_batch(config, built.mesh)
  contenders = [JaxclsContender(built, batch), MinimalContender(config, built.mesh, batch)]
  notes = []
  if args.torch and with_torch:
    try:
      torch_contender = TorchContender(config)
      torch_contender.run(1)  # torch.compile compiles here; a failure must not end the row
      contenders.append(torch_contender)
    except Exception as e:  # pylint: disable=broad-except
      notes.append(f"torch row skipped: {type(e).__name__}: {str(e).strip()[:300]}")
  harness.warm_up(contenders)
  steps = args.steps or harness.calibrate(contenders, args.seconds, args.min_steps)
  print(f"  built and warmed up in {time.perf_counter() - start:.1f}s; {steps} steps per "
        f"phase, {args.rounds} rounds", flush=True)
  rates = harness.alternate(contenders, steps, args.rounds)
  summary = {"row": label, "dtype": dtype}
  for c in contenders:
    summary[c.name] = sorted(rates[c.name])[len(rates[c.name]) // 2]
  for name in [c.name for c in contenders][1:]:
    mid, low, high = harness.ratio(rates, "jaxcls", name)
    summary[f"jaxcls/{name}"] = mid
    summary.setdefault("ranges", {})[f"jaxcls/{name}"] = [low, high]
    print(f"  ratio jaxcls/{name}: {mid:.3f} (rounds {low:.3f}-{high:.3f})")
  for note in notes:
    print(f"  {note}")
  return summary


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--rows", default="cpu", choices=sorted(ROWS),
                      help="a preset list of rows (default: cpu)")
  parser.add_argument("--gpu", action="store_true", help="same as --rows gpu")
  parser.add_argument("--config", help="one row from this config file instead of a preset")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override for --config (repeatable)")
  parser.add_argument("--batch_sizes", default="",
                      help="comma-separated batch sizes: repeat each row with each")
  parser.add_argument("--torch", action="store_true",
                      help="add torchvision's model under torch.compile (skipped if absent)")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--seconds", type=float, default=3.0, help="per phase, about")
  parser.add_argument("--steps", type=int, default=0, help="per phase (default: from --seconds)")
  parser.add_argument("--min_steps", type=int, default=3)
  parser.add_argument("--json", help="also write the rows to this JSON file")
  args = parser.parse_args()
  if args.torch:
    # JAX would take 75% of the GPU's memory at start; leave torch its share.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")

  if args.config:
    rows = [(args.config, args.config, args.set, True)]
  else:
    rows = ROWS["gpu" if args.gpu else args.rows]
  if args.batch_sizes:
    rows = [(f"{label.rsplit(' b', 1)[0]} b{b}", spec, [*overrides, f"batch_size={b}"], torch)
            for label, spec, overrides, torch in rows for b in args.batch_sizes.split(",")]
  print(harness.machine())
  summaries = [bench_row(*row, args) for row in rows]

  names = list(dict.fromkeys(k for s in summaries for k in s
                             if k not in ("row", "dtype", "ranges")))
  print("\n| row | compute | " + " | ".join(
      f"{n} images/s" if "/" not in n else f"ratio {n}" for n in names) + " |")
  print("|---" * (len(names) + 2) + "|")
  for s in summaries:
    cells = ["-" if n not in s else f"{s[n]:.3f}" if "/" in n else f"{s[n]:,.0f}"
             for n in names]
    print(f"| {s['row']} | {s['dtype']} | " + " | ".join(cells) + " |")
  sys.stdout.flush()
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"machine": harness.machine(), "rows": summaries}, f, indent=1)


if __name__ == "__main__":
  main()
