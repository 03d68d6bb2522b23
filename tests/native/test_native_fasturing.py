"""native/src/fasturing.c through cffi: pv_fast_handle() on a virtio-blk
ring whose queue has an io_uring (q.uring), as the I/O loop's C wait runs
it: the requests are submitted in batches, completed into the used ring with
the sync engine's interrupt rules, flushes drained behind earlier writes,
and requests still in flight reaped on the ring's completion eventfd."""
import os
import select
import struct

import pytest

from vmm.native import ffi, lib
from test_native_fastpath import DATA, STATUS, T_FLUSH, T_IN, Ring

IORING_OP_FSYNC, IOSQE_IO_DRAIN = 3, 1 << 1
IORING_OP_READ = 22


@pytest.fixture
def uring(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(os.urandom(256 * 1024))
    r = Ring(path)
    r.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    err = ffi.new("int *")
    r.u = lib.pv_uring_new(64, r.efd, err)
    if r.u == ffi.NULL:
        r.close()
        pytest.skip(f"io_uring unavailable here: {os.strerror(err[0])}")
    lib.pv_fast_disable(r.q)
    r.q.uring = r.u
    lib.pv_fast_enable(r.q)
    r.disk = path.read_bytes()
    yield r
    lib.pv_fast_disable(r.q)
    lib.pv_uring_free(r.u)
    os.close(r.efd)
    r.close()


def hooked():
    seen = []

    @ffi.callback("void(uint8_t, uint8_t, uint64_t)")
    def hook(opcode, flags, user_data):
        seen.append((opcode, flags, user_data))
    lib.pv_uring_sqe_hook = hook
    return seen, hook


def status(ring, k):
    return ring.mem.read(STATUS + k, 1)[0]


def test_a_kick_reads_every_request_with_one_early_interrupt(uring):
    for _ in range(16):
        uring.add(publish=False)
    uring.publish()
    seen, hook = hooked()
    try:
        assert lib.pv_fast_handle(uring.q) == 1
    finally:
        lib.pv_uring_sqe_hook = ffi.NULL
    assert uring.q.requests == 16 and uring.used_idx == 16 and uring.q.kicks == 1
    assert [op for op, _, _ in seen] == [IORING_OP_READ] * 16     # one segment: plain READ
    for k in range(16):
        assert status(uring, k) == 0
        assert uring.mem.read(DATA + 4096 * k, 4096) == uring.disk[512 * k:512 * k + 4096]
    # the driver asked at the first completion (used_event 0): woken once,
    # early, while requests were still waiting or in flight
    assert uring.q.early == 1 and uring.irq.count == 1 and uring.irqs() == 1
    assert lib.pv_uring_inflight(uring.u) == 0
    assert uring.avail_event == 16


def test_flush_is_drained_behind_the_writes(uring):
    """Two reads, then a FLUSH: IOSQE_IO_DRAIN (io_uring starts it after
    every earlier request), completed after them (fsync runs in io_uring's
    worker: in flight after the kick, reaped on the eventfd)."""
    uring.add()
    uring.add()
    uring.add(kind=T_FLUSH)
    seen, hook = hooked()
    try:
        assert lib.pv_fast_handle(uring.q) == 1
        for _ in range(100):                # what the loop's epoll does
            if not lib.pv_uring_inflight(uring.u):
                break
            assert select.select([uring.efd], [], [], 10)[0], "no completion signal"
            assert lib.pv_fast_handle_fd(uring.q, uring.efd) == 1
    finally:
        lib.pv_uring_sqe_hook = ffi.NULL
    assert (seen[-1][0], seen[-1][1]) == (IORING_OP_FSYNC, IOSQE_IO_DRAIN)
    assert all(fl == 0 for _, fl, _ in seen[:-1])
    assert uring.used_idx == 3 and lib.pv_uring_inflight(uring.u) == 0
    assert uring.q.kicks == 1 and uring.q.requests == 3
    used = [struct.unpack("<II", uring.mem.read(0x3000 + 4 + 8 * i, 8))[0] for i in range(3)]
    assert used[-1] == seen[-1][2]                    # the flush's head, last
    assert [status(uring, k) for k in range(3)] == [0, 0, 0]


def test_budget_requeues_the_kick(uring):
    uring.blk.budget = 5
    for _ in range(12):
        uring.add(publish=False)
    uring.publish()
    assert lib.pv_fast_handle(uring.q) == 1
    assert uring.used_idx == 5
    assert int.from_bytes(os.read(uring.q.notify_fd, 8), "little") == 1   # re-kicked
    assert lib.pv_fast_handle(uring.q) == 1 and uring.used_idx == 10
    os.read(uring.q.notify_fd, 8)
    assert lib.pv_fast_handle(uring.q) == 1 and uring.used_idx == 12


def test_disabled_queue_is_not_touched(uring):
    uring.add()
    lib.pv_fast_disable(uring.q)
    assert lib.pv_fast_handle_fd(uring.q, uring.efd) == 0
    assert uring.used_idx == 0 and lib.pv_uring_inflight(uring.u) == 0
