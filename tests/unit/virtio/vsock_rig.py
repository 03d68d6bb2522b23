"""Shared helpers of the virtio-vsock unit tests: a VsockDevice on a
VirtioMmio driven by the mock VsockDriver, its uds_path in a temp dir."""
import os
import socket

from vmm.memory import GuestMemory, MiB
from vmm.testing.mockvsock import VsockDriver
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.vsock import VsockDevice


class VsockRig:
    def __init__(self, tmp, cid=3, features=None, rx_buffers=128, mem_size=64 * MiB, **kw):
        self.tmp = str(tmp)
        self.uds = os.path.join(self.tmp, "v.sock")
        self.mem = GuestMemory(mem_size)
        self.dev = VsockDevice(self.uds, guest_cid=cid, **kw)
        self.t = VirtioMmio(self.dev, self.mem)
        self.d = VsockDriver(self.t, self.mem, rx_buffers=rx_buffers, arena_size=mem_size - (1 << 20))
        self.ok = self.d.init(features=features)
        self.listeners = []

    def listen(self, port):
        """A host program listening for guest connections to `port`."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(f"{self.uds}_{port}")
        s.listen(64)
        self.listeners.append(s)
        return s

    def host_connect(self, port):
        """A host program connecting to the guest's `port` (CONNECT line sent)."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(self.uds)
        s.sendall(b"CONNECT %d\n" % port)
        return s

    def pump(self, rounds=3):
        """Let the device see host socket events; returns the received packets."""
        out = []
        for _ in range(rounds):
            self.dev.poll()
            out += self.d.received()
        return out

    def close(self):
        for s in self.listeners:
            s.close()
        self.t.close()
        self.mem.close()
