"""Fixtures for the PCI unit tests (no KVM needed)."""
import os

import pytest

from vmm.memory import GuestMemory, MiB


@pytest.fixture
def mem():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


@pytest.fixture
def image(tmp_path):
    """A 1 MiB image of random bytes; returns its path."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(1 * MiB))
    return str(path)


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native(request):
    return request.param
