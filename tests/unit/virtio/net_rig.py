"""Shared helpers of the virtio-net unit tests: a NetDevice on a VirtioMmio
driven by the mock NetDriver, with a datagram socketpair standing in for the
tap (each message is one frame with its virtio_net_hdr, as on a tap)."""
import socket

from vmm.virtio.mmio import VirtioMmio
from vmm.testing.mocknet import NetDriver
from vmm.virtio.net import NetDevice


class SockBackend:
    """One end of a SOCK_DGRAM socketpair, with a tap's interface."""

    def __init__(self):
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.sock, self.peer):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setblocking(False)
        self.fd = self.sock.fileno()
        self.name = "sockpair"
        self.offload_ok = False
        self.hdr_len = None
        self.offload = None

    def set_vnet_hdr_len(self, n):
        self.hdr_len = n

    def set_offload(self, flags):
        self.offload = flags

    def peer_frames(self):
        """Every message the device wrote (header + frame)."""
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def close(self):
        self.sock.close()
        self.peer.close()


class NetRig:
    def __init__(self, mem, features=None, irq=None, ioloop=None, backend=None, **kw):
        self.backend = backend or SockBackend()
        self.dev = NetDevice(self.backend, ioloop=ioloop, **kw)
        self.t = VirtioMmio(self.dev, mem, irq=irq)
        self.d = NetDriver(self.t, mem, arena_size=12 << 20)
        self.ok = self.d.init(features=features)

    def close(self):
        self.t.close()
