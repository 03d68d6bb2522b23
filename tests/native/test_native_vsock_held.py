"""native/src/vsock.c's held transmit chains through cffi, without the
Python device: a ring in guest memory, one established connection on a
socketpair whose device end has a small send buffer."""
import os
import select
import socket
import struct

import pytest

from vmm.memory import GuestMemory, MiB
from vmm.native import ffi, lib
from vmm.virtio.queue import native_mem

NEXT = 1
SIZE = 16
DESC, AVAIL, USED, DATA = 0x1000, 0x2000, 0x3000, 0x100000
HDR = struct.Struct("<QQIIIHHIII")
PKT = 16 << 10
LOCAL, PEER, CID = 52, 1000, 3


class Rig:
    def __init__(self):
        self.mem = GuestMemory(16 * MiB)
        self.pm = native_mem(self.mem)
        self.vq = ffi.new("struct pv_vq *")
        assert lib.pv_vq_init(self.vq, self.pm, SIZE, DESC, AVAIL, USED, 0) == 0
        self.chain = ffi.new("struct pv_chain *")
        self.res = ffi.new("struct pv_vsock_result *")
        self.ep = select.epoll()
        self.conns = ffi.new("struct pv_vsock_conn[]", 4)
        vs = self.vs = ffi.new("struct pv_vsock *")
        vs.guest_cid, vs.epfd, vs.max_slots, vs.conns = CID, self.ep.fileno(), 4, self.conns
        vs.credit_threshold = 1 << 30
        self.dev, self.app = socket.socketpair()
        self.dev.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.dev.setblocking(False)
        assert lib.pv_vsock_conn_open(vs, 0, self.dev.fileno(), LOCAL, PEER,
                                      lib.PV_VSOCK_ST_CONNECTING, 256 << 10) == 0
        assert lib.pv_vsock_conn_start(vs, 0) == 0
        vs.txq = self.vq
        self.avail_idx = 0
        self.sent = bytearray()

    def offer(self, n):
        """n RW chains (header descriptor + PKT payload descriptor)."""
        for _ in range(n):
            k = self.avail_idx % (SIZE // 2)
            h, p = DATA + k * 0x10000, DATA + k * 0x10000 + 64
            data = os.urandom(PKT)
            self.mem.write(h, HDR.pack(CID, 2, PEER, LOCAL, PKT, 1, lib.PV_VSOCK_OP_RW,
                                       0, 1 << 20, 0))
            self.mem.write(p, data)
            self.mem.write(DESC + 16 * 2 * k, struct.pack("<QIHH", h, 44, NEXT, 2 * k + 1))
            self.mem.write(DESC + 16 * (2 * k + 1), struct.pack("<QIHH", p, PKT, 0, 0))
            self.mem.write(AVAIL + 4 + 2 * (self.avail_idx % SIZE), struct.pack("<H", 2 * k))
            self.avail_idx += 1
            self.sent += data
        self.mem.write(AVAIL + 2, struct.pack("<H", self.avail_idx & 0xFFFF))
        return lib.pv_vsock_tx(self.vq, self.vs, self.chain, self.res)

    def used_idx(self):
        return struct.unpack("<H", self.mem.read(USED + 2, 2))[0]

    def close(self):
        self.vs.txq = ffi.NULL
        lib.pv_vsock_conn_free(self.vs, 0)
        self.dev.close()
        self.app.close()
        self.ep.close()
        self.mem.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def test_held_then_sent_from_guest_memory_on_epollout(rig):
    assert rig.offer(4) == 0 and rig.res.state == 0
    k = rig.conns[0]
    assert k.held_n > 0 and rig.vs.nheld == k.held_n and k.pend_len == 0
    assert rig.used_idx() == 4 - k.held_n               # only what the socket took is used
    assert k.held_bytes + k.fwd_cnt == k.rx_cnt == 4 * PKT
    held = k.held_n
    got = bytearray()
    for _ in range(100):
        try:
            got += rig.app.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        assert lib.pv_vsock_poll(rig.vs, rig.res) >= 0
        if len(got) == len(rig.sent):
            break
    assert bytes(got) == bytes(rig.sent)
    assert rig.used_idx() == 4 and rig.vs.nheld == 0 and rig.vs.tx_pushed == held
    assert rig.vs.backlog_bytes == 0                    # nothing was copied


def test_unhold_copies_and_completes(rig):
    rig.offer(4)
    k = rig.conns[0]
    held, before = k.held_n, rig.used_idx()
    waiting = k.held_bytes
    assert lib.pv_vsock_unhold(rig.vs) == held
    assert rig.used_idx() == before + held and rig.vs.tx_pushed == held
    assert k.held_n == 0 and k.pend_len == waiting and rig.vs.backlog_bytes == waiting
    rig.mem.write(DATA + 64, bytes(PKT))               # the guest reuses its buffers at once
    got = bytearray()
    for _ in range(100):
        try:
            got += rig.app.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        lib.pv_vsock_poll(rig.vs, rig.res)
        if len(got) == len(rig.sent):
            break
    assert bytes(got) == bytes(rig.sent)                # the copies, not the rewritten buffer


def test_without_a_live_queue_held_chains_are_dropped_not_completed(rig):
    rig.offer(4)
    before = rig.used_idx()
    assert rig.conns[0].held_n > 0
    rig.vs.txq = ffi.NULL                                # the device was reset
    lib.pv_vsock_conn_free(rig.vs, 0)
    assert rig.used_idx() == before and rig.vs.nheld == 0 and rig.vs.tx_pushed == 0
    # the pool is whole again: a new connection holds as before
    assert lib.pv_vsock_conn_open(rig.vs, 0, rig.dev.fileno(), LOCAL, PEER,
                                  lib.PV_VSOCK_ST_CONNECTING, 256 << 10) == 0
    assert lib.pv_vsock_conn_start(rig.vs, 0) == 0
    rig.vs.txq = rig.vq
