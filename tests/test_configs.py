"""Every shipped config loads and passes the checks that run before compilation."""

import importlib.util
import pathlib

import pytest

from jaxcls import config as config_lib

CONFIGS = sorted((pathlib.Path(__file__).resolve().parents[1] / "configs").glob("*.py"))


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
