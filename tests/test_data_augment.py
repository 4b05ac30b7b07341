"""Tests of the host augmentations (RandAugment, TrivialAugment, random erasing) and of
mixup / cutmix on the device."""

import grain
import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from jaxcls import config as config_lib
from jaxcls.data import augment
from jaxcls.data import mixing
from jaxcls.data import pipeline
from jaxcls.data import sources
from jaxcls.data import transforms


def data_config(**overrides):
  config = config_lib.base_config().data
  config.update(dict(num_workers=0))
  config.update(overrides)
  return config


def textured(size=32, seed=0) -> np.ndarray:
  """Smooth gradients plus noise: every op changes it at full magnitude."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:size, :size]
  base = np.stack([x * 6, y * 6, (x + y) * 3], -1)
  return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


# Host augmentations.


@pytest.mark.parametrize("name", augment.OP_NAMES)
def test_each_op_keeps_shape_and_is_identity_at_magnitude_zero(name):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = textured()
  rng = np.random.default_rng(0)
  for maximum in (augment._RANDAUGMENT_MAX, augment._TRIVIALAUGMENT_MAX):
    strong = np.asarray(augment.apply_op(Image.fromarray(image), name, 1.0, maximum, rng))
    assert strong.shape == image.shape and strong.dtype == np.uint8
    if name != "identity":
      assert not np.array_equal(strong, image), name
    if name not in ("auto_contrast", "equalize"):  # these take no magnitude
      zero = np.asarray(augment.apply_op(Image.fromarray(image), name, 0.0, maximum, rng))
      np.testing.assert_array_equal(zero, image)


def test_rand_augment_and_trivial_augment_are_seeded():
  image = textured()
  for fn in (lambda rng: augment.rand_augment(image, 2, 9, rng),
             lambda rng: augment.trivial_augment(image, rng)):
    outs = [fn(np.random.default_rng(seed)) for seed in range(6)]
    np.testing.assert_array_equal(outs[0], fn(np.random.default_rng(0)))
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert len({o.tobytes() for o in outs}) > 3
  np.testing.assert_array_equal(augment.rand_augment(image, 0, 9, np.random.default_rng(0)),
                                image)


def test_random_erasing_replaces_one_rectangle():
  image = np.zeros((40, 40, 3), np.uint8)
  assert augment.random_erasing(image, 0.0, np.random.default_rng(0)) is image
  areas = []
  for seed in range(20):
    out = augment.random_erasing(image, 1.0, np.random.default_rng(seed))
    rows, cols = np.nonzero(out.any(-1))
    if rows.size == 0:
      continue
    box = out[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert box.mean() > 60  # noise fills the whole box
    areas.append(box.shape[0] * box.shape[1] / 1600)
  assert len(areas) >= 18 and 0.015 <= min(areas) and max(areas) <= 0.36


def test_config_adds_the_policies_after_the_crop():
  config = data_config(auto_augment="trivialaugment", random_erasing=0.25)
  ts = transforms.train_transforms(config)
  assert [type(t).__name__ for t in ts] == ["Decode", "ResizeCenterCrop", "PadCropFlip",
                                            "AutoAugment", "RandomErasing"]
  source = sources.create_source(config, "test")

  def first(config, seed):
    ds = pipeline.create_train_dataset(config, source, 16, seed, process_index=0,
                                       process_count=1)
    return next(iter(ds))["image"]

  np.testing.assert_array_equal(first(config, 0), first(config, 0))
  assert not np.array_equal(first(config, 0), first(data_config(), 0))
  ra = data_config(auto_augment="randaugment", randaugment_num_ops=3, randaugment_magnitude=5)
  assert first(ra, 1).shape == (16, 32, 32, 3)


@pytest.mark.parametrize("key,value,message", [
    ("auto_augment", "autoaugment", "config.data.auto_augment='autoaugment' is not known"),
    ("randaugment_magnitude", 11.0, r"randaugment_magnitude=11\.0 must be in \[0\.0, 10\.0\]"),
    ("random_erasing", 1.5, r"random_erasing=1\.5 must be in"),
    ("mixup_alpha", -0.2, "mixup_alpha=-0.2 must not be negative"),
    ("eval_fraction", 1.0, r"eval_fraction=1\.0 must be in \[0\.0, 1\.0\)"),
    ("num_workers", -3, "num_workers=-3"),
])
def test_config_checks_data_values(key, value, message):
  config = config_lib.base_config()
  config.data[key] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.check_config(config, num_devices=8)


def test_num_workers_from_the_cores(monkeypatch):
  from jaxcls.data import cores  # pylint: disable=g-import-not-at-top
  for count, expected in [(2, 0), (4, 0), (16, 14), (96, 32)]:
    monkeypatch.setattr(cores, "available_cores", lambda count=count: count)
    assert pipeline.num_workers(data_config(num_workers=-1)) == expected
  assert pipeline.num_workers(data_config(num_workers=3)) == 3


@pytest.mark.parametrize("environ, affinity, expected", [
    ({}, 64, 64),
    ({"LOCAL_WORLD_SIZE": "8"}, 64, 8),  # torchrun: 8 processes see all 64 cores
    ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, 64, 16),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 64, 32),
    ({"LOCAL_WORLD_SIZE": "8"}, 6, 6),  # already bound to 6 of 64 cores: that is the share
    ({"LOCAL_WORLD_SIZE": "128"}, 64, 1),
])
def test_available_cores_are_shared_by_the_processes_of_a_host(monkeypatch, environ, affinity,
                                                                 expected):
  from jaxcls.data import cores  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(cores, "_affinity", lambda: affinity)
  monkeypatch.setattr(cores.os, "cpu_count", lambda: 64)
  assert cores.available_cores(environ) == expected


# Mixup and cutmix on the device.


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
