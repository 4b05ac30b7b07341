"""Progressive resizing: the schedule's segments, a stream that changes size at an epoch
boundary, one compiled step per size, and an exact resume across the switch."""

import shutil

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from jaxcls import build, sharding
from jaxcls.data import pipeline, resolution
from jaxcls.errors import ConfigError
from helpers import assert_same_as_reference, indices_of, small_data_config, tiny_config
from runner import REFERENCE_RUN, run_main
from test_data_pipeline import IndexSource

N, BATCH = 40, 8  # 5 batches an epoch


def test_segments_start_at_the_batches_that_start_the_epochs():
  config = small_data_config(resize_schedule=((0, 4), (1.5, 6), (3, 8)))
  assert resolution.segments(config, steps_per_epoch=10) == [(0, 4), (15, 6), (30, 8)]
  assert resolution.train_sizes(config) == [4, 6, 8]
  assert resolution.segment_at([(0, 4), (15, 6), (30, 8)], 14) == (4, 15)
  assert resolution.segment_at([(0, 4), (15, 6), (30, 8)], 15) == (6, 30)
  assert resolution.segment_at([(0, 4), (15, 6), (30, 8)], 99) == (8, None)
  # Before the first entry, and without a schedule: image_size (also the eval size).
  late = small_data_config(resize_schedule=((2, 4),))
  assert resolution.segments(late, 10) == [(0, 8), (20, 4)]
  assert resolution.train_sizes(late) == [4, 8]
  assert resolution.segments(small_data_config(), 10) == [(0, 8)]


@pytest.mark.parametrize("schedule, message", [
    (((1, 4), (1, 6)), "rising"),
    (((2, 4), (1, 6)), "rising"),
    (((-1, 4),), ">= 0"),
    (((0, 0),), "positive integer"),
    (((0, 4.5),), "positive integer"),
    (((0,),), "pairs"),
])
def test_a_bad_schedule_names_the_key(schedule, message):
  with pytest.raises(ConfigError, match=rf"config.data.resize_schedule=.*{message}"):
    pipeline.check_config(small_data_config(resize_schedule=schedule))


def test_the_stream_changes_size_at_the_boundary_and_resumes_inside_either_segment():
  config = small_data_config(resize_schedule=((0, 4), (1, 8)))  # 4 px in epoch 0, then 8
  mesh_sharding = NamedSharding(jax.make_mesh((8,), ("data",)), P("data"))

  def take(start, count):
    batches = pipeline.train_batches_on_devices(config, IndexSource(N), BATCH, seed=0,
                                                sharding=mesh_sharding, steps_per_epoch=5)
    batches.seek(start)
    try:
      return [np.asarray(next(batches)["image"]) for _ in range(count)]
    finally:
      batches.close()

  images = take(0, 8)
  assert [b.shape[1] for b in images] == [4] * 5 + [8] * 3
  # The same examples in the same order as a stream that never changes size.
  plain = pipeline.create_train_dataset(small_data_config(), IndexSource(N), BATCH, seed=0,
                                        process_index=0, process_count=1)
  expected = [indices_of(b["image"]).tolist() for b, _ in zip(plain, range(8))]
  assert [indices_of(b).tolist() for b in images] == expected
  for start in (3, 6):  # a resume before and after the switch
    resumed = take(start, 8 - start)
    assert [indices_of(b).tolist() for b in resumed] == expected[start:]
    assert [b.shape[1] for b in resumed] == [b.shape[1] for b in images[start:]]


def test_one_step_is_compiled_ahead_for_each_size():
  config = tiny_config()
  config.data.resize_schedule = ((0, 8), (1, 12))  # image_size (16) is only the eval's
  mesh = sharding.make_mesh(config.mesh)
  parts = build.training_parts(config, mesh, num_steps=4, steps_per_epoch=2)
  assert sorted(parts.train_steps) == [8, 12]
  assert all(isinstance(step, jax.stages.Compiled) for step in parts.train_steps.values())
  with pytest.raises(ValueError, match="sizes"):
    parts.train_step  # pylint: disable=pointless-statement


# REFERENCE_RUN's 24 steps (156 a epoch at batch 64): 24 px up to step 16, then 32 px.
SCHEDULE = (*REFERENCE_RUN, "--config.data.resize_schedule=((0, 24), (0.1, 32))",
            "--config.checkpoint.keep=10")


def test_a_resume_across_the_switch_is_bit_identical(tmp_path):
  reference = tmp_path / "reference"
  result = run_main(reference, *SCHEDULE)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Compiled train steps for 24, 32 px" in result.stdout
  resumed = tmp_path / "resumed"
  shutil.copytree(reference, resumed)
  for step in (16, 20, 24):  # back to step 12, before the switch at step 16
    shutil.rmtree(resumed / "checkpoints" / str(step))
  shutil.rmtree(resumed / "export")
  again = run_main(resumed, *SCHEDULE)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "checkpoints/12 (step 12)" in again.stdout
  assert_same_as_reference(resumed, reference)


def test_the_fast_imagenet_config_runs_its_schedule_end_to_end(tmp_path):
  """configs/imagenet_resnet50_fast.py, all 24 epochs, on a tiny model and 32 synthetic images
  (2 steps an epoch): 160 px, then 192 px from epoch 13, evaluated at 224 with flips."""
  result = run_main(tmp_path, "--config.data.source=synthetic", "--config.data.synthetic_size=32",
                    "--config.data.num_classes=10", "--config.model.name=resnet_tiny", "--config.model.stem=small",
                    "--config.model.width=8", "--config.batch_size=16",
                    "--config.eval_batch_size=32", "--config.log_every_steps=2",
                    config="configs/imagenet_resnet50_fast.py", devices=2)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Compiled train steps for 160, 192 px" in result.stdout
  assert "48 steps of 16" in result.stdout and "tta_accuracy" in result.stdout
