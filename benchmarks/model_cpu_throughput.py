"""Training throughput of the model zoo alone (no data pipeline, no trainer).

One jitted step = forward + backward + SGD(momentum) update + BatchNorm stats,
on random 32x32 float32 images. A reference for trainer-level benchmarks.

Run (plain python, real devices only):
  python benchmarks/model_cpu_throughput.py
  python benchmarks/model_cpu_throughput.py --models cnn:32,resnet18:16
"""

import argparse
import time

import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxcls import models

DEFAULT_MODELS = ('cnn:16,cnn:32,cnn:64,resnet_tiny:8,resnet_tiny:16,'
                  'resnet18:16,resnet18:32,resnet18:64')


def make_step(model, tx):
  def step(params, batch_stats, opt_state, images, labels):
    def loss_fn(params):
      logits, state = model.apply(
          {'params': params, 'batch_stats': batch_stats}, images, train=True,
          mutable=['batch_stats'])
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      return loss.mean(), state['batch_stats']

    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), batch_stats, opt_state, loss

  # Donation lets XLA update params and optimizer state in place.
  return jax.jit(step, donate_argnums=(0, 1, 2))


def bench(name, width, args):
  cfg = ml_collections.ConfigDict(dict(
      name=name, stem='small', width=width, dtype=args.dtype,
      zero_init_residual=True, bn_momentum=0.9))
  model = models.create_model(cfg, args.num_classes)
  rng = jax.random.key(0)
  images = jax.random.normal(rng, (args.batch_size, 32, 32, 3), jnp.float32)
  labels = jax.random.randint(rng, (args.batch_size,), 0, args.num_classes)
  variables = jax.jit(lambda x: model.init(rng, x, train=False))(images[:1])
  params, batch_stats = variables['params'], variables['batch_stats']
  tx = optax.sgd(0.1, momentum=0.9, nesterov=True)
  opt_state = tx.init(params)
  num_params = sum(p.size for p in jax.tree.leaves(params))

  t0 = time.perf_counter()
  compiled = make_step(model, tx).lower(
      params, batch_stats, opt_state, images, labels).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflop_per_img = (cost or {}).get('flops', float('nan')) / args.batch_size / 1e9

  state = (params, batch_stats, opt_state)
  *state, loss = compiled(*state, images, labels)  # Warm-up.
  loss.block_until_ready()
  steps, t0 = 0, time.perf_counter()
  while steps < args.min_steps or time.perf_counter() - t0 < args.min_time:
    *state, loss = compiled(*state, images, labels)
    loss.block_until_ready()
    steps += 1
  step_s = (time.perf_counter() - t0) / steps
  return dict(model=f'{name} w{width}', params=num_params, compile_s=compile_s,
              step_s=step_s, img_s=args.batch_size / step_s,
              gflop=gflop_per_img)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', default=DEFAULT_MODELS,
                      help='comma-separated name:width pairs')
  parser.add_argument('--batch_size', type=int, default=256)
  parser.add_argument('--num_classes', type=int, default=10)
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--min_steps', type=int, default=3)
  parser.add_argument('--min_time', type=float, default=10.0,
                      help='seconds of timed steps per model, at least')
  args = parser.parse_args()

  print(f'jax {jax.__version__}, devices: {jax.devices()}, '
        f'batch {args.batch_size}, 32x32, {args.dtype}, small stem')
  header = (f'{"model":<16}{"params":>11}{"compile s":>11}{"step s":>9}'
            f'{"images/s":>10}{"GFLOP/img":>11}')
  print(header)
  for spec in args.models.split(','):
    name, width = spec.split(':')
    r = bench(name, int(width), args)
    print(f'{r["model"]:<16}{r["params"]:>11,}{r["compile_s"]:>11.1f}'
          f'{r["step_s"]:>9.3f}{r["img_s"]:>10.0f}{r["gflop"]:>11.3f}',
          flush=True)


if __name__ == '__main__':
  main()
