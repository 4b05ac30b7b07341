"""mixup and cutmix on the device: one draw per batch, targets weighted alike, the same on a
sharded batch as on one device."""

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np

from jaxcls.data import mixing
from helpers import data_config


def batch(n=8, size=6, classes=4, seed=0):
  rng = np.random.default_rng(seed)
  images = jnp.asarray(rng.normal(size=(n, size, size, 3)), jnp.float32)
  labels = jnp.arange(n) % classes
  return images, jax.nn.one_hot(labels, classes)


def test_mixing_off_is_the_identity():
  images, targets = batch()
  config = data_config()
  assert not mixing.enabled(config)
  out = mixing.mix_batch(jax.random.key(0), images, targets, config)
  assert out[0] is images and out[1] is targets


def test_mixup_blends_neighbours_with_one_lambda():
  images, targets = batch()
  config = data_config(mixup_alpha=0.4)
  mixed, mixed_targets = jax.jit(lambda r, x, y: mixing.mix_batch(r, x, y, config))(
      jax.random.key(3), images, targets)
  lam = float(mixed_targets[0, 0])  # example 0 has label 0; its neighbour (7) label 3
  assert 0 < lam < 1
  np.testing.assert_allclose(mixed, lam * images + (1 - lam) * jnp.roll(images, 1, 0),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * jnp.roll(targets, 1, 0),
                             rtol=1e-6)


def test_cutmix_pastes_a_box_and_weighs_targets_by_its_area():
  images, targets = batch(size=16)
  config = data_config(cutmix_alpha=1.0)
  for seed in range(5):
    mixed, mixed_targets = mixing.mix_batch(jax.random.key(seed), images, targets, config)
    from_other = np.asarray(mixed == jnp.roll(images, 1, 0)).all(-1)  # [B, H, W]
    from_self = np.asarray(mixed == images).all(-1)
    assert (from_other | from_self).all()
    box = from_other[0]
    assert (box == from_other).all()  # one box for the whole batch
    if box.any():
      rows, cols = np.nonzero(box)
      assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # a rectangle
    lam = 1 - box.mean()
    np.testing.assert_allclose(mixed_targets, lam * targets + (1 - lam) * jnp.roll(targets, 1, 0),
                               rtol=1e-5)


def test_both_on_picks_one_per_batch_and_mix_prob_zero_never_mixes():
  images, targets = batch(size=16)
  config = data_config(mixup_alpha=0.5, cutmix_alpha=1.0)
  mix = jax.jit(lambda r: mixing.mix_batch(r, images, targets, config)[0])
  kinds = []
  for seed in range(40):
    mixed = np.asarray(mix(jax.random.key(seed)))
    exact = (mixed == np.asarray(images)).all(-1) | (mixed == np.roll(images, 1, 0)).all(-1)
    kinds.append("cutmix" if exact.all() else "mixup")
  assert 8 <= kinds.count("cutmix") <= 32
  off = data_config(mixup_alpha=0.5, cutmix_alpha=1.0, mix_prob=0.0)
  for seed in range(3):
    out, out_targets = mixing.mix_batch(jax.random.key(seed), images, targets, off)
    np.testing.assert_array_equal(out, images)
    np.testing.assert_array_equal(out_targets, targets)


def test_mixing_on_a_sharded_batch_matches_one_device():
  images, targets = batch(n=16, size=8)
  config = data_config(mixup_alpha=0.2, cutmix_alpha=1.0)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))  # as sharding.make_mesh
  sharding = NamedSharding(mesh, P("data"))
  fn = jax.jit(lambda r, x, y: mixing.mix_batch(r, x, y, config))
  for seed in range(4):
    rng = jax.random.key(seed)
    expected = fn(rng, images, targets)
    got = fn(rng, jax.device_put(images, sharding), jax.device_put(targets, sharding))
    for e, g in zip(expected, got):
      np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-6)
