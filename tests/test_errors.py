"""The checks each module's check_config is made of: the message names the key and what is
allowed."""

import pytest

from jaxcls import errors


def test_check_in_range_accepts_the_bounds_and_names_the_key_and_range():
  errors.check_in_range("data.random_erasing", 0.0, 0.0, 1.0)
  errors.check_in_range("data.random_erasing", 1.0, 0.0, 1.0)
  with pytest.raises(errors.ConfigError,
                     match=r"^config\.data\.random_erasing=1\.5 must be in \[0\.0, 1\.0\]\.$"):
    errors.check_in_range("data.random_erasing", 1.5, 0.0, 1.0)
  errors.check_in_range("data.eval_fraction", 0.99, 0.0, 1.0, high_inclusive=False)
  with pytest.raises(errors.ConfigError,
                     match=r"^config\.data\.eval_fraction=1\.0 must be in \[0\.0, 1\.0\)\.$"):
    errors.check_in_range("data.eval_fraction", 1.0, 0.0, 1.0, high_inclusive=False)


def test_check_choice_names_the_key_and_lists_the_choices():
  errors.check_choice("optim.schedule", "step", ("cosine", "constant", "step"))
  with pytest.raises(errors.ConfigError, match=r"^config\.optim\.schedule='linear' is not "
                     r"known; use one of cosine, constant, step\.$"):
    errors.check_choice("optim.schedule", "linear", ("cosine", "constant", "step"))

