import pytest

from vmm.memory import GuestMemory, MiB
from vmm.virtio.ioloop import IoLoop


@pytest.fixture
def gmem():
    g = GuestMemory(32 * MiB)
    yield g
    g.close()


@pytest.fixture
def loop():
    lp = IoLoop("test-io")
    lp.start()
    yield lp
    lp.close()
