"""How long a checkpoint save blocks the training loop, and how long the whole write takes.

The train state is built exactly as training builds it (config -> model -> optax -> sharded
state), then saved a few times through jaxcls.checkpoint.Checkpointer (async, as in training).
Blocking = the time `save` takes to return; the rest is written in the background. Then the
cost of a step's checksums: recording them (off the loop) and checking them at restore.

    python benchmarks/checkpoint_save.py                       # default config's model
    python benchmarks/checkpoint_save.py --model resnet50 --stem imagenet --num_classes 1000
"""

import argparse
import shutil
import tempfile
import time

import jax

from jaxcls import build, checkpoint, integrity, sharding
from jaxcls import config as config_lib


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="cnn")
  parser.add_argument("--width", type=int, default=16)
  parser.add_argument("--stem", default="small")
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()

  config = config_lib.base_config()
  config.model.name, config.model.width, config.model.stem = args.model, args.width, args.stem
  config.data.num_classes = args.num_classes
  mesh = sharding.make_mesh(config.mesh)
  _, tx = build.create_optimizer(config)
  state, _ = build.create_train_state(build.create_model(config), tx, config, mesh)
  state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))

  workdir = tempfile.mkdtemp()
  try:
    saver = checkpoint.Checkpointer(workdir, config.checkpoint, 1, checkpoint.run_metadata(config))
    print(f"{args.model} w{args.width}: train state {state_bytes / 2**20:.1f} MiB on "
          f"{jax.device_count()} device(s)")
    for step in range(1, args.repeats + 1):
      start = time.perf_counter()
      blocked = saver.save(step, state, next_batch=step)  # as the loop's
      saver.wait()
      total = time.perf_counter() - start
      print(f"save {step}: blocked the loop {blocked * 1000:.0f} ms; written in {total:.2f} s")
    saver.close()
    # The checksums (jaxcls.integrity): written in a thread after each save, read at restore.
    step_dir = saver.step_dir(args.repeats)
    start = time.perf_counter()
    integrity.write_checksums(step_dir)
    record = time.perf_counter() - start
    start = time.perf_counter()
    assert not integrity.verify(step_dir).damaged
    check = time.perf_counter() - start
    print(f"checksums of a step ({integrity.disk_bytes(step_dir) / 2**20:.1f} MiB on disk): "
          f"recorded in {record:.2f} s (a thread, off the loop), checked in {check:.2f} s at "
          f"restore; ratio check / whole write {check / total:.2f}")
  finally:
    shutil.rmtree(workdir)


if __name__ == "__main__":
  main()
