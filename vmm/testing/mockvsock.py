"""A virtio-vsock driver in Python for tests and benchmarks (virtio 1.1
§5.10.6): it sends packets on the transmit queue, keeps the receive queue
filled with header + 4 KiB buffers (two descriptors, as Linux 6.1 does) and
reads what the device put there, through the same register interface as a
guest (see mockdriver.MockDriver).

`GuestStream` plays one guest socket: it keeps the credit books of both
directions (§5.10.6.3) and checks that the device never sends more than the
credit it was given.
"""
import collections
import struct

from vmm.testing.mockdriver import DriverError, MockDriver

RX, TX, EVENT = 0, 1, 2
HDR = struct.Struct("<QQIIIHHIII")
HDR_LEN = HDR.size
HOST_CID = 2
OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST = range(1, 8)
SHUT_RCV, SHUT_SEND = 1, 2
TYPE_STREAM = 1
RX_BUF = 4096

Packet = collections.namedtuple(
    "Packet", "src_cid dst_cid src_port dst_port len type op flags buf_alloc fwd_cnt data")


def hdr(src_cid, dst_cid, src_port, dst_port, op, length=0, flags=0, buf_alloc=0, fwd_cnt=0,
        type_=TYPE_STREAM):
    return HDR.pack(src_cid, dst_cid, src_port, dst_port, length, type_, op, flags,
                    buf_alloc, fwd_cnt)


class VsockDriver(MockDriver):
    def __init__(self, transport, mem, rx_buffers=128, **kw):
        kw.setdefault("arena_size", 24 << 20)
        super().__init__(transport, mem, **kw)
        self.rx_buffers = rx_buffers
        self.rx_bufs = {}                # head -> (hdr gpa, buf gpa)
        self.tx_pool = []                # reusable (gpa, size) transmit buffers
        self.tx_inflight = {}            # head -> [(gpa, size)]
        self.event_bufs = {}
        self.cid = None

    def init(self, features=None, queue_sizes=None):
        ok = super().init(features, queue_sizes)
        if ok:
            self.cid = self.config(0, 8)
            for _ in range(min(self.rx_buffers, self.queues[RX].size // 2)):
                self._add_rx(publish=False)
            self.queues[RX].publish()
            for _ in range(4):
                gpa = self.alloc(4, 4, 8, fill=0xEE)
                self.event_bufs[self.queues[EVENT].add([(gpa, 4, True)])] = gpa
            self.kick(RX)
            self.kick(EVENT)
        return ok

    def _add_rx(self, publish=True):
        h = self.alloc(HDR_LEN, 8, 8)
        b = self.alloc(RX_BUF, 8, 8)
        head = self.queues[RX].add([(h, HDR_LEN, True), (b, RX_BUF, True)], publish=publish)
        self.rx_bufs[head] = (h, b)

    def _tx_buf(self, size):
        for i, (gpa, n) in enumerate(self.tx_pool):
            if n >= size:
                return self.tx_pool.pop(i)
        return self.alloc(max(size, 64), 8), max(size, 64)

    def send(self, header, data=b"", kick=True, split=None):
        """Offer one transmit chain: the header, then the payload (in
        descriptors of `split` bytes if given)."""
        self.reclaim_tx()
        hb = self._tx_buf(len(header))
        self.mem.write(hb[0], header)
        segs, bufs = [(hb[0], len(header), False)], [hb]
        step = split or max(len(data), 1)
        for off in range(0, len(data), step):
            piece = data[off:off + step]
            b = self._tx_buf(len(piece))
            self.mem.write(b[0], piece)
            segs.append((b[0], len(piece), False))
            bufs.append(b)
        head = self.queues[TX].add(segs)
        self.tx_inflight[head] = bufs
        if kick:
            self.kick(TX)
        return head

    def reclaim_tx(self):
        for head, _ in self.queues[TX].get_used():
            self.tx_pool.extend(self.tx_inflight.pop(head, []))

    def packet(self, src_port, dst_port, op, data=b"", flags=0, buf_alloc=0, fwd_cnt=0,
               src_cid=None, dst_cid=HOST_CID, length=None, **kw):
        cid = self.cid if src_cid is None else src_cid
        n = len(data) if length is None else length
        return self.send(hdr(cid, dst_cid, src_port, dst_port, op, n, flags, buf_alloc, fwd_cnt),
                         data, **kw)

    def received(self, refill=True):
        """Packets the device completed on the receive queue (buffers refilled)."""
        out = []
        for head, length in self.queues[RX].get_used():
            h, b = self.rx_bufs.pop(head)
            if length < HDR_LEN:
                raise DriverError(f"receive chain {head} used with {length} bytes")
            fields = HDR.unpack(self.mem.read(h, HDR_LEN))
            n = length - HDR_LEN
            if fields[4] != n:
                raise DriverError(f"header says {fields[4]} bytes, used length {n}")
            out.append(Packet(*fields, self.mem.read(b, n) if n else b""))
            if refill:
                self._add_rx(publish=False)
        if out and refill:
            self.queues[RX].publish()
            self.kick(RX)
        return out

    def events(self):
        """Event ids the device delivered (buffers given back)."""
        out = []
        for head, length in self.queues[EVENT].get_used():
            gpa = self.event_bufs.pop(head)
            out.append(struct.unpack("<I", self.mem.read(gpa, 4))[0])
            self.event_bufs[self.queues[EVENT].add([(gpa, 4, True)])] = gpa
        if out:
            self.kick(EVENT)
        return out


class GuestStream:
    """One guest stream socket over a VsockDriver, with credit accounting."""

    def __init__(self, drv, port, peer_port, buf_alloc=64 << 10):
        self.drv, self.port, self.peer_port = drv, port, peer_port
        self.buf_alloc = buf_alloc
        self.fwd_cnt = 0           # bytes our "application" consumed
        self.rx_cnt = 0            # RW bytes the device sent us
        self.tx_cnt = 0
        self.peer_buf_alloc = self.peer_fwd_cnt = 0
        self.inbox = bytearray()
        self.ctl = []              # non-RW packets seen
        self.credit_violations = 0

    def send_op(self, op, data=b"", flags=0, **kw):
        return self.drv.packet(self.port, self.peer_port, op, data, flags,
                               self.buf_alloc, self.fwd_cnt, **kw)

    @property
    def credit(self):
        return self.peer_buf_alloc - (self.tx_cnt - self.peer_fwd_cnt)

    def write(self, data, kick=True):
        """Send as much of `data` as the device's credit allows; returns the count."""
        n = min(len(data), max(0, self.credit))
        sent = 0
        while sent < n:
            piece = data[sent:sent + min(n - sent, 32 << 10)]
            self.send_op(OP_RW, piece, kick=False)
            self.tx_cnt += len(piece)
            sent += len(piece)
        if kick and sent:
            self.drv.kick(TX)
        return sent

    def accept(self, pkt):
        """Account for one packet of this stream from the device."""
        self.peer_buf_alloc, self.peer_fwd_cnt = pkt.buf_alloc, pkt.fwd_cnt
        if pkt.op == OP_RW:
            self.rx_cnt += len(pkt.data)
            if self.rx_cnt - self.fwd_cnt > self.buf_alloc:
                self.credit_violations += 1
            self.inbox += pkt.data
        else:
            self.ctl.append(pkt)

    def consume(self, update=True):
        """The application reads everything; tell the device (CREDIT_UPDATE)."""
        data = bytes(self.inbox)
        self.inbox.clear()
        self.fwd_cnt += len(data)
        if update and data:
            self.send_op(OP_CREDIT_UPDATE)
        return data


def dispatch(packets, streams):
    """Hand each packet to its GuestStream (keyed by guest port); returns the rest."""
    rest = []
    for p in packets:
        s = streams.get(p.dst_port)
        if s is not None and p.src_port == s.peer_port:
            s.accept(p)
        else:
            rest.append(p)
    return rest
