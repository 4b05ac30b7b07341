"""Test setup: 8 fake CPU devices, set before anything imports JAX; and the fixtures that tests
in several files use. The trained runs are session-scoped: each trains once per session, and
a test that changes one works on its own copy (runner.copy_run)."""

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One compilation cache for the whole session, new each session: every test, command and
# notebook kernel started from here (they inherit the environment) loads a program another
# one compiled before, and nothing is read from or written to the user's own cache. The
# config's default cache directory follows XDG_CACHE_HOME; JAX's own default follows
# JAX_COMPILATION_CACHE_DIR (for steps compiled without jaxcls.build).
_SESSION_CACHE = tempfile.mkdtemp(prefix="jaxcls_test_cache_")
os.environ["XDG_CACHE_HOME"] = _SESSION_CACHE
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(_SESSION_CACHE, "jaxcls", "xla")
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.3"

# pylint: disable=g-import-not-at-top,wrong-import-position  (JAX reads the flags on import)
import pytest

import helpers
from runner import REFERENCE_RUN, run_main


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
  """The uninterrupted run every fault test must reproduce bit for bit (checkpoint and
  preemption tests)."""
  workdir = tmp_path_factory.mktemp("reference")
  result = run_main(workdir, *REFERENCE_RUN)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory):
  """A finished 6-step run with periodic evals, its report and checkpoints (for evaluate,
  predict, report and the eval / plot files)."""
  workdir = tmp_path_factory.mktemp("run")
  result = run_main(workdir, "--config.model.name=resnet_tiny", "--config.model.stem=small", "--config.model.width=8",
                    "--config.num_train_steps=6", "--config.log_every_steps=2",
                    "--config.batch_size=64", "--config.eval_every_epochs=0.02")
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


@pytest.fixture
def folder(tmp_path):
  """An image folder of 3 classes in every format (helpers.LAYOUT), plus files to ignore."""
  return helpers.write_layout(tmp_path / "train")


@pytest.fixture
def damaged(tmp_path):
  """An image folder of 12 good images and the bad files of helpers.BAD_FILES."""
  return helpers.write_damaged(tmp_path / "damaged")


def pytest_collection_modifyitems(items):
  """With pytest-xdist (`-n 2 --dist loadgroup`, as pyproject.toml sets), the tests of one
  session-scoped run go to one worker, so that run trains once, not once per worker."""
  for item in items:
    for fixture in ("reference", "trained_workdir"):
      if fixture in getattr(item, "fixturenames", ()):
        item.add_marker(pytest.mark.xdist_group(fixture))
