"""Tests of jaxcls.data: sources, transforms, grain pipelines, global batches."""

import io
import itertools
import pickle

from absl import flags
import grain
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
from PIL import Image
import pytest

from jaxcls.config import base_config
from jaxcls.data import images
from jaxcls.data import pipeline
from jaxcls.data import sources
from jaxcls.data import transforms


def data_config(**overrides) -> ml_collections.ConfigDict:
  """The base config's data section, no worker processes unless asked."""
  config = base_config().data
  config.update(dict(num_workers=0, synthetic_size=64))
  config.update(overrides)
  return config


class IndexSource:
  """Decoded 8x8 images whose pixels spell the example's index, to trace it through batches."""

  name = "index source"
  class_names = [str(i) for i in range(10)]
  num_classes = 10

  def __init__(self, n: int):
    self._n = n

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    image = np.zeros((8, 8, 3), np.uint8)
    image[..., 0], image[..., 1] = i % 256, i // 256
    return {"image": image, "label": i % 10}


def indices_of(batch) -> np.ndarray:
  image = batch["image"]
  return image[:, 0, 0, 0].astype(int) + 256 * image[:, 0, 0, 1].astype(int)


INDEX_CONFIG = dict(image_size=8, eval_resize=8, train_augment="none")


def first_batches(ds, count):
  return list(itertools.islice(iter(ds), count))


# Sources.


@pytest.mark.parametrize("split,size", [("train", 10_000), ("test", 2_000)])
def test_bundled_source(split, size):
  source = sources.create_source(data_config(), split)
  assert len(source) == size
  assert source.num_classes == 10 and len(source.class_names) == 10
  assert source.class_names[0] == "airplane"
  labels = np.array([source[i]["label"] for i in range(len(source))])
  assert labels.min() >= 0 and labels.max() < 10
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [size // 10] * 10)
  image = images.decode_image(source[0]["image"])
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8


def test_bundled_source_pickles_without_its_arrays():
  source = sources.create_source(data_config(), "test")
  blob = pickle.dumps(source)
  assert len(blob) < 10_000  # the worker re-reads the file
  copy = pickle.loads(blob)
  np.testing.assert_array_equal(copy[5]["image"], source[5]["image"])


def test_synthetic_source_is_decoded_and_seeded():
  config = data_config(source="synthetic", synthetic_size=50, image_size=16, num_classes=5)
  source = sources.create_source(config, "train")
  assert len(source) == 50 and source.num_classes == 5
  item = source[7]
  assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.uint8
  assert item["label"] == 7 % 5
  np.testing.assert_array_equal(sources.create_source(config, "train")[7]["image"],
                                item["image"])
  assert not np.array_equal(sources.create_source(config, "test")[7]["image"], item["image"])
  batch = next(iter(pipeline.create_train_dataset(config, source, 10, seed=0,
                                                  process_index=0, process_count=1)))
  assert batch["image"].shape == (10, 16, 16, 3)


def test_unknown_source():
  with pytest.raises(ValueError, match=r"config\.data\.source='nope'.*bundled"):
    sources.create_source(data_config(source="nope"), "train")


def test_unknown_split():
  with pytest.raises(ValueError, match=r"'valid'.*config\.data\.train_split.*'test', 'train'"):
    sources.create_source(data_config(), "valid")


def test_num_classes_mismatch():
  with pytest.raises(ValueError, match=r"config\.data\.num_classes=100.*10 classes"):
    sources.create_source(data_config(num_classes=100), "test")


def write_bundle(path, labels, class_names):
  jpeg = io.BytesIO()
  Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
  blob = np.frombuffer(jpeg.getvalue(), np.uint8)
  np.savez(path, jpeg=np.tile(blob, len(labels)),
           offsets=np.arange(len(labels) + 1, dtype=np.int64) * len(blob),
           labels=np.asarray(labels, np.int32), class_names=np.asarray(class_names))


def test_npz_source_reads_a_directory(tmp_path):
  write_bundle(tmp_path / "train.npz", [0, 1, 1], ["a", "b"])
  source = sources.create_source(data_config(source="npz", path=str(tmp_path),
                                             num_classes=2), "train")
  assert len(source) == 3 and source.class_names == ["a", "b"]
  assert images.decode_image(source[2]["image"]).shape == (4, 4, 3)


def test_labels_out_of_range(tmp_path):
  write_bundle(tmp_path / "train.npz", [0, 2, 1], ["a", "b"])
  with pytest.raises(ValueError, match=r"train\.npz.*labels outside \[0, 2\)"):
    sources.create_source(data_config(source="npz", path=str(tmp_path), num_classes=2),
                          "train")


# Transforms.


def test_decode_converts_any_mode_to_rgb():
  for mode, fmt in [("L", "PNG"), ("RGBA", "PNG"), ("P", "PNG"), ("CMYK", "JPEG")]:
    buffer = io.BytesIO()
    Image.new(mode, (5, 3)).save(buffer, format=fmt)
    image = images.decode_image(np.frombuffer(buffer.getvalue(), np.uint8))
    assert image.shape == (3, 5, 3) and image.dtype == np.uint8, mode


def apply(transform_list, element, seed):
  for t in transform_list:
    if isinstance(t, grain.transforms.RandomMap):
      element = t.random_map(element, np.random.default_rng(seed))
    else:
      element = t.map(element)
  return element


@pytest.mark.parametrize("augment", transforms.TRAIN_AUGMENTS)
@pytest.mark.parametrize("input_shape", [(32, 32, 3), (45, 60, 3)])
def test_train_augment(augment, input_shape):
  config = data_config(train_augment=augment)
  ts = transforms.train_transforms(config)
  images = np.random.default_rng(0).integers(0, 256, (4, *input_shape), np.uint8)
  outputs = {}
  for seed in (1, 1, 2):
    out = [apply(ts, {"image": im, "label": 3}, seed) for im in images]
    for o in out:
      assert o["image"].shape == (32, 32, 3) and o["image"].dtype == np.uint8
      assert o["label"] == 3 and o["label"].dtype == np.int32
    outputs.setdefault(seed, []).append(np.stack([o["image"] for o in out]))
  np.testing.assert_array_equal(outputs[1][0], outputs[1][1])
  if augment != "none":
    assert not np.array_equal(outputs[1][0], outputs[2][0])


def test_pad_crop_flip_is_a_window_of_the_padded_image():
  image = np.random.default_rng(0).integers(1, 256, (32, 32, 3), np.uint8)
  padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
  windows = [w for y in range(9) for x in range(9)
             for w in (padded[y:y + 32, x:x + 32], padded[y:y + 32, x:x + 32][:, ::-1])]
  rng = np.random.default_rng(1)
  matched = set()
  for _ in range(30):
    out = transforms.pad_crop_flip(image, 32, 4, rng)
    hits = [i for i, w in enumerate(windows) if np.array_equal(out, w)]
    assert len(hits) == 1
    matched.add(hits[0])
  assert len(matched) > 20  # offsets and flips vary


def test_eval_resize_center_crop():
  config = data_config(eval_resize=36)
  ts = transforms.eval_transforms(config)
  image = np.full((40, 80, 3), 7, np.uint8)
  out = apply(ts, {"image": image, "label": 0}, 0)["image"]
  assert out.shape == (32, 32, 3) and (out == 7).all()


def test_unknown_augment():
  with pytest.raises(ValueError, match=r"config\.data\.train_augment='cutout'"):
    transforms.train_transforms(data_config(train_augment="cutout"))


# Train pipeline.


def train_indices(n, batch, seed, steps, process_index=0, process_count=1):
  ds = pipeline.create_train_dataset(data_config(**INDEX_CONFIG), IndexSource(n), batch, seed,
                                     process_index=process_index, process_count=process_count)
  return np.stack([indices_of(b) for b in first_batches(ds, steps)])


def test_train_batches_format_on_bundled_sample():
  config = data_config()
  source = sources.create_source(config, "train")
  batch = next(iter(pipeline.create_train_dataset(config, source, 16, seed=0,
                                                  process_index=0, process_count=1)))
  assert set(batch) == {"image", "label"}
  assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (16,) and batch["label"].dtype == np.int32


def test_train_same_seed_same_batches_other_seed_differs():
  config = data_config()
  source = sources.create_source(config, "test")
  make = lambda seed: first_batches(pipeline.create_train_dataset(
      config, source, 8, seed, process_index=0, process_count=1), 2)
  a, b, c = make(0), make(0), make(1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["image"], c[0]["image"])


def test_train_epochs_cover_each_example_once_and_reshuffle():
  n, batch = 40, 8
  steps = pipeline.steps_per_epoch(n, batch)
  order = train_indices(n, batch, seed=3, steps=3 * steps).reshape(3, -1)
  for epoch in order:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
  assert not np.array_equal(order[0], order[1])
  assert not np.array_equal(order[1], order[2])
  assert not np.array_equal(order[0], np.arange(n))


def test_train_drops_a_different_remainder_each_epoch():
  n, batch = 43, 8
  steps = pipeline.steps_per_epoch(n, batch)
  assert steps == 5
  order = train_indices(n, batch, seed=0, steps=2 * steps).reshape(2, -1)
  for epoch in order:
    assert len(set(epoch)) == 40 and epoch.max() < n
  assert set(order[0]) != set(order[1])


@pytest.mark.parametrize("n", [48, 53])
def test_train_two_processes_read_disjoint_shares(n):
  batch = 8  # global; 4 per process
  steps = pipeline.steps_per_epoch(n, batch)
  shares = [train_indices(n, batch, seed=5, steps=2 * steps, process_index=p,
                          process_count=2) for p in range(2)]
  assert shares[0].shape == shares[1].shape == (2 * steps, 4)
  for epoch in range(2):
    parts = [s[epoch * steps:(epoch + 1) * steps].ravel() for s in shares]
    assert not set(parts[0]) & set(parts[1])
    union = np.concatenate(parts)
    assert len(set(union)) == steps * batch
    if n % batch == 0:
      np.testing.assert_array_equal(np.sort(union), np.arange(n))
  # Together the processes replay the single-process stream, batch by batch.
  single = train_indices(n, batch, seed=5, steps=steps)
  for step in range(steps):
    np.testing.assert_array_equal(np.sort(np.concatenate([s[step] for s in shares])),
                                  np.sort(single[step]))


def test_train_batch_errors():
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    pipeline.create_train_dataset(data_config(**INDEX_CONFIG), IndexSource(40), 8, 0,
                                  process_index=0, process_count=3)
  with pytest.raises(ValueError, match=r"config\.batch_size=64 is larger"):
    pipeline.create_train_dataset(data_config(**INDEX_CONFIG), IndexSource(40), 64, 0,
                                  process_index=0, process_count=1)


def test_train_iterator_state_resumes():
  ds = pipeline.create_train_dataset(data_config(**INDEX_CONFIG), IndexSource(40), 8, 0,
                                     process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [indices_of(next(it)) for _ in range(4)]
  it2 = iter(ds)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(indices_of(next(it2)), e)


# Eval pipeline.


@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("n", [37, 40, 3])
def test_eval_counts_each_example_once(n, process_count):
  batch = 8
  steps = pipeline.num_eval_steps(n, batch)
  seen, mask_total = [], 0
  for p in range(process_count):
    ds = pipeline.create_eval_dataset(data_config(**INDEX_CONFIG), IndexSource(n), batch,
                                      process_index=p, process_count=process_count)
    batches = list(ds)
    assert len(batches) == steps
    for b in batches:
      assert b["image"].shape == (batch // process_count, 8, 8, 3)
      assert b["mask"].dtype == bool and b["label"].dtype == np.int32
      mask_total += b["mask"].sum()
      seen.extend(indices_of(b)[b["mask"]])
      assert (b["image"][~b["mask"]] == 0).all()
  assert mask_total == n
  np.testing.assert_array_equal(np.sort(seen), np.arange(n))


def test_eval_on_bundled_sample():
  config = data_config()
  source = sources.create_source(config, "test")
  batches = list(pipeline.create_eval_dataset(config, source, 300, process_index=0,
                                              process_count=1))
  assert len(batches) == pipeline.num_eval_steps(2000, 300) == 7
  assert sum(b["mask"].sum() for b in batches) == 2000
  labels = np.concatenate([b["label"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(np.bincount(labels), [200] * 10)


# Global batches.


def test_make_global_batch_on_8_devices():
  assert jax.device_count() == 8
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  ds = pipeline.create_eval_dataset(data_config(**INDEX_CONFIG), IndexSource(20), 16)
  local = next(iter(ds))
  batch = pipeline.make_global_batch(local, sharding)
  assert batch["image"].shape == (16, 8, 8, 3) and batch["label"].shape == (16,)
  for key in ("image", "label", "mask"):
    assert batch[key].sharding.is_equivalent_to(sharding, batch[key].ndim)
    np.testing.assert_array_equal(np.asarray(batch[key]), local[key])
  assert len(batch["image"].addressable_shards) == 8
  assert batch["image"].addressable_shards[0].data.shape == (2, 8, 8, 3)


def test_prefetch_to_device_keeps_order_and_state():
  mesh = jax.make_mesh((8,), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  ds = pipeline.create_train_dataset(data_config(**INDEX_CONFIG), IndexSource(40), 8, 0)
  host = first_batches(ds, 4)
  it = iter(pipeline.prefetch_to_device(ds, sharding, num_batches=2))
  device = [next(it) for _ in range(2)]
  state = it.get_state()
  device += [next(it) for _ in range(2)]
  for h, d in zip(host, device):
    assert isinstance(d["image"], jax.Array)
    np.testing.assert_array_equal(np.asarray(d["image"]), h["image"])
  it2 = iter(pipeline.prefetch_to_device(ds, sharding, num_batches=2))
  it2.set_state(state)
  np.testing.assert_array_equal(np.asarray(next(it2)["image"]), host[2]["image"])


def test_worker_processes_give_the_same_batches():
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
  config = data_config()
  source = sources.create_source(config, "test")
  make = lambda workers: pipeline.create_train_dataset(
      data_config(num_workers=workers), source, 16, seed=0, process_index=0, process_count=1)
  expected = first_batches(make(0), 3)
  it = iter(make(1))
  try:
    for e in expected:
      np.testing.assert_array_equal(next(it)["image"], e["image"])
  finally:
    it.close()
