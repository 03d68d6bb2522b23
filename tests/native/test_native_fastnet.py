"""native/src/fastnet.c through cffi: a virtio-net queue pair's three fast
fds (TX kick, RX kick, readable tap) served by pv_fast_handle() on rings in
guest memory, with a datagram socketpair as the tap: frames, budgets,
early interrupts (§2.6.7.2), the tap leaving epoll when receive buffers run
out and coming back on the receive kick, a disabled or malformed queue."""
import os
import select
import socket
import struct

import pytest

from vmm.memory import GuestMemory, MiB
from vmm.native import ffi, lib
from vmm.virtio.queue import native_mem

SIZE = 64
HDR = 12
WRITE = 2
RINGS = {0: (0x1000, 0x2000, 0x3000), 1: (0x5000, 0x6000, 0x7000)}     # RX, TX
BUF = 0x10000          # buffer k of queue q at BUF + q * 0x100000 + k * 2048


class Ring:
    def __init__(self, mem, index):
        self.mem, self.index = mem, index
        self.desc, self.avail, self.used = RINGS[index]
        self.vq = ffi.new("struct pv_vq *")
        self.pm = native_mem(mem)             # the vq points at it: keep it alive
        assert lib.pv_vq_init(self.vq, self.pm, SIZE, self.desc, self.avail, self.used,
                              lib.PV_VQ_F_EVENT_IDX) == 0
        self.chain = ffi.new("struct pv_chain *")
        self.avail_idx = 0

    def u16(self, gpa):
        return struct.unpack("<H", self.mem.read(gpa, 2))[0]

    @property
    def used_idx(self):
        return self.u16(self.used + 2)

    @property
    def avail_event(self):
        return self.u16(self.used + 4 + 8 * SIZE)

    def set_used_event(self, v):
        self.mem.write(self.avail + 4 + 2 * SIZE, struct.pack("<H", v & 0xFFFF))

    def add(self, data=None, length=2048, flags=None):
        k = self.avail_idx % SIZE
        gpa = BUF + self.index * 0x100000 + k * 2048
        if data is not None:
            self.mem.write(gpa, data)
            length = len(data)
        f = (0 if data is not None else WRITE) if flags is None else flags
        self.mem.write(self.desc + 16 * k, struct.pack("<QIHH", gpa, length, f, 0))
        self.mem.write(self.avail + 4 + 2 * k, struct.pack("<H", k))
        self.avail_idx += 1
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx & 0xFFFF))

    def used_elem(self, i):
        return struct.unpack("<II", self.mem.read(self.used + 4 + 8 * (i % SIZE), 8))


def eventfd():
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def take(fd):
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


class Pair:
    def __init__(self):
        self.mem = GuestMemory(16 * MiB)
        self.mem.view(0, 0x400000)[:] = 0
        self.rx, self.tx = Ring(self.mem, 0), Ring(self.mem, 1)
        self.sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.peer.setblocking(False)
        self.sink = ffi.new("uint8_t[]", lib.PV_NET_SINK_SIZE)
        self.net = ffi.new("struct pv_net *")
        self.net.fd, self.net.sink, self.net.hdr_len = self.sock.fileno(), self.sink, HDR
        self.net.mrg_rxbuf = 1
        self.ep = select.epoll()
        self.ep.register(self.sock.fileno(), select.EPOLLIN)
        self.irq = ffi.new("struct pv_fast_irq *")
        self.irq.fd = eventfd()
        f = self.f = ffi.new("struct pv_fast_net *")
        f.net, f.rx, f.tx = self.net, self.rx.vq, self.tx.vq
        f.rx_chain, f.tx_chain = self.rx.chain, self.tx.chain
        f.epfd, f.tap_fd, f.early_div = self.ep.fileno(), self.sock.fileno(), 4
        self.q = {}
        for name, kind, fd in (("rx", lib.PV_FAST_NET_RX, eventfd()),
                               ("tx", lib.PV_FAST_NET_TX, eventfd()),
                               ("tap", lib.PV_FAST_NET_TAP, self.sock.fileno())):
            q = self.q[name] = ffi.new("struct pv_fast_queue *")
            q.notify_fd, q.kind, q.fnet, q.irq, q.isr_bit = fd, kind, f, self.irq, 1
            lib.pv_fast_enable(q)
        f.rxq, f.txq = self.q["rx"], self.q["tx"]

    def kick(self, name):
        os.write(self.q[name].notify_fd, (1).to_bytes(8, "little"))
        return lib.pv_fast_handle(self.q[name])

    def tap_in_epoll(self):
        return any(fd == self.sock.fileno() for fd, _ in self.ep.poll(0))

    def close(self):
        for name in ("rx", "tx"):
            os.close(self.q[name].notify_fd)
        os.close(self.irq.fd)
        self.ep.close()
        self.sock.close()
        self.peer.close()
        self.mem.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def frame(i, n=60):
    return bytes(HDR) + bytes([i]) * n


def test_tx_kick_sends_frames_with_an_early_interrupt(pair):
    for i in range(16):
        pair.tx.add(frame(i))
    assert pair.kick("tx") == 1
    got = [pair.peer.recv(4096) for _ in range(16)]
    assert got == [frame(i) for i in range(16)]
    assert pair.tx.used_idx == 16 and pair.q["tx"].kicks == 1 and pair.q["tx"].requests == 16
    assert pair.net.tx_packets == 16 and pair.net.tx_bytes == 16 * 60
    # used_event 0: woken once while frames were still waiting, not again
    assert pair.f.early == 1 and pair.irq.count == 1 and take(pair.irq.fd) == 1
    assert lib.pv_fast_isr_take(pair.irq) == 1
    assert pair.tx.avail_event == 16              # re-armed: the next frame kicks
    assert take(pair.q["tx"].notify_fd) == 0      # the kick was drained


def test_tx_budget_requeues_the_kick(pair):
    pair.net.budget = 4
    for i in range(10):
        pair.tx.add(frame(i))
    assert pair.kick("tx") == 1
    assert pair.tx.used_idx == 4
    assert take(pair.q["tx"].notify_fd) == 1      # come back after the loop's other fds
    assert lib.pv_fast_handle(pair.q["tx"]) == 1 and pair.tx.used_idx == 8


def test_rx_out_of_buffers_takes_the_tap_out_of_epoll_until_the_kick(pair):
    for _ in range(2):
        pair.rx.add()
    for i in range(3):
        pair.peer.send(frame(i))
    assert lib.pv_fast_handle(pair.q["tap"]) == 1
    assert pair.rx.used_idx == 2 and pair.net.rx_packets == 2
    head, length = pair.rx.used_elem(0)
    assert length == HDR + 60 and pair.mem.read(BUF + head * 2048 + HDR, 60) == bytes(60)
    assert pair.f.tap_off == 1 and not pair.tap_in_epoll()    # a frame waits, unwatched
    assert pair.rx.avail_event == 2               # and the driver's next buffer kicks
    pair.rx.add()
    pair.rx.add()                                 # one left over: nothing to read now
    assert pair.kick("rx") == 1
    assert pair.rx.used_idx == 3 and pair.net.rx_packets == 3 and pair.q["rx"].kicks == 1
    assert pair.f.tap_off == 0 and pair.f.tap_changes == 2
    pair.peer.send(frame(9))
    assert pair.tap_in_epoll()                    # watched again
    assert pair.irq.count >= 1 and take(pair.irq.fd) == pair.irq.count


def test_disabled_queue_is_not_touched(pair):
    pair.tx.add(frame(1))
    lib.pv_fast_disable(pair.q["tx"])
    assert pair.kick("tx") == 0
    assert pair.tx.used_idx == 0 and pair.q["tx"].kicks == 0
    assert take(pair.q["tx"].notify_fd) == 1      # left for Python's handler


def test_malformed_tx_chain_hands_the_queue_to_python(pair):
    pair.tx.add(frame(1), flags=WRITE)            # device-writable: not a frame (§5.1.6.2)
    assert pair.kick("tx") == 0
    assert pair.q["tx"].error == -lib.PV_VQ_E_REQ and not pair.q["tx"].enabled
    assert pair.tx.used_idx == 0
    pair.rx.add()
    pair.peer.send(frame(2))
    assert lib.pv_fast_handle(pair.q["tap"]) == 1   # the other direction goes on
    assert pair.rx.used_idx == 1
