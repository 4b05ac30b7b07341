"""Two real JAX processes on loopback read the same examples per epoch as one process, and
agree on which corrupt files skip_corrupt leaves out."""

import io
import json
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
from PIL import Image

from jaxcls.config import base_config
from jaxcls.data import pipeline
from jaxcls.data import sources

REPO = pathlib.Path(__file__).resolve().parents[1]
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
import test_data_processes as t
print("RESULT " + json.dumps(t.read_epochs(root)))
"""


def config_for(root: str):
  config = base_config().data
  config.update(dict(source="image_folder", path=root, num_classes=2, image_size=8,
                     eval_resize=8, train_augment="none", num_workers=0, skip_corrupt=True,
                     max_corrupt_fraction=0.5))
  return config


def index_of(images: np.ndarray) -> list[int]:
  return (images[:, 0, 0, 0].astype(int) + 256 * images[:, 0, 0, 1].astype(int)).tolist()


def read_epochs(root: str, process_index=None, process_count=None) -> dict:
  """This process's train examples per step for EPOCHS epochs, its eval examples, the skips."""
  config = config_for(root)
  layout = dict(process_index=process_index, process_count=process_count)
  source = sources.create_source(config, "train")
  steps = pipeline.steps_per_epoch(len(source), GLOBAL_BATCH)
  it = iter(pipeline.create_train_dataset(config, source, GLOBAL_BATCH, seed=3, **layout))
  train = [index_of(next(it)["image"]) for _ in range(EPOCHS * steps)]
  evaluated = []
  for batch in pipeline.create_eval_dataset(config, source, GLOBAL_BATCH, **layout):
    evaluated += [i for i, m in zip(index_of(batch["image"]), batch["mask"]) if m]
  return {"train": train, "eval": evaluated, "skipped": list(source.skipped.values())}


def write_folder(root: pathlib.Path) -> None:
  for i in range(23):
    path = root / ("a" if i % 3 else "b") / f"{i:02d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (i, 0, 0)).save(path)
  (root / "a" / "bad.png").write_bytes(b"")
  buffer = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), np.uint8)
  Image.fromarray(noise).save(buffer, format="PNG")
  (root / "b" / "cut.png").write_bytes(buffer.getvalue()[:400])


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_read_what_one_process_reads(tmp_path):
  write_folder(tmp_path)
  single = read_epochs(str(tmp_path), 0, 1)
  assert len(single["skipped"]) == 2

  port = free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
  script = WORKER.replace("{tests!r}", repr(str(REPO / "tests")))
  procs = [subprocess.Popen([sys.executable, "-c", script, str(port), "2", str(i), str(tmp_path)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
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
