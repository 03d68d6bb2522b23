"""virtio-blk's io_uring engine (io_engine=io_uring): every request test of
the sync engine again (test_virtio_blk's tests, collected here with the
`native` fixture set to "io_uring"), then what only an asynchronous engine
has: kicks that return before the I/O, completions through the I/O loop and
the interrupt, flush ordering, reset with requests in flight."""
import os
import select
import struct

import pytest

from vmm.virtio import blk as b
from vmm.virtio import blk_uring
from vmm.virtio.blk import BlkDevice, BlkError
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.mmio import VirtioMmio
from vmm.testing.mockdriver import BlkDriver, T_FLUSH, T_IN, T_OUT

ok, why = blk_uring.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"io_uring unavailable here: {why}")

from test_virtio_blk import *  # noqa: E402,F401,F403  the same request tests


@pytest.fixture
def native():
    return "io_uring"


class AsyncRig:
    """BlkDevice(io_engine=io_uring) on virtio-mmio with an I/O loop: kicks
    through the notify eventfd as KVM would, interrupts on an eventfd."""

    def __init__(self, mem, image):
        self.loop = IoLoop()
        self.loop.start()
        self.irq = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.dev = BlkDevice(image, io_engine="io_uring", ioloop=self.loop)
        self.t = VirtioMmio(self.dev, mem, irq=self.irq, ioloop=self.loop,
                            register_ioeventfd=lambda fd, off, n, dm: None)
        self.d = BlkDriver(self.t, mem)
        assert self.d.init()

    def kick(self):
        os.write(self.t.notify_fds[0], (1).to_bytes(8, "little"))

    def wait_used(self, n, timeout=30):
        """Used elements until `n` arrived, each interrupt acknowledged."""
        got = []
        while len(got) < n:
            assert select.select([self.irq], [], [], timeout)[0], f"only {len(got)} of {n} completed"
            os.read(self.irq, 8)
            self.d.ack_interrupt()
            got += self.d.queues[0].get_used()
        return got

    def close(self):
        self.t.close()
        self.loop.close()
        os.close(self.irq)


@pytest.fixture
def arig(mem, image):
    r = AsyncRig(mem, image)
    yield r
    r.close()


def test_completion_arrives_through_the_loop_and_interrupt(arig):
    with open(arig.dev.path, "rb") as f:
        disk = f.read()
    reqs = [arig.d.submit(T_IN, 8 * k, read_len=4096) for k in range(16)]
    arig.kick()
    used = dict(arig.wait_used(16))
    for k, req in enumerate(reqs):
        status, data = arig.d.result(req)
        assert status == b.S_OK and used[req.head] == 4097
        assert data == disk[4096 * k:4096 * (k + 1)]
    assert arig.dev.stats["requests"] == 16
    assert arig.d.check_guards() == []


def test_flush_completes_after_every_earlier_write(arig):
    """Writes and a FLUSH offered in one batch: the FLUSH's used element comes
    after every write's (IOSQE_IO_DRAIN), and the writes are in the file."""
    payloads = [os.urandom(256 * 1024) for _ in range(3)]
    writes = [arig.d.submit(T_OUT, 512 * k, data=p) for k, p in enumerate(payloads)]
    flush = arig.d.submit(T_FLUSH)
    arig.kick()
    order = [head for head, _ in arig.wait_used(4)]
    assert order[-1] == flush.head
    assert sorted(order[:-1]) == sorted(w.head for w in writes)
    assert all(arig.d.result(r)[0] == b.S_OK for r in writes + [flush])
    with open(arig.dev.path, "rb") as f:
        disk = f.read()
    for k, p in enumerate(payloads):
        assert disk[512 * 512 * k:512 * 512 * k + len(p)] == p


def test_flush_is_submitted_with_io_drain(arig):
    """The test above cannot fail here: page-cache writes complete before the
    FLUSH is even looked at.  The ordering is the kernel's IOSQE_IO_DRAIN
    guarantee (io_uring_enter(2)), so check every FLUSH carries it and the
    writes do not (a drained write would serialise the queue)."""
    from vmm.native import ffi, lib
    seen = []

    @ffi.callback("void(uint8_t, uint8_t, uint64_t)")
    def hook(opcode, flags, user_data):
        seen.append((opcode, flags, user_data))

    writes = [arig.d.submit(T_OUT, 8 * k, data=os.urandom(4096)) for k in range(3)]
    flush = arig.d.submit(T_FLUSH)
    lib.pv_uring_sqe_hook = hook
    try:
        arig.kick()
        arig.wait_used(4)
    finally:
        lib.pv_uring_sqe_hook = ffi.NULL
    IORING_OP_FSYNC, IORING_OP_WRITE, IOSQE_IO_DRAIN = 3, 23, 1 << 1
    by_head = {ud: (op, fl) for op, fl, ud in seen}
    assert by_head[flush.head] == (IORING_OP_FSYNC, IOSQE_IO_DRAIN)
    for w in writes:        # one data segment each: the plain (not vectored) opcode
        assert by_head[w.head] == (IORING_OP_WRITE, 0)


def test_reset_with_requests_in_flight_completes_nothing_later(arig):
    for k in range(8):
        arig.d.submit(T_IN, 0, read_len=65536)
    arig.kick()
    arig.t.reset()                      # drains the ring; nothing lands in the old queue
    assert arig.dev._engines[0].inflight == 0
    used_before = arig.d.queues[0].used_idx
    assert not select.select([arig.irq], [], [], 0.2)[0] or arig.d.queues[0].used_idx == used_before


def test_unknown_engine_is_refused(image):
    with pytest.raises(BlkError, match="unknown io_engine"):
        BlkDevice(image, io_engine="aio")


def test_drive_option(image):
    from vmm.devices import DeviceSpecError, DriveSpec
    assert DriveSpec(f"file={image},io_engine=io_uring").io_engine == "io_uring"
    assert DriveSpec(f"file={image}").io_engine == "sync"
    with pytest.raises(DeviceSpecError, match="unknown io_engine"):
        DriveSpec(f"file={image},io_engine=Async")


def test_budget_bounds_one_kick(mem, image):
    """At most `budget` requests are taken per call (issue #14's per-call
    budget holds for io_uring too); the rest are taken by the next call."""
    from virtio_rig import Rig
    r = Rig(mem, image, "io_uring")
    try:
        r.dev.budget = 4
        reqs = [r.d.submit(T_IN, 8 * k, read_len=4096) for k in range(10)]
        ring = r.dev._rings[0]
        out = r.dev._engines[0].submit(ring, r.t)
        assert out[4] and out[0] == 4                  # more to do, 4 done
        r.dev._engines[0].submit(ring, r.t)
        r.dev._engines[0].submit(ring, r.t)
        assert len(r.d.queues[0].get_used()) == 10
        assert all(r.d.result(q)[0] == b.S_OK for q in reqs)
    finally:
        r.close()
