"""Shared helpers of the virtio unit tests (a unique module name, so it
never collides with another directory's conftest)."""
from vmm.memory import MiB
from vmm.virtio.blk import BlkDevice
from vmm.virtio.mmio import VirtioMmio
from vmm.testing.mockdriver import BlkDriver

IMAGE_SIZE = 1 * MiB


class Rig:
    """A BlkDevice on a VirtioMmio driven by a BlkDriver."""

    def __init__(self, mem, image, native, irq=None, features=None, **kw):
        self.image = image
        if native == "io_uring":       # the io_uring engine (C only)
            native = True
            kw.setdefault("io_engine", "io_uring")
        self.dev = BlkDevice(image, native=native, **kw)
        self.t = VirtioMmio(self.dev, mem, irq=irq)
        self.d = BlkDriver(self.t, mem)
        self.ok = self.d.init(features=features)

    def disk(self):
        with open(self.image, "rb") as f:
            return f.read()

    def close(self):
        self.t.close()
