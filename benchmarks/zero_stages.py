"""Train step time of each ZeRO stage, side by side, and XLA's own memory figures per stage.

    python benchmarks/zero_stages.py                     # resnet18, 32px, fsdp=8 CPU devices
    python benchmarks/zero_stages.py --set batch_size=64 --set grad_accum_steps=2

jaxcls's compiled train step (jaxcls.build, as training builds it) for stages 0-3 on a
(data=1, fsdp=N) mesh of N fake CPU devices, timed in alternating rounds (harness.alternate):
the ratio of each stage's images/s to stage 0's, measured in the same run. Also each step's
`compiled.memory_analysis()` per device (jaxcls.memory.compiled_memory): arguments, outputs,
temporaries and their sum (peak). On fake CPU devices all "devices" share the same cores, so
the step times show the cost of the extra collectives and layout changes, not of the network.
"""

import argparse

import fake_devices

_ARGS = argparse.ArgumentParser(description=__doc__.splitlines()[0])
_ARGS.add_argument("--devices", type=int, default=8)
_ARGS.add_argument("--config", default="configs/default.py")
_ARGS.add_argument("--set", action="append", default=[],
                   help="config override key=value (a Python literal), repeatable")
_ARGS.add_argument("--stages", default="0,1,2,3")
_ARGS.add_argument("--rounds", type=int, default=3)
_ARGS.add_argument("--seconds", type=float, default=5.0, help="length of one timed phase")

if __name__ == "__main__":
  _FLAGS = _ARGS.parse_args()
  fake_devices.use(_FLAGS.devices)

import time  # pylint: disable=g-import-not-at-top,wrong-import-order

import jax  # pylint: disable=g-import-not-at-top

import harness  # pylint: disable=g-import-not-at-top
from jaxcls import dispatch, memory  # pylint: disable=g-import-not-at-top

DEFAULTS = ["model.name='resnet18'", "model.stem='small'", "model.width=64",
            "data.image_size=32", "data.num_classes=10", "batch_size=64",
            "mesh.data=1", "mesh.fsdp=-1"]


class StageStep(harness.Contender):
  def __init__(self, stage: int, overrides):
    config = harness.load_config(_FLAGS.config, [*DEFAULTS, *overrides,
                                                 f"mesh.zero_stage={stage}"])
    self.name = f"stage {stage}"
    self.images_per_step = config.batch_size
    self.built = harness.jaxcls_train_step(config)
    self.batch = harness.device_batch(config, self.built.mesh)
    self.memory = memory.compiled_memory(self.built.step)

  def run(self, n: int) -> float:
    start = time.perf_counter()
    state, metrics, in_flight = self.built.state, None, dispatch.StepsInFlight()
    for _ in range(n):
      state, metrics = self.built.step(state, self.batch)
      in_flight.add(metrics)  # a few steps ahead, as in the loop
    jax.block_until_ready((state, metrics))
    self.built.state = state
    return time.perf_counter() - start


def main():
  stages = [int(s) for s in _FLAGS.stages.split(",")]
  contenders = [StageStep(stage, _FLAGS.set) for stage in stages]
  config = contenders[0].built.config
  print(f"{config.model.name} {config.data.image_size}px, batch {config.batch_size}, "
        f"grad_accum_steps {config.grad_accum_steps}, mesh {dict(contenders[0].built.mesh.shape)}; "
        f"{harness.machine()}")
  harness.warm_up(contenders)
  steps = harness.calibrate(contenders, _FLAGS.seconds, min_steps=2)
  rates = harness.alternate(contenders, steps, _FLAGS.rounds)
  print("\n| ZeRO stage | images/s (median) | vs stage 0 | step memory per device: arguments | "
        "outputs | temporaries | peak (MiB) |")
  print("| --- | --- | --- | --- | --- | --- | --- |")
  first = contenders[0].name
  for c in contenders:
    median, low, high = harness.ratio(rates, c.name, first)
    m = c.memory
    print(f"| {c.name.split()[-1]} | {sorted(rates[c.name])[len(rates[c.name]) // 2]:,.0f} | "
          f"{median:.2f} ({low:.2f}-{high:.2f}) | {m['arguments']:.2f} | {m['outputs']:.2f} | "
          f"{m['temporaries']:.2f} | {m['peak']:.2f} |")
  for c in contenders[1:]:
    print(f"ratio {c.name}/{first}: {harness.ratio(rates, c.name, first)[0]:.2f}")


if __name__ == "__main__":
  main()
