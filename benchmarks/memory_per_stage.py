"""Per-device memory of the training state for each ZeRO stage, from the shardings alone.

    python benchmarks/memory_per_stage.py [--devices 8] [--models resnet50,resnet152]

Builds the train state as shapes (jax.eval_shape, nothing allocated), lays it out with
jaxcls.sharding for each stage on a (data=1, fsdp=N) mesh of N fake CPU devices, and sums
the bytes one device holds of the parameters, the optimizer state (SGD momentum), the
gradients (in the layout the step constrains them to before the update) and the BatchNorm
statistics. Activations are not included: they depend on the batch, not on the stage.
"""

import argparse

import fake_devices

_ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ARGS.add_argument("--devices", type=int, default=8)
_ARGS.add_argument("--models", default="resnet50,resnet152")

if __name__ == "__main__":
  _FLAGS = _ARGS.parse_args()
  fake_devices.use(_FLAGS.devices)

import jax  # pylint: disable=g-import-not-at-top

from jaxcls import config as config_lib  # pylint: disable=g-import-not-at-top
from jaxcls.memory import state_memory  # pylint: disable=g-import-not-at-top


def imagenet_config(model_name: str, devices: int, stage: int, model_axis: int = 1):
  config = config_lib.base_config()
  config.model.name = model_name
  config.model.stem = "imagenet"
  config.data.num_classes = 1000
  config.data.image_size = 224
  config.mesh.data = 1
  config.mesh.fsdp = devices // model_axis
  config.mesh.model = model_axis
  config.mesh.zero_stage = stage
  return config


def main():
  devices = jax.device_count()
  print(f"Per-device MiB of the training state, float32, SGD momentum, {devices} devices "
        f"(fsdp_min_size {config_lib.base_config().mesh.fsdp_min_size}).\n")
  print("| model | params | mesh | ZeRO stage | params | optimizer | gradients | BN stats | "
        "total | vs stage 0 |")
  print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
  for name in _FLAGS.models.split(","):
    rows = [(stage, 1) for stage in (0, 1, 2, 3)] + [(3, 2)]
    base = None
    for stage, model_axis in rows:
      m = state_memory(imagenet_config(name, devices, stage, model_axis))
      base = base or m["total"]
      mesh = f"fsdp={devices // model_axis}" + (f", model={model_axis}" if model_axis > 1 else "")
      print(f"| {name} | {m['num_params'] / 1e6:.1f}M | {mesh} | {stage} | {m['params']:.1f} | "
            f"{m['optimizer']:.1f} | {m['gradients']:.1f} | {m['batch_stats']:.2f} | "
            f"{m['total']:.1f} | {m['total'] / base:.2f} |")


if __name__ == "__main__":
  main()
