"""Tests for jaxcls.models: registry, ResNets and the plain CNN."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import helpers
from jaxcls import build, checkpoint, optim
from jaxcls import config as config_lib
from jaxcls import models
from jaxcls.data import pipeline
from jaxcls.errors import ConfigError
from jaxcls.models import resnet, whitening
from runner import REPO


def model_config(**overrides):
  cfg = ml_collections.ConfigDict(dict(
      name='resnet_tiny', stem='small', width=8, dtype='float32',
      zero_init_residual=True, bn_momentum=0.9))
  cfg.update(overrides)
  return cfg


def init_shapes(model, image_size):
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(
      lambda x: model.init(jax.random.key(0), x, train=False), x)


def num_params(variables):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(variables['params']))


def leaves_with_names(tree):
  return [(path[-1].key, leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)]


def test_default_config_validates():
  config = config_lib.load_config(str(REPO / 'configs' / 'default.py'))
  models.check_config(config.model)


@pytest.mark.parametrize('name,expected', [
    ('resnet18', 11_689_512),
    ('resnet34', 21_797_672),
    ('resnet50', 25_557_032),
    ('resnet101', 44_549_160),
    ('resnet152', 60_192_808),
])
def test_param_count_matches_torchvision(name, expected):
  model = models.create_model(
      model_config(name=name, stem='imagenet', width=64), num_classes=1000)
  assert num_params(init_shapes(model, 224)) == expected


@pytest.mark.parametrize('name', sorted(models.MODELS))
def test_every_registered_model_builds(name):
  model = models.create_model(model_config(name=name, width=4), num_classes=10)
  variables = init_shapes(model, 32)
  assert set(variables) == {'params', 'batch_stats'}
  # The trainer decays every leaf except 'bias' and 'scale'.
  for leaf_name, leaf in leaves_with_names(variables['params']):
    assert leaf_name in ('kernel', 'bias', 'scale')
    assert (leaf.ndim >= 2) == (leaf_name == 'kernel')


@pytest.mark.parametrize('name', ['resnet_tiny', 'cnn'])
@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
def test_output_and_param_dtypes(name, dtype):
  model = models.create_model(model_config(name=name, dtype=dtype), 10)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  for leaf in jax.tree.leaves(variables):
    assert leaf.dtype == jnp.float32
  logits, mutated = model.apply(
      variables, x, train=True, mutable=['batch_stats', 'intermediates'],
      capture_intermediates=True)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32
  # Zero-initialised head: logits start at exactly 0 (loss = log(classes)).
  np.testing.assert_array_equal(logits, 0.0)
  # The convolutions really run in the compute dtype.
  conv_outs = [leaf for path, leaf in
               jax.tree_util.tree_leaves_with_path(mutated['intermediates'])
               if 'conv' in jax.tree_util.keystr(path)]
  assert conv_outs and all(a.dtype == jnp.dtype(dtype) for a in conv_outs)
  for leaf in jax.tree.leaves(mutated['batch_stats']):
    assert leaf.dtype == jnp.float32


@pytest.mark.parametrize('stem,image_size,stem_hw,final_hw', [
    ('small', 32, 32, 4),  # 3 downsamplings, all in stages 2-4.
    ('imagenet', 224, 112, 7),  # conv /2, max-pool /2, then stages 2-4.
])
def test_stem_resolution(stem, image_size, stem_hw, final_hw):
  model = models.create_model(
      model_config(name='resnet18', stem=stem, width=4), 10)
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)

  def run(x):
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, mutable=['intermediates'],
                           capture_intermediates=True)
    return state['intermediates']

  inter = jax.eval_shape(run, x)
  assert inter['stem_bn']['__call__'][0].shape == (1, stem_hw, stem_hw, 4)
  assert inter['stage1_block1']['__call__'][0].shape[1:3] == (
      stem_hw // (2 if stem == 'imagenet' else 1),) * 2
  assert inter['stage4_block2']['__call__'][0].shape == (
      1, final_hw, final_hw, 32)


def bn_scales(params):
  return {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)
          if path[-1].key == 'scale'}


@pytest.mark.parametrize('block_cls,last_bn', [
    (resnet.BasicBlock, 'bn2'), (resnet.BottleneckBlock, 'bn3')])
@pytest.mark.parametrize('zero_init', [True, False])
def test_zero_init_residual_scales(block_cls, last_bn, zero_init):
  model = resnet.ResNet(stage_sizes=(1, 1), block_cls=block_cls, width=4,
                        num_classes=10, stem='small',
                        zero_init_residual=zero_init)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                      train=False)['params']
  scales = bn_scales(params)
  last = [k for k in scales if f"['{last_bn}']" in k]
  assert len(last) == 2  # One per block.
  for key, scale in scales.items():
    expect_zero = zero_init and key in last
    np.testing.assert_array_equal(scale, 0.0 if expect_zero else 1.0)


@pytest.mark.parametrize('block_cls', [resnet.BasicBlock, resnet.BottleneckBlock])
@pytest.mark.parametrize('train', [False, True])
def test_zero_init_block_is_shortcut(block_cls, train):
  # Identity shortcut: the block is relu(x), i.e. x for x >= 0.
  x = jnp.abs(jax.random.normal(jax.random.key(1), (2, 8, 8, 16)))
  block = block_cls(features=16 // block_cls.expansion, zero_init_residual=True)
  variables = block.init(jax.random.key(0), x, train=False)
  assert 'proj_conv' not in variables['params']
  y, _ = block.apply(variables, x, train=train, mutable=['batch_stats'])
  np.testing.assert_allclose(y, x, atol=1e-6)

  # Projection shortcut: the block is relu(BN(conv1x1/2(x))).
  block = block_cls(features=8, strides=2, zero_init_residual=True)
  variables = block.init(jax.random.key(0), x, train=False)
  y = block.apply(variables, x, train=False)
  proj = jax.lax.conv_general_dilated(
      x, variables['params']['proj_conv']['kernel'], (2, 2), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  # Fresh running stats: mean 0, var 1.
  np.testing.assert_allclose(y, jax.nn.relu(proj / np.sqrt(1 + 1e-5)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['resnet_tiny', 'cnn'])
def test_batch_stats_update_only_in_train(name):
  model = models.create_model(model_config(name=name), 10)
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3.0 + 1.0
  variables = model.init(jax.random.key(0), x, train=False)
  old = variables['batch_stats']

  _, new = model.apply(variables, x, train=True, mutable=['batch_stats'])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         old, new['batch_stats'])
  assert all(jax.tree.leaves(changed))

  # Eval needs no mutable collection and leaves the stats alone.
  model.apply(variables, x, train=False)
  _, same = model.apply(variables, x, train=False, mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, old, same['batch_stats'])


def test_sharded_batch_norm_uses_global_batch():
  # No axis_name: under jit with the batch sharded over devices, BatchNorm
  # statistics must still be those of the whole batch.
  devices = jax.devices()
  assert len(devices) == 8, 'tests/conftest.py should fake 8 CPU devices'
  model = models.create_model(model_config(), 10)
  x = jax.random.normal(jax.random.key(1), (16, 32, 32, 3))
  variables = model.init(jax.random.key(0), x, train=False)

  def step(variables, x):
    return model.apply(variables, x, train=True, mutable=['batch_stats'])

  _, ref_state = jax.jit(step)(variables, x)
  mesh = Mesh(np.array(devices), ('data',))
  x_sharded = jax.device_put(x, NamedSharding(mesh, P('data')))
  _, state = jax.jit(step)(variables, x_sharded)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5,
                                                       atol=1e-6),
               state, ref_state)


@pytest.mark.parametrize('field,value', [
    ('name', 'resnet19'), ('dtype', 'float64'), ('stem', 'cifar'),
    ('width', 0), ('bn_momentum', 1.5)])
def test_bad_config_errors(field, value):
  cfg = model_config(**{field: value})
  with pytest.raises(ValueError, match=f'config.model.{field}') as err:
    models.check_config(cfg)
  assert repr(value) in str(err.value)
  with pytest.raises(ValueError, match=f'config.model.{field}'):
    models.create_model(cfg, 10)


def test_unknown_name_lists_known_models():
  with pytest.raises(ValueError) as err:
    models.check_config(model_config(name='vit'))
  for name in models.MODELS:
    assert repr(name) in str(err.value)


def test_auto_dtype_is_bfloat16_on_accelerators_and_float32_on_cpu():
  assert models.resolve_dtype('auto', 'gpu') == jnp.bfloat16
  assert models.resolve_dtype('auto', 'tpu') == jnp.bfloat16
  assert models.resolve_dtype('auto', 'cpu') == jnp.float32
  assert models.resolve_dtype('bfloat16', 'cpu') == jnp.bfloat16
  model = models.create_model(model_config(dtype='auto'), 10)  # the tests run on the CPU
  assert model.dtype == jnp.float32


# Patch whitening (models/whitening.py), the cnn's 'whiten' stem.


def _correlated_images(n=64, size=12, seed=0):
  """Images whose neighbouring pixels and channels are strongly correlated, like photos."""
  rng = np.random.default_rng(seed)
  smooth = rng.normal(size=(n, size + 1, size + 1, 1))
  smooth = (smooth[:, 1:, 1:] + smooth[:, :-1, :-1] + smooth[:, 1:, :-1]) / 3
  return (smooth * np.array([1.0, 0.8, 0.6]) + 0.3 * rng.normal(size=(n, size, size, 3)) + 2.0)


def test_whitening_filters_decorrelate_the_patches_they_were_computed_from():
  images = _correlated_images()
  filters = whitening.patch_whitening_filters(images, 2, epsilon=0.0)
  assert filters.shape == (2, 2, 3, 24)
  np.testing.assert_array_equal(filters[..., 12:], -filters[..., :12])
  y = np.asarray(jax.lax.conv_general_dilated(
      images.astype(np.float32), filters[..., :12], (1, 1), 'VALID',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))).reshape(-1, 12)
  # Unit variance, no correlation: the covariance of the responses is the identity.
  np.testing.assert_allclose(np.cov(y.T, bias=True), np.eye(12), atol=2e-3)
  # The input's own covariance was far from it.
  x = np.lib.stride_tricks.sliding_window_view(images, (2, 2), axis=(1, 2)).reshape(-1, 12)
  assert np.abs(np.corrcoef(x.T) - np.eye(12)).max() > 0.5


def test_whiten_stem_filters_get_no_gradient_and_no_weight_decay():
  model = models.create_model(model_config(name='cnn', stem='whiten', width=4), 10)
  x = jnp.asarray(_correlated_images(4, 32), jnp.float32)
  variables = model.init(jax.random.key(0), x, train=False)
  params = whitening.initialize(variables['params'], np.asarray(x))
  assert whitening.has_whitening(params)
  filters = params['stem_whitening'][whitening.PARAM]
  assert filters.shape == (2, 2, 3, 24) and np.abs(filters).max() > 0
  # 32px in, 31px after the 2x2 valid filters, then 15, 7 and 3 px in the stages.
  features = model.apply({**variables, 'params': params}, x, train=False,
                         capture_intermediates=True, mutable=['intermediates'])[1]
  assert features['intermediates']['stem_whitening']['__call__'][0].shape == (4, 31, 31, 24)

  def loss(params):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                            train=True, mutable=['batch_stats'])
    return jnp.sum(logits ** 2)
  params['head']['kernel'] = jnp.ones_like(params['head']['kernel'])  # a non-zero loss
  grads = jax.grad(loss)(params)
  np.testing.assert_array_equal(grads['stem_whitening'][whitening.PARAM], 0.0)
  assert np.abs(grads['stem_whitening']['bias']).max() > 0  # the bias learns
  mask = optim.decay_mask(params)
  assert mask['stem_whitening'] == {whitening.PARAM: False, 'bias': False}
  assert mask['stage1_layer1_conv']['kernel']


def test_a_whiten_run_computes_its_filters_from_the_training_split_and_keeps_them():
  config = helpers.tiny_config(data=1)
  config.model.name, config.model.stem, config.model.width = 'cnn', 'whiten', 4
  config.data.update(source='synthetic', synthetic_size=64, num_workers=0)
  config.optim.weight_decay = 0.1  # large, so a decayed filter would show
  batches = helpers.synthetic_batches(config, 3)
  _, params, _ = helpers.train_on_mesh(config, jax.devices()[:1], batches)
  train_source = build.create_sources(config)[0]
  images = pipeline.read_images(config.data, train_source, np.arange(len(train_source)))
  normalized = (images / 255.0 - np.asarray(config.data.mean)) / np.asarray(config.data.std)
  np.testing.assert_allclose(params['stem_whitening'][whitening.PARAM],
                             whitening.patch_whitening_filters(normalized, 2), rtol=1e-5,
                             atol=1e-6)


def test_whiten_is_a_stem_of_the_cnn_only():
  models.check_config(model_config(name='cnn', stem='whiten'))
  with pytest.raises(ConfigError, match="unknown stem 'whiten' for resnet_tiny.*stem=small"):
    models.check_config(model_config(name='resnet_tiny', stem='whiten'))


def identity_kernel(n):
  kernel = np.zeros((3, 3, n, n), np.float32)
  kernel[1, 1, np.arange(n), np.arange(n)] = 1
  return kernel


def test_identity_init_starts_the_cnn_convs_as_identities_on_their_first_channels():
  cfg = model_config(name='cnn', width=4, identity_init=True)
  variables = models.create_model(cfg, 10).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)),
                                                train=False)
  plain = models.create_model(model_config(name='cnn', width=4), 10).init(
      jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
  kernel = np.asarray(variables['params']['stage1_layer2_conv']['kernel'])  # 8 -> 8 channels
  x = np.random.default_rng(0).normal(size=(1, 5, 5, 8)).astype(np.float32)
  y = jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(y, x, rtol=1e-6)  # every filter passes its channel through
  widening = np.asarray(variables['params']['stage2_layer1_conv']['kernel'])  # 8 -> 16
  y = jax.lax.conv_general_dilated(x, widening, (1, 1), 'SAME',
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  np.testing.assert_allclose(y[..., :8], x, rtol=1e-6)
  # The other filters are drawn as without it (same key, same layer).
  np.testing.assert_array_equal(
      widening[..., 8:], plain['params']['stage2_layer1_conv']['kernel'][..., 8:])
  assert np.abs(widening[..., 8:]).max() > 0
  # A narrowing conv (the whitening stem's 24 channels into 16): its filters pass the first 16
  # channels through and start with drawn weights on the other 8, as without it.
  narrow, narrow_plain = (
      models.create_model(model_config(name='cnn', stem='whiten', width=8, identity_init=on),
                          10).init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
      ['params']['stage1_layer1_conv']['kernel'] for on in (True, False))
  assert narrow.shape == (3, 3, 24, 16)
  np.testing.assert_array_equal(narrow[:, :, :16], np.asarray(identity_kernel(16)))
  np.testing.assert_array_equal(narrow[:, :, 16:], narrow_plain[:, :, 16:])
  # The ResNets ignore it (as the cnn ignores zero_init_residual): the default config's
  # setting does not stop a switch to a ResNet.
  resnet = models.create_model(model_config(identity_init=True), 10)
  assert not hasattr(resnet, 'identity_init')


def conv3x3(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def test_conv_then_pool_is_airbench_layout_conv_pool_bn_relu_and_a_global_max():
  """Reference forward written out by hand: each stage's first conv at the incoming
  resolution, then 2x2 max-pool, BatchNorm, ReLU; a second conv-BN-ReLU; global max pool."""
  cfg = model_config(name='cnn', width=4, downsample='conv_then_pool')
  model = models.create_model(cfg, 10)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 16, 16, 3)).astype(np.float32)
  variables = jax.tree.map(np.asarray, model.init(jax.random.key(0), x, train=False))
  # Non-trivial BatchNorm statistics and head, so every part of the path shows.
  stats = {name: {'mean': rng.normal(0, 0.1, s['mean'].shape).astype(np.float32),
                  'var': rng.uniform(0.5, 1.5, s['var'].shape).astype(np.float32)}
           for name, s in variables['batch_stats'].items()}
  params = dict(variables['params'])
  params['head'] = {'kernel': rng.normal(size=params['head']['kernel'].shape).astype(np.float32),
                    'bias': params['head']['bias']}

  def bn_relu(y, name):
    s, p = stats[f'{name}_bn'], params[f'{name}_bn']
    return np.maximum((y - s['mean']) / np.sqrt(s['var'] + 1e-5) * p['scale'] + p['bias'], 0)

  def pool(y):
    n, h, w, c = y.shape
    return y[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))

  y = bn_relu(np.asarray(conv3x3(x, params['stem_conv']['kernel'])), 'stem')
  for i in range(1, 4):
    y = bn_relu(pool(np.asarray(conv3x3(y, params[f'stage{i}_layer1_conv']['kernel']))),
                f'stage{i}_layer1')
    y = bn_relu(np.asarray(conv3x3(y, params[f'stage{i}_layer2_conv']['kernel'])),
                f'stage{i}_layer2')
  want = y.max(axis=(1, 2)) @ params['head']['kernel'] + params['head']['bias']
  got = model.apply({'params': params, 'batch_stats': stats}, x, train=False)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.abs(want).max() > 0.1
  # The same arrays as the default layout (a checkpoint tells them apart by its config,
  # not its shapes), computing something else.
  pool_first = models.create_model(model_config(name='cnn', width=4), 10)
  assert (jax.tree.map(np.shape, init_shapes(pool_first, 16))
          == jax.tree.map(np.shape, variables))
  other = pool_first.apply({'params': params, 'batch_stats': stats}, x, train=False)
  assert np.abs(np.asarray(other) - want).max() > 1e-2


def test_downsample_is_checked_and_a_checkpoint_refuses_the_other_layout(tmp_path):
  with pytest.raises(ConfigError, match=r"config.model.downsample: unknown 'pool'; known: "
                     r"\['pool_then_conv', 'conv_then_pool'\]"):
    models.check_config(model_config(name='cnn', downsample='pool'))
  models.check_config(model_config(name='resnet_tiny', downsample='pool'))  # cnn only
  config = config_lib.base_config()
  config.model.name = 'cnn'
  saved = checkpoint.run_metadata(config)
  config.model.downsample = 'conv_then_pool'
  loader = checkpoint.Checkpointer(str(tmp_path), config.checkpoint, 1,
                                   checkpoint.run_metadata(config))
  try:
    with pytest.raises(checkpoint.CheckpointError, match=r"config.model.downsample: "
                       "checkpoint 'pool_then_conv', now 'conv_then_pool'"):
      # A checkpoint saved before the key existed had the pool-first layout.
      loader.check_compatible(1, {k: v for k, v in saved.items() if k != 'model.downsample'})
  finally:
    loader.close()
