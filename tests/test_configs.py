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
