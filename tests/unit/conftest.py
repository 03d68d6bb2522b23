"""Fixtures shared by the unit tests of devices and transports (no KVM
needed: GuestMemory is plain anonymous memory)."""
import os

import pytest

from vmm.memory import GuestMemory, MiB

IMAGE_SIZE = 1 * MiB


@pytest.fixture
def mem():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


@pytest.fixture
def image(tmp_path):
    """A 1 MiB image of random bytes; returns its path."""
    path = tmp_path / "disk.img"
    path.write_bytes(os.urandom(IMAGE_SIZE))
    return str(path)


@pytest.fixture(params=[True, False], ids=["native", "python"])
def native(request):
    """Each device test runs on the C engine and on the pure-Python one."""
    return request.param
