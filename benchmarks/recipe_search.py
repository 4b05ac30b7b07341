"""The quick loop that compared recipes for the default config (issue #16): one JSON line of
test accuracy, XLA's training GFLOPs and seconds per run.

    python benchmarks/recipe_search.py --epochs 7.5 --whiten 2 --widths 0,32,64,128 \
        --dirac 1 --pad 0 --tta 2

The bundled CIFAR-10 sample decoded once into memory, crops and flips on the device, a small
CNN whose shape, stem (patch whitening), init (dirac) and recipe are flags. It is not the
jaxcls path (no grain pipeline, checkpoints or exact metrics): the variants it picked were
then run with `python -m jaxcls.main` (benchmarks/README.md, "Training compute of the default
run"). Accuracy on the 2,000 test images moves about a point between seeds.
"""
import argparse, io, json, os, time, sys
import numpy as np
from PIL import Image
import jax, jax.numpy as jnp
import flax.linen as nn
import optax

p = argparse.ArgumentParser()
p.add_argument('--epochs', type=float, default=6)
p.add_argument('--batch', type=int, default=128)
p.add_argument('--lr', type=float, default=0.2)
p.add_argument('--wd', type=float, default=5e-4)
p.add_argument('--ls', type=float, default=0.1)
p.add_argument('--warmup', type=float, default=1.0)
p.add_argument('--sched', default='cosine')  # cosine | linear
p.add_argument('--widths', default='16,32,64,128')
p.add_argument('--depth', default='2,2,2')
p.add_argument('--whiten', type=int, default=0)  # 0 off; else patch size (2)
p.add_argument('--whiten_eps', type=float, default=5e-4)
p.add_argument('--act', default='relu')
p.add_argument('--altflip', type=int, default=0)
p.add_argument('--tta', type=int, default=0)  # 0 none, 1 flip, 2 flip+translate, 3 four shifts
p.add_argument('--pad', type=int, default=4)
p.add_argument('--seed', type=int, default=0)
p.add_argument('--bnmom', type=float, default=0.9)
p.add_argument('--scale_out', type=float, default=1.0)
p.add_argument('--order', default='poolfirst')  # poolfirst | convfirst
p.add_argument('--ema', type=float, default=0.0)
p.add_argument('--name', default='')
p.add_argument('--jsonl', default='', help='also append the line to this file')
p.add_argument('--dirac', type=int, default=0)
p.add_argument('--bias_lr', type=float, default=1.0, help='lr multiplier of BN scales/biases')
p.add_argument('--bn_scale', type=int, default=1, help='0: BN without a learned scale')
p.add_argument('--data_dir', default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                  '..', 'jaxcls', 'data', 'bundled'),
               help='holds cifar10_sample_{train,test}.npz (scripts/make_bundled_sample.py)')
args = p.parse_args()
BUNDLED = args.data_dir


def load(split):
  d = np.load(os.path.join(BUNDLED, f'cifar10_sample_{split}.npz'))
  off = d['offsets']; buf = d['jpeg']
  ims = np.stack([np.asarray(Image.open(io.BytesIO(buf[off[i]:off[i+1]].tobytes())).convert('RGB'))
                  for i in range(len(off) - 1)])
  return ims, d['labels'].astype(np.int32)

xtr, ytr = load('train'); xte, yte = load('test')
MEAN = jnp.array([0.4914, 0.4822, 0.4465]) * 255; STD = jnp.array([0.2470, 0.2435, 0.2616]) * 255
def norm(x): return (x.astype(jnp.float32) - MEAN) / STD

widths = [int(w) for w in args.widths.split(',')]
depth = [int(d) for d in args.depth.split(',')]
act = {'relu': nn.relu, 'gelu': nn.gelu}[args.act]

def whitening_kernel(x, k, eps):
  """PCA whitening filters of k x k patches: (k, k, 3, 2*3*k*k), +/- pairs (airbench)."""
  xn = np.asarray(norm(jnp.asarray(x[:5000])))
  n, h, w, c = xn.shape
  patches = np.lib.stride_tricks.sliding_window_view(xn, (k, k), axis=(1, 2))  # n,h',w',c,k,k
  patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * c).astype(np.float64)
  patches = patches - patches.mean(0)
  cov = patches.T @ patches / len(patches)
  evals, evecs = np.linalg.eigh(cov)
  filt = evecs.T / np.sqrt(evals[:, None] + eps)  # (d, d) rows are filters
  filt = filt.reshape(-1, k, k, c).transpose(1, 2, 3, 0)  # k,k,c,d
  return np.concatenate([filt, -filt], axis=-1).astype(np.float32)

class Net(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    def bn(x):
      return nn.BatchNorm(use_running_average=not train, momentum=args.bnmom, epsilon=1e-5,
                          use_scale=bool(args.bn_scale))(x)
    def conv(x, f):
      base = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
      def init(key, shape, dtype=jnp.float32):
        w = base(key, shape, dtype)
        if args.dirac:  # airbench: the first min(in, out) filters start as the identity
          n = min(shape[2], shape[3])
          w = w.at[:, :, :n, :n].set(0.0).at[1, 1, jnp.arange(n), jnp.arange(n)].set(1.0)
        return w
      return nn.Conv(f, (3, 3), padding=1, use_bias=False, kernel_init=init)(x)
    if args.whiten:
      k = args.whiten
      wk = self.param('whiten', lambda *_: jnp.zeros((k, k, 3, 6 * k * k)))
      x = jax.lax.conv_general_dilated(x, jax.lax.stop_gradient(wk), (1, 1), 'VALID',
                                       dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
      b = self.param('whiten_bias', nn.initializers.zeros, (6 * k * k,))
      x = act(x + b)
      if widths[0] > 0:
        x = act(bn(conv(x, widths[0])))
    else:
      x = act(bn(conv(x, widths[0])))
    for i, d in enumerate(depth):
      for j in range(d):
        if args.order == 'poolfirst':
          if j == 0: x = nn.max_pool(x, (2, 2), (2, 2))
          x = act(bn(conv(x, widths[i + 1])))
        else:
          x = conv(x, widths[i + 1])
          if j == 0: x = nn.max_pool(x, (2, 2), (2, 2))
          x = act(bn(x))
    x = jnp.max(x, axis=(1, 2)) if args.order == 'convfirst' else jnp.mean(x, axis=(1, 2))
    return nn.Dense(10, kernel_init=nn.initializers.zeros)(x) * args.scale_out

model = Net()
rng = jax.random.PRNGKey(args.seed)
variables = model.init(rng, jnp.zeros((1, 32, 32, 3)), train=False)
params, bstats = variables['params'], variables['batch_stats']
if args.whiten:
  params = dict(params); params['whiten'] = jnp.asarray(whitening_kernel(xtr, args.whiten, args.whiten_eps))

steps_per_epoch = len(xtr) // args.batch
total = int(round(args.epochs * steps_per_epoch))
warm = int(round(args.warmup * steps_per_epoch))
if args.sched == 'cosine':
  sched = optax.warmup_cosine_decay_schedule(0.0, args.lr, warm, max(total, warm + 1), 0.0)
else:
  sched = optax.join_schedules([optax.linear_schedule(0.0, args.lr, warm),
                                optax.linear_schedule(args.lr, 0.0, total - warm)], [warm])
mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == 'kernel', params)
tx = optax.chain(optax.add_decayed_weights(args.wd, mask), optax.sgd(sched, 0.9, nesterov=True))
opt = tx.init(params)

def augment(x, key, epoch, idx):
  n = x.shape[0]; P = args.pad
  k1, k2 = jax.random.split(key)
  xp = jnp.pad(x, ((0, 0), (P, P), (P, P), (0, 0)))
  off = jax.random.randint(k1, (n, 2), 0, 2 * P + 1)
  x = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (32, 32, 3)))(xp, off)
  if args.altflip:
    # Page/airbench: a random half flipped in epoch 0, then every image alternates.
    base = jax.random.bernoulli(jax.random.PRNGKey(args.seed + 7), 0.5, (len(xtr),))
    flip = jnp.logical_xor(base[idx], (epoch % 2) == 1)
  else:
    flip = jax.random.bernoulli(k2, 0.5, (n,))
  return jnp.where(flip[:, None, None, None], x[:, :, ::-1], x)

def loss_fn(params, bstats, x, y):
  logits, upd = model.apply({'params': params, 'batch_stats': bstats}, x, train=True,
                            mutable=['batch_stats'])
  lab = optax.smooth_labels(jax.nn.one_hot(y, 10), args.ls)
  return optax.softmax_cross_entropy(logits, lab).mean(), upd['batch_stats']

@jax.jit
def train_step(params, bstats, opt, ema, x, y, key, epoch, idx):
  x = norm(augment(x, key, epoch, idx))
  (loss, bstats), g = jax.value_and_grad(loss_fn, has_aux=True)(params, bstats, x, y)
  if args.whiten: g = dict(g); g['whiten'] = jnp.zeros_like(g['whiten'])
  upd, opt = tx.update(g, opt, params)
  if args.bias_lr != 1.0:
    upd = jax.tree.map(lambda u, m: u if m else u * args.bias_lr, upd, mask)
  params = optax.apply_updates(params, upd)
  if args.ema:
    ema = jax.tree.map(lambda e, p: args.ema * e + (1 - args.ema) * p, ema, (params, bstats))
  return params, bstats, opt, ema, loss

@jax.jit
def predict(params, bstats, x):
  x = norm(x)
  f = lambda im: jax.nn.softmax(model.apply({'params': params, 'batch_stats': bstats}, im, train=False))
  pr = f(x)
  if args.tta >= 1: pr = pr + f(x[:, :, ::-1])
  if args.tta >= 2:
    shifts = ((1, 1), (-1, -1)) if args.tta == 2 else ((1, 1), (-1, -1), (1, -1), (-1, 1))
    for dy, dx in shifts:
      xs = jnp.roll(x, (dy, dx), axis=(1, 2)); pr = pr + 0.5 * (f(xs) + f(xs[:, :, ::-1]))
  return pr

xtr_d = jnp.asarray(xtr); ytr_d = jnp.asarray(ytr)
ema = (params, bstats) if args.ema else None
t0 = time.time()
cost = train_step.lower(params, bstats, opt, ema, xtr_d[:args.batch], ytr_d[:args.batch], rng, 0,
                        jnp.arange(args.batch)).compile().cost_analysis()
if isinstance(cost, (list, tuple)): cost = cost[0]
step_gflop = cost['flops'] / 1e9
nprng = np.random.default_rng(args.seed)
step = 0; epoch = 0
while step < total:
  perm = nprng.permutation(len(xtr))
  for b in range(steps_per_epoch):
    if step >= total: break
    idx = perm[b * args.batch:(b + 1) * args.batch]
    params, bstats, opt, ema, loss = train_step(params, bstats, opt, ema, xtr_d[idx], ytr_d[idx],
                                                jax.random.fold_in(rng, step), epoch, jnp.asarray(idx))
    step += 1
  epoch += 1
if args.ema: params, bstats = ema
correct = 0
for b in range(0, len(xte), 500):
  pr = predict(params, bstats, jnp.asarray(xte[b:b + 500]))
  correct += int((np.asarray(pr).argmax(-1) == yte[b:b + 500]).sum())
acc = correct / len(xte)
ref = 8377.0  # GFLOP of the previous default run (training_compute.py)
train_gflop = step_gflop * total
line = dict(name=args.name, acc=acc, train_gflop=round(train_gflop), ratio=round(train_gflop / ref, 3),
            secs=round(time.time() - t0), loss=float(loss), argv=' '.join(sys.argv[1:]))
print(json.dumps(line))
if args.jsonl:
  with open(args.jsonl, 'a') as f: f.write(json.dumps(line) + '\n')
