"""A tap stand-in for tests, fuzz targets and benchmarks: one end of a
SOCK_DGRAM socketpair per queue pair, with the interface virtio-net expects
of a tap backend (vmm/tap.py).  Each message is one frame with its
virtio_net_hdr, as a tap with IFF_VNET_HDR reads and writes them."""
import socket


class SockBackend:
    def __init__(self, queues=1, bufsize=4 << 20, name="sockpair"):
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(queues)]
        for pair in self.pairs:
            for s in pair:
                if bufsize:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, bufsize)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, bufsize)
                s.setblocking(False)
        self.sock, self.peer = self.pairs[0]
        self.fds = [s.fileno() for s, _ in self.pairs]
        self.fd, self.name, self.offload_ok = self.fds[0], name, False
        self.hdr_len = None
        self.offload = None

    def set_vnet_hdr_len(self, n):
        self.hdr_len = n

    def set_offload(self, flags):
        self.offload = flags

    def peer_frames(self):
        """Every message the device wrote on the first queue pair."""
        out = []
        while True:
            try:
                out.append(self.peer.recv(1 << 17))
            except BlockingIOError:
                return out

    def drain_peer(self):
        return len(self.peer_frames())

    def close(self):
        for pair in self.pairs:
            for s in pair:
                s.close()
