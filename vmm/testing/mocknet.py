"""A virtio-net driver in Python for tests and benchmarks (virtio 1.1 §5.1.6):
receive buffers and transmit chains from guard-fenced guest memory, through
the same register interface as a guest (see mockdriver.MockDriver)."""
import struct

from vmm.testing.mockdriver import DriverError, MockDriver

RX, TX = 0, 1
HDR_LEN = 12


def net_hdr(flags=0, gso_type=0, hdr_len=0, gso_size=0, csum_start=0, csum_offset=0,
            num_buffers=0):
    """struct virtio_net_hdr (§5.1.6), 12 bytes."""
    return struct.pack("<BBHHHHH", flags, gso_type, hdr_len, gso_size, csum_start,
                       csum_offset, num_buffers)


def cuts(total, split):
    """`split` nearly equal non-empty pieces of `total` bytes: [(start, end)]."""
    split = max(1, min(split, total)) if total else 1
    edges = [total * k // split for k in range(split + 1)]
    return [(a, b) for a, b in zip(edges, edges[1:]) if b > a] or [(0, 0)]


class NetDriver(MockDriver):
    def __init__(self, transport, mem, **kw):
        super().__init__(transport, mem, **kw)
        self.rx_bufs = {}            # head -> [(gpa, length)]
        self.tx_bufs = {}

    def add_rx(self, size, split=1, guard=16, indirect=False, publish=True, fill=0x5A, pair=0):
        """Offer one device-writable receive chain of `size` bytes in `split`
        pieces (on queue pair `pair`: queue 2 * pair, §5.1.2)."""
        q = self.queues[2 * pair + RX]
        segs = []
        for a, b in cuts(size, split):
            gpa = self.alloc(b - a, 16, guard, fill=fill)
            segs.append((gpa, b - a))
        head = q.add([(g, n, True) for g, n in segs], indirect=indirect, publish=publish)
        self.rx_bufs[head] = segs
        return head

    def chain_bytes(self, head, length):
        out = b"".join(self.mem.read(g, n) for g, n in self.rx_bufs[head])
        return out[:length]

    def received(self, mrg=False, pair=0):
        """Frames the device completed on the receive queue, as (header, frame)
        pairs; with MRG_RXBUF, num_buffers chains make one frame (§5.1.6.4)."""
        used = self.queues[2 * pair + RX].get_used()
        out, i = [], 0
        while i < len(used):
            head, length = used[i]
            data = self.chain_bytes(head, length)
            n = struct.unpack_from("<H", data, 10)[0] if mrg else 1
            if mrg:
                if n < 1 or i + n > len(used):
                    raise DriverError(f"num_buffers {n} but {len(used) - i} chains used")
                for h, ln in used[i + 1:i + n]:
                    data += self.chain_bytes(h, ln)
            for h, _ in used[i:i + n]:
                self.rx_bufs.pop(h, None)
            out.append((data[:HDR_LEN], data[HDR_LEN:]))
            i += n
        return out

    def send(self, frame, hdr=None, split=1, indirect=False, guard=16, publish=True, kick=True,
             pair=0):
        """Offer header + frame as a device-readable chain in `split` pieces."""
        data = (net_hdr() if hdr is None else hdr) + frame
        segs = []
        for a, b in cuts(len(data), split):
            gpa = self.alloc(b - a, 16, guard)
            self.mem.write(gpa, data[a:b])
            segs.append((gpa, b - a, False))
        head = self.queues[2 * pair + TX].add(segs, indirect=indirect, publish=publish)
        if kick:
            self.kick(2 * pair + TX)
        return head

    def sent(self, pair=0):
        """(head, len) of completed transmit chains."""
        return self.queues[2 * pair + TX].get_used()

    def mark(self):
        """Allocator position, to give back with release() once the chains
        allocated since are completed (long loops in tests and benchmarks)."""
        return self._next, len(self.guards)

    def release(self, mark):
        bad = self.check_guards()
        if bad:
            raise DriverError(f"guard bytes overwritten at {[hex(g) for g in bad]}")
        self._next, n = mark
        del self.guards[n:]

    def reset_arena(self, arena=0x10000):
        self._next = arena
        self.guards = []
