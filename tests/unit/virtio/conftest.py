"""Fixtures for the virtio unit tests: no KVM needed (GuestMemory is plain
anonymous memory)."""
import os

import pytest

from vmm.memory import GuestMemory, MiB
from virtio_rig import IMAGE_SIZE, Rig


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
    return request.param


@pytest.fixture
def rig(mem, image, native):
    made = []

    def make(**kw):
        r = Rig(mem, image, native, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()
