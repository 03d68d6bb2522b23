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


@pytest.fixture
def disk(tmp_path):
    """A 1 MiB image of random bytes: (path, original bytes)."""
    import os
    path = tmp_path / "disk.img"
    data = os.urandom(1 << 20)
    path.write_bytes(data)
    return str(path), data


@pytest.fixture
def blk(gmem, disk):
    """make(**configure) -> (dev, transport, BlkDriver) on the disk image."""
    from vmm.testing.mockdriver import BlkDriver
    from vmm.virtio.blk import BlkDevice
    from vmm.virtio.mmio import VirtioMmio
    made = []

    def make(ioloop=None, **conf):
        dev = BlkDevice(disk[0])
        dev.ioloop = ioloop
        if conf:
            dev.configure(**conf)
        t = VirtioMmio(dev, gmem)
        d = BlkDriver(t, gmem, arena_size=24 << 20)
        assert d.init()
        made.append(t)
        return dev, t, d
    yield make
    for t in made:
        t.close()


@pytest.fixture
def net(gmem):
    """make(ioloop=None, irq=None, **configure) -> (dev, transport, NetDriver, backend)."""
    from vmm.testing.mocknet import NetDriver
    from vmm.virtio.mmio import VirtioMmio
    from vmm.virtio.net import NetDevice
    made = []

    def make(ioloop=None, irq=None, features=None, **conf):
        from vmm.testing.sockbackend import SockBackend
        b = SockBackend()
        dev = NetDevice(b, ioloop=ioloop)
        if conf:
            dev.configure(**conf)
        t = VirtioMmio(dev, gmem, irq=irq)
        d = NetDriver(t, gmem, arena_size=12 << 20)
        assert d.init(features=features)
        made.append(t)
        return dev, t, d, b
    yield make
    for t in made:
        t.close()
