"""A run's compute in FLOPs, counted by XLA, not timed: comparable across machines.

    python benchmarks/training_compute.py configs/default.py
    python benchmarks/training_compute.py configs/default.py --set num_epochs=6 --set batch_size=256

For each config: XLA's cost analysis of the compiled train step (one per image size of
config.data.resize_schedule) and eval step (one device, the whole global batch), times the
steps the config trains at each size and the eval batches of every
evaluation it makes (the periodic ones and the final one). With --set, the first line is the
config as given and the second with the overrides, and the ratio of the two is printed.
"""

import argparse
import json
import math

import jax

import harness
from jaxcls import build, sharding
from jaxcls.data import pipeline, resolution


def step_flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # one entry per program on older jax versions
    analysis = analysis[0]
  return float(analysis["flops"])


def run_compute(config) -> dict:
  """Train and eval GFLOPs of the run `config` describes, on the source it names."""
  config.mesh.data, config.mesh.fsdp, config.mesh.model = 1, 1, 1
  mesh = sharding.make_mesh(config.mesh)
  train_source, eval_source = build.create_sources(config)
  steps_per_epoch = pipeline.steps_per_epoch(len(train_source), config.batch_size)
  num_steps = build.total_train_steps(config, steps_per_epoch)
  parts = build.training_parts(config, mesh, num_steps, steps_per_epoch)
  eval_every = int(round(config.eval_every_epochs * steps_per_epoch))
  periodic_evals = len([s for s in range(eval_every, num_steps, eval_every)]) if eval_every else 0
  eval_batches = math.ceil(len(eval_source) / config.eval_batch_size)
  # Each resolution segment (config.data.resize_schedule) at its own step's cost.
  segments = resolution.segments(config.data, steps_per_epoch)
  ends = [start for start, _ in segments[1:]] + [num_steps]
  train = sum(step_flops(parts.train_steps[size]) * max(0, min(end, num_steps) - start)
              for (start, size), end in zip(segments, ends))
  passes = 2 if config.ema.decay > 0 else 1  # with EMA every evaluation also scores the average
  evaluate = step_flops(parts.eval_step) * eval_batches * (periodic_evals + 1) * passes
  return {"steps": num_steps, "train_gflops": train / 1e9, "eval_gflops": evaluate / 1e9,
          "total_gflops": (train + evaluate) / 1e9, "evals": periodic_evals + 1,
          "step_gflops": train / num_steps / 1e9}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("config", help="a config file, e.g. configs/default.py")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="an override of the second config (repeat)")
  parser.add_argument("--json", help="also write the rows here")
  args = parser.parse_args()
  rows = [("as given", run_compute(harness.load_config(args.config)))]
  if args.set:
    rows.append((" ".join(args.set), run_compute(harness.load_config(args.config, args.set))))
  print(f"{jax.devices()[0].platform}; XLA cost analysis, one device")
  for name, r in rows:
    print(f"{name}: {r['steps']} steps x {r['step_gflops']:.2f} GFLOP (mean) + {r['evals']} evals = "
          f"{r['total_gflops']:,.0f} GFLOP (train {r['train_gflops']:,.0f}, "
          f"eval {r['eval_gflops']:,.0f})")
  if len(rows) == 2:
    print(f"ratio overrides/as given: {rows[1][1]['total_gflops'] / rows[0][1]['total_gflops']:.3f}")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump({name: r for name, r in rows}, f, indent=1)


if __name__ == "__main__":
  main()
