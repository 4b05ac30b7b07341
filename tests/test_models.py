"""Tests for jaxcls.models: registry, ResNets and the plain CNN."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxcls import config as config_lib
from jaxcls import models
from jaxcls.models import resnet
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
