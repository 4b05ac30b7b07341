"""The cores a process may use: its share of the host's, as the launcher tells it."""

import pytest

from jaxcls.data import cores


@pytest.mark.parametrize("environ, affinity, expected", [
    ({}, 64, 64),
    ({"LOCAL_WORLD_SIZE": "8"}, 64, 8),  # torchrun: 8 processes see all 64 cores
    ({"SLURM_NTASKS_PER_NODE": "4(x2)"}, 64, 16),
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 64, 32),
    ({"LOCAL_WORLD_SIZE": "8"}, 6, 6),  # already bound to 6 of 64 cores: that is the share
    ({"LOCAL_WORLD_SIZE": "128"}, 64, 1),
])
def test_available_cores_are_shared_by_the_processes_of_a_host(monkeypatch, environ, affinity,
                                                                 expected):
  monkeypatch.setattr(cores, "_affinity", lambda: affinity)
  monkeypatch.setattr(cores.os, "cpu_count", lambda: 64)
  assert cores.available_cores(environ) == expected
