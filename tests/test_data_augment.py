"""The host augmentations: RandAugment and TrivialAugment operations, random erasing."""

import numpy as np
from PIL import Image
import pytest

from jaxcls.data import augment


def textured(size=32, seed=0) -> np.ndarray:
  """Smooth gradients plus noise: every op changes it at full magnitude."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[:size, :size]
  base = np.stack([x * 6, y * 6, (x + y) * 3], -1)
  return np.clip(base + rng.integers(0, 40, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", augment.OP_NAMES)
def test_each_op_keeps_shape_and_is_identity_at_magnitude_zero(name):
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
