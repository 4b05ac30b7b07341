"""The training loop: a run on an image folder with every augmentation and a bad file; a
non-finite loss stops it, naming the step, with the last good checkpoint kept."""

import json

import jax
import numpy as np

from jaxcls import config as config_lib
from jaxcls import reporter, train
from helpers import write_image
from runner import REFERENCE_RUN as RUN, completed_steps, run_main


def test_training_run_on_an_image_folder(tmp_path):
  root = tmp_path / "images"
  for i in range(40):
    write_image(root / ("ant" if i % 2 else "bee") / f"{i:02d}.png", i, size=(12, 10))
  (root / "bee" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  config = config_lib.base_config()
  config.data.update(dict(
      source="image_folder", path=str(root), eval_fraction=0.2, num_classes=2, image_size=8,
      eval_resize=8, train_augment="random_resized_crop_flip", auto_augment="randaugment",
      random_erasing=0.5, mixup_alpha=0.2, cutmix_alpha=1.0, skip_corrupt=True,
      max_corrupt_fraction=0.05, num_workers=0))
  config.model.update(dict(name="resnet_tiny", width=4))
  config.update(dict(batch_size=16, eval_batch_size=16, num_train_steps=2, log_every_steps=1))
  results = train.run(config, str(tmp_path / "run"))
  assert results["eval"]["num_examples"] == 8  # 4 held out of each class; the bad file in train
  skipped = json.loads((tmp_path / "run" / "skipped_examples.json").read_text())
  assert skipped["train"]["skipped"] == 1 and skipped["test"]["skipped"] == 0
  assert "broken.jpg" in skipped["train"]["examples"][0]


def test_non_finite_loss_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  result = run_main(tmp_path, *RUN, "--config.optim.learning_rate=1e30",
                    "--config.optim.warmup_epochs=0", "--config.checkpoint.every_steps=1")
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert "training stopped: Non-finite" in message
  bad_step = int(message.split(" at step ")[1].split()[0])
  assert completed_steps(tmp_path) and max(completed_steps(tmp_path)) == bad_step - 1


def test_steady_state_loop_does_no_implicit_host_transfer(tmp_path, monkeypatch):
  """The step loop (after init, up to the final save) under jax.transfer_guard("disallow"):
  batches reach the devices by explicit device_put (the prefetch thread), metrics come back
  by one explicit device_get per log step; an implicit transfer (a numpy array or Python
  number into a step, an index into a device array) raises. (XLA:CPU lets np.asarray of a
  device array through, zero-copy; the guard refuses it on GPU and TPU.)"""
  implicit_transfer_refused = []

  steps = train._steps  # the step loop, after resume or init, up to its last save

  def guarded_steps(*args, **kwargs):
    with jax.transfer_guard("disallow"):
      return steps(*args, **kwargs)

  class CheckedLog(reporter.TrainLog):
    def add(self, step, metrics):
      try:  # the guard is on in the loop: an implicit transfer is refused
        metrics["loss"] * np.ones(1, np.float32)
      except Exception as e:  # pylint: disable=broad-except
        implicit_transfer_refused.append("Disallowed host-to-device transfer" in str(e))
      super().add(step, metrics)

  monkeypatch.setattr(train, "_steps", guarded_steps)
  monkeypatch.setattr(train.reporter_lib, "TrainLog", CheckedLog)
  config = config_lib.base_config()
  config.model.update(dict(name="cnn", width=4))
  config.data.update(dict(source="synthetic", synthetic_size=256, image_size=8, eval_resize=8,
                          num_workers=0))
  config.update(dict(batch_size=32, eval_batch_size=64, num_train_steps=6, log_every_steps=2))
  config.checkpoint.every_steps = 3  # a save inside the loop too
  results = train.run(config, str(tmp_path / "run"))
  assert results["step"] == 6
  assert implicit_transfer_refused == [True] * 6
  logged = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").open())
            if r["split"] == "train"]
  assert logged == [2, 4, 6]
