"""Every shipped config loads and passes the checks that run before compilation; the checks
and load_config's errors name the key (or file) and the fix."""

import importlib.util

import pytest

from jaxcls import config as config_lib
from helpers import tiny_config, zero_config
from runner import REPO

CONFIGS = sorted((REPO / "configs").glob("*.py"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_checks(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  assert "Expected" in module.__doc__ and "python -m jaxcls.main" in module.__doc__
  config_lib.check_config(config, num_devices=8)


def test_load_config_applies_overrides_with_the_key_types():
  config = config_lib.load_config(str(CONFIGS[0].parent / "default.py"),
                                  {"num_epochs": 2, "model.width": 8, "data.source": "npz"})
  assert (config.num_epochs, config.model.width, config.data.source) == (2.0, 8, "npz")
  assert isinstance(config.num_epochs, float)


@pytest.mark.parametrize("path, overrides, message", [
    ("default.py", {"model.widht": 8}, "'model.widht' is not a known config key. Did you mean "
     "'model.width'?"),
    ("default.py", {"batch_size": "big"}, "batch_size='big'"),
    ("missing.py", {}, "does not exist"),
])
def test_load_config_errors_name_the_key_or_file(path, overrides, message):
  with pytest.raises(config_lib.ConfigError, match=message.replace("?", r"\?")):
    config_lib.load_config(str(CONFIGS[0].parent / path), overrides)


@pytest.mark.parametrize("mesh_data,mesh_fsdp,message", [
    (3, 1, "config.mesh"),
    (-1, -1, "only one axis may be -1"),
    (-1, 3, "do not divide"),
])
def test_bad_mesh_is_a_config_error(mesh_data, mesh_fsdp, message):
  config = tiny_config(data=mesh_data, fsdp=mesh_fsdp)
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.check_config(config, num_devices=8)


def test_batch_size_not_divisible_names_key_and_fix():
  config = tiny_config()
  config.batch_size = 20
  with pytest.raises(config_lib.ConfigError, match=r"config.batch_size=20 .* 8 data-parallel.*"
                     r"--config.batch_size=16"):
    config_lib.check_config(config, num_devices=8)


def test_unknown_model_names_key_and_choices():
  config = tiny_config()
  config.model.name = "resnet19"
  with pytest.raises(config_lib.ConfigError, match=r"config.model.name.*resnet19.*resnet18"):
    config_lib.check_config(config, num_devices=8)


def test_unknown_key_in_a_config_file_suggests_the_known_one():
  config = tiny_config()
  config.optim.unlock()
  config.optim.learing_rate = 0.3
  with pytest.raises(config_lib.ConfigError, match=r"config.optim.learing_rate.*"
                     r"config.optim.learning_rate"):
    config_lib.check_config(config, num_devices=8)


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


@pytest.mark.parametrize("key,value,message", [
    ("mesh.zero_stage", 4, r"config.mesh.zero_stage=4"),
    ("mesh.rules", (("kernel", ("tensor",)),), r"names axis 'tensor'"),
    ("mesh.rules", (("(", ()),), r"bad regex"),
    ("grad_accum_steps", 3, r"does not split into 3 micro-batches.*--config.batch_size=48"),
    ("grad_accum_steps", 0, r"positive integer"),
    ("distributed.cluster_detection", "slurm", r"cluster_detection='slurm'"),
])
def test_parallel_config_errors_name_the_key(key, value, message):
  config = zero_config()
  config.batch_size = 64
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.check_config(config, num_devices=8)


def test_model_axis_must_stay_within_a_process():
  config = zero_config(model=8)
  config_lib.check_config(config, num_devices=8, process_count=1)
  with pytest.raises(config_lib.ConfigError, match=r"config.mesh.model=8 .* 4 devices"):
    config_lib.check_config(config, num_devices=8, process_count=2)


@pytest.mark.parametrize("key,value,message", [
    ("optim.learning_rate", -0.1, r"config.optim.learning_rate=-0.1 must be a finite number >= 0"),
    ("optim.warmup_epochs", -1.0, r"config.optim.warmup_epochs=-1.0 must be"),
    ("optim.momentum", 1.0, r"config.optim.momentum=1.0 must be in \[0.0, 1.0\)"),
    ("data.eval_resize", 0, r"config.data.eval_resize=0 must be at least config.data.image_size"),
    ("data.image_size", 0, r"config.data.image_size=0 must be an integer >= 1"),
    ("data.crop_padding", -2, r"config.data.crop_padding=-2 must be an integer >= 0"),
    ("eval_top_k", (0, 5), r"config.eval_top_k=\(0, 5\): each k must be a positive integer"),
    ("checkpoint.every_epochs", 0.0, r"config.checkpoint.every_epochs=0.0 must be a finite "
                                     r"number > 0"),
    ("num_train_steps", 0, r"config.num_train_steps=0 must be an integer >= 1"),
    ("num_epochs", float("nan"), r"config.num_epochs=nan must be a finite number"),
    ("num_epochs", float("inf"), r"config.num_epochs=inf must be a finite number"),
    ("log_every_steps", 0, r"config.log_every_steps=0 must be an integer >= 1"),
    ("seed", -1, r"config.seed=-1 must be an integer >= 0"),
    ("lock_lease_seconds", 0.0, r"config.lock_lease_seconds=0.0 must be a finite number > 0"),
])
def test_values_that_would_train_wrongly_are_named_errors(key, value, message):
  """Each of these used to train (or crash later with a traceback) instead of failing."""
  config = config_lib.base_config()
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.check_config(config, num_devices=8)


def test_checkpoint_every_epochs_0_is_fine_when_every_steps_decides():
  config = config_lib.base_config()
  config.checkpoint.every_epochs, config.checkpoint.every_steps = 0.0, 100
  config_lib.check_config(config, num_devices=8)
