"""grain pipelines: train batches (seeded, each example once an epoch, a share per process,
resumable), exact eval batches (padded and masked), global batches on the devices, worker
processes, which end with a main process killed outright and leave signals to it; and two
real JAX processes reading what one process reads."""

import itertools
import json
import os
import signal
import subprocess
import sys

from absl import flags
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
from PIL import Image
import pytest

from jaxcls.data import pipeline
from jaxcls.data import sources
from helpers import data_config, encode, indices_of, small_data_config, write_image
from runner import REPO, children, completed_steps, free_port, is_worker, main_env, running
from runner import signal_group, start_main, still_running, wait_for_line


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


def first_batches(ds, count):
  return list(itertools.islice(iter(ds), count))


# Train pipeline.


def train_indices(n, batch, seed, steps, process_index=0, process_count=1):
  ds = pipeline.create_train_dataset(small_data_config(), IndexSource(n), batch, seed,
                                     process_index=process_index, process_count=process_count)
  return np.stack([indices_of(b["image"]) for b in first_batches(ds, steps)])


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
    pipeline.create_train_dataset(small_data_config(), IndexSource(40), 8, 0,
                                  process_index=0, process_count=3)
  with pytest.raises(ValueError, match=r"config\.batch_size=64 is larger"):
    pipeline.create_train_dataset(small_data_config(), IndexSource(40), 64, 0,
                                  process_index=0, process_count=1)


def test_train_iterator_state_resumes():
  ds = pipeline.create_train_dataset(small_data_config(), IndexSource(40), 8, 0,
                                     process_index=0, process_count=1)
  it = iter(ds)
  for _ in range(3):
    next(it)
  state = it.get_state()
  expected = [indices_of(next(it)["image"]) for _ in range(4)]
  it2 = iter(ds)
  it2.set_state(state)
  for e in expected:
    np.testing.assert_array_equal(indices_of(next(it2)["image"]), e)


# Eval pipeline.


@pytest.mark.parametrize("process_count", [1, 2])
@pytest.mark.parametrize("n", [37, 40, 3])
def test_eval_counts_each_example_once(n, process_count):
  batch = 8
  steps = pipeline.num_eval_steps(n, batch)
  seen, mask_total = [], 0
  for p in range(process_count):
    ds = pipeline.create_eval_dataset(small_data_config(), IndexSource(n), batch,
                                      process_index=p, process_count=process_count)
    batches = list(ds)
    assert len(batches) == steps
    for b in batches:
      assert b["image"].shape == (batch // process_count, 8, 8, 3)
      assert b["mask"].dtype == bool and b["label"].dtype == np.int32
      mask_total += b["mask"].sum()
      seen.extend(indices_of(b["image"])[b["mask"]])
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
  ds = pipeline.create_eval_dataset(small_data_config(), IndexSource(20), 16)
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
  ds = pipeline.create_train_dataset(small_data_config(), IndexSource(40), 8, 0)
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


# Worker processes.


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


def test_num_workers_from_the_cores_with_no_cap_and_logged(monkeypatch):
  from absl import logging  # pylint: disable=g-import-not-at-top
  from jaxcls.data import cores  # pylint: disable=g-import-not-at-top
  logged = []
  monkeypatch.setattr(logging, "info", lambda message, *args: logged.append(message % args))
  for count, expected in [(2, 0), (4, 0), (16, 14), (96, 94), (192, 190)]:
    monkeypatch.setattr(cores, "available_cores", lambda count=count: count)
    assert pipeline.num_workers(data_config(num_workers=-1)) == expected
  assert logged[-1] == ("config.data.num_workers=-1: 190 worker processes for the 192 cores "
                        "of this process.")
  assert pipeline.num_workers(data_config(num_workers=3)) == 3
  assert len(logged) == 5  # an explicit count is not logged


# Two real JAX processes on loopback read the same examples per epoch as one process, and
# agree on which corrupt files skip_corrupt leaves out.

GLOBAL_BATCH = 6
EPOCHS = 2

# Runs in each process: joins the run, then reports what its pipelines yield.
WORKER = """
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, count, index, root = sys.argv[1:]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=int(count), process_id=int(index))
sys.path.insert(0, {tests!r})
import test_data_pipeline as t
print("RESULT " + json.dumps(t.read_epochs(root)))
"""


def config_for(root: str):
  return small_data_config(source="image_folder", path=root, num_classes=2, skip_corrupt=True,
                           max_corrupt_fraction=0.5)


def read_epochs(root: str, process_index=None, process_count=None) -> dict:
  """This process's train examples per step for EPOCHS epochs, its eval examples, the skips."""
  config = config_for(root)
  layout = dict(process_index=process_index, process_count=process_count)
  source = sources.create_source(config, "train")
  steps = pipeline.steps_per_epoch(len(source), GLOBAL_BATCH)
  it = iter(pipeline.create_train_dataset(config, source, GLOBAL_BATCH, seed=3, **layout))
  train = [indices_of(next(it)["image"]).tolist() for _ in range(EPOCHS * steps)]
  evaluated = []
  for batch in pipeline.create_eval_dataset(config, source, GLOBAL_BATCH, **layout):
    evaluated += [i for i, m in zip(indices_of(batch["image"]).tolist(), batch["mask"]) if m]
  return {"train": train, "eval": evaluated, "skipped": list(source.skipped.values())}


def write_folder(root) -> None:
  for i in range(23):
    write_image(root / ("a" if i % 3 else "b") / f"{i:02d}.png", i)
  (root / "a" / "bad.png").write_bytes(b"")
  noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
  (root / "b" / "cut.png").write_bytes(encode(Image.fromarray(noise), "PNG")[:400])


def test_two_processes_read_what_one_process_reads(tmp_path):
  write_folder(tmp_path)
  single = read_epochs(str(tmp_path), 0, 1)
  assert len(single["skipped"]) == 2

  port = free_port()
  script = WORKER.replace("{tests!r}", repr(str(REPO / "tests")))
  procs = [subprocess.Popen([sys.executable, "-c", script, str(port), "2", str(i), str(tmp_path)],
                            cwd=REPO, env=main_env(1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    results.append(json.loads(out.split("RESULT ", 1)[1]))

  for r in results:  # each process found one bad file and learned of the other's
    assert r["skipped"] == single["skipped"]
  steps = len(single["train"])
  assert steps == EPOCHS * (23 // GLOBAL_BATCH)
  for step in range(steps):
    a, b = results[0]["train"][step], results[1]["train"][step]
    assert len(a) == len(b) == GLOBAL_BATCH // 2 and not set(a) & set(b)
    assert sorted(a + b) == sorted(single["train"][step])
  assert sorted(results[0]["eval"] + results[1]["eval"]) == list(range(23))


# A main run with two grain worker processes, long enough to be stopped mid-way.
WORKER_RUN = ("--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
              "--config.batch_size=64", "--config.num_train_steps=500",
              "--config.log_every_steps=1", "--config.checkpoint.every_steps=500",
              "--config.data.num_workers=2")
STEP_5 = "step   5/500"  # the progress line right-aligns the step to the total's width


def test_workers_end_with_a_main_process_killed_outright(tmp_path):
  proc = start_main(tmp_path, *WORKER_RUN)
  kids = []
  try:
    wait_for_line(proc, STEP_5)
    kids = children(proc.pid)
    assert sum(map(is_worker, kids)) >= 2, kids  # the workers (and a resource tracker)
    proc.kill()
    proc.wait(timeout=60)
    assert still_running(kids, 10) == []
  finally:
    proc.kill()
    for pid in filter(running, kids):
      os.kill(pid, signal.SIGKILL)


def test_ctrl_c_to_the_process_group_saves_with_workers_and_exits_0(tmp_path):
  # A Ctrl-C in a terminal (or SLURM's SIGTERM) reaches every process of the group, workers too.
  returncode, out, kids, _ = signal_group(tmp_path, *WORKER_RUN, after=STEP_5,
                                          sig=signal.SIGINT)
  assert returncode == 0, out[-3000:]
  assert "Stopped by SIGINT" in out
  assert "KeyboardInterrupt" not in out and "Traceback" not in out, out[-3000:]
  assert 5 <= completed_steps(tmp_path)[-1] < 500
  assert still_running(kids, 10) == []
