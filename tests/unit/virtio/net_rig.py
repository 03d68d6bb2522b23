"""Shared helpers of the virtio-net unit tests: a NetDevice on a VirtioMmio
driven by the mock NetDriver, with a datagram socketpair standing in for the
tap (each message is one frame with its virtio_net_hdr, as on a tap)."""
from vmm.virtio.mmio import VirtioMmio
from vmm.testing.mocknet import NetDriver
from vmm.virtio.net import NetDevice
from vmm.testing.sockbackend import SockBackend  # noqa: F401  (re-exported to the tests)


class NetRig:
    def __init__(self, mem, features=None, irq=None, ioloop=None, backend=None, **kw):
        self.backend = backend or SockBackend()
        self.dev = NetDevice(self.backend, ioloop=ioloop, **kw)
        self.t = VirtioMmio(self.dev, mem, irq=irq)
        self.d = NetDriver(self.t, mem, arena_size=12 << 20)
        self.ok = self.d.init(features=features)

    def close(self):
        self.t.close()
