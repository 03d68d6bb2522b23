"""virtio-blk's io_uring engine on the I/O loop's C fast path
(native/src/fasturing.c): kicks submitted and completions reaped in C, with
the sync engine's request semantics (data, flush ordering, short transfers,
error status), and the hand-over to Python: a queue taken off the fast path,
a paused loop or a snapshot leave no request in flight that nobody reaps."""
import os
import time

import pytest

from vmm.testing.mockdriver import T_FLUSH, T_IN, T_OUT
from vmm.testing.waiting import SLOW, barrier, until
from vmm.virtio import blk_uring
from vmm.virtio import device as vd
from vmm.virtio.blk import S_IOERR, S_OK
from test_fastpath import FastRig, handled_in_c, settle

ok, why = blk_uring.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"io_uring unavailable here: {why}")

IORING_OP_FSYNC, IOSQE_IO_DRAIN = 3, 1 << 1


@pytest.fixture
def ur(mem, image):
    r = FastRig(mem, image, io_engine="io_uring")
    yield r
    r.close()


def wait_used(r, base, n):
    """Until the device has used `n` chains past used index `base`."""
    q = r.d.queues[0]
    deadline = time.monotonic() + SLOW
    while (q.used_idx - base) & 0xFFFF < n and time.monotonic() < deadline:
        r.wait_irq(0.2)
    assert (q.used_idx - base) & 0xFFFF >= n, f"{(q.used_idx - base) & 0xFFFF} of {n} used"
    return q.get_used()


def cold(image):
    """Drop the image from the page cache: reads then go to the disk and
    complete after io_uring_enter returns (in flight)."""
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def in_flight(r, n=16, tries=5):
    """Offer `n` cold 64 KiB reads (the whole image), kick, and return them
    and the used index before them once C has some in flight; a few tries,
    then (None, None) (every read completed first: a tmpfs or cached image)."""
    q = r.d.queues[0]
    eng = r.dev._engines[0]
    for _ in range(tries):
        cold(r.dev.path)
        base = q.used_idx
        reqs = [r.d.submit(T_IN, 128 * k, read_len=65536) for k in range(n)]
        r.kick()
        until(lambda: eng.inflight or (q.used_idx - base) & 0xFFFF >= n, SLOW, poll=0)
        if eng.inflight:
            return reqs, base
        wait_used(r, base, n)
    return None, None


def chunk(r, k):
    return r.disk[65536 * k:65536 * (k + 1)]


def test_queue_is_on_the_fast_path_with_the_ring(ur):
    assert ur.t._fast is not None and ur.t._fast.enabled(0)
    assert ur.t._fast.queue_struct(0).uring == ur.dev._engines[0].handle


def test_reads_and_writes_are_served_in_c(ur, image):
    ur.t._fast.set_poll_us(0)            # one kick per request
    handled0 = settle(ur)
    stats0 = dict(ur.dev.stats)
    for i in range(4):
        assert ur.read(8 * i) == (S_OK, ur.disk[4096 * i:4096 * (i + 1)])
        # the thread back asleep with kicks re-armed: a read found by the
        # pass's last ring check has its kick coalesced with the next one
        # (as in test_fastpath.py's one-kick-per-read test)
        barrier(ur.loop)
    payload = os.urandom(8192)
    base = ur.d.queues[0].used_idx
    req = ur.d.submit(T_OUT, 40, data=payload)
    ur.kick()
    wait_used(ur, base, 1)
    assert ur.d.result(req)[0] == S_OK
    barrier(ur.loop)                      # C counts the pass after its used element went out
    assert handled_in_c(ur.loop) >= handled0 + 5
    assert ur.dev._engines[0].stats["reaped"] == 0       # nothing reaped by Python
    st = ur.dev.stats
    assert st["requests"] - stats0["requests"] == 5 and st["kicks"] - stats0["kicks"] == 5
    with open(image, "rb") as f:
        f.seek(40 * 512)
        assert f.read(8192) == payload


def test_a_full_ring_in_one_kick(ur):
    settle(ur)
    base = ur.d.queues[0].used_idx
    reqs = [ur.d.submit(T_IN, 8 * k, read_len=4096, split=1 + k % 3) for k in range(32)]
    ur.kick()
    used = dict(wait_used(ur, base, 32))
    for k, req in enumerate(reqs):
        assert ur.d.result(req) == (S_OK, ur.disk[4096 * k:4096 * (k + 1)])
        assert used[req.head] == 4097
    assert ur.d.check_guards() == []


def test_flush_waits_for_earlier_writes(ur, image):
    """Writes then a FLUSH in one kick, served in C: the FLUSH goes in with
    IOSQE_IO_DRAIN (io_uring starts it after every earlier request), the
    writes without, and its used element comes after theirs."""
    from vmm.native import ffi, lib
    settle(ur)
    seen = []

    @ffi.callback("void(uint8_t, uint8_t, uint64_t)")
    def hook(opcode, flags, user_data):
        seen.append((opcode, flags, user_data))

    handled0 = ur.loop.fast_counts[1]
    payloads = [os.urandom(65536) for _ in range(6)]
    writes = [ur.d.submit(T_OUT, 128 * k, data=p, split=2) for k, p in enumerate(payloads)]
    flush = ur.d.submit(T_FLUSH)
    base = ur.d.queues[0].used_idx
    lib.pv_uring_sqe_hook = hook
    try:
        ur.kick()
        order = [h for h, _ in wait_used(ur, base, 7)]
    finally:
        barrier(ur.loop)
        lib.pv_uring_sqe_hook = ffi.NULL
    assert handled_in_c(ur.loop) > handled0
    assert order[-1] == flush.head
    flags = {ud: (op, fl) for op, fl, ud in seen}
    assert flags[flush.head] == (IORING_OP_FSYNC, IOSQE_IO_DRAIN)
    assert all(flags[w.head][1] == 0 for w in writes)
    assert all(ur.d.result(r)[0] == S_OK for r in writes + [flush])
    with open(image, "rb") as f:
        disk = f.read()
    for k, p in enumerate(payloads):
        assert disk[65536 * k:65536 * (k + 1)] == p


def test_short_read_past_a_shrunk_image_reads_zeros(ur, image):
    """The image shrinks under the device (capacity kept): io_uring reads
    short, and the rest reads as zeros, as with the sync engine."""
    settle(ur)
    os.truncate(image, 8192 + 1024)
    base = ur.d.queues[0].used_idx
    req = ur.d.submit(T_IN, 16, read_len=4096)          # bytes 8192..12287
    ur.kick()
    used = dict(wait_used(ur, base, 1))
    assert ur.d.result(req) == (S_OK, ur.disk[8192:9216] + bytes(3072))
    assert used[req.head] == 4097


def test_io_error_gives_ioerr_status(ur, image):
    settle(ur)
    ro = os.open(image, os.O_RDONLY)
    with ur.t.fast_hold():                  # the C side off while the fd changes
        rw, ur.dev._blk.fd = ur.dev._blk.fd, ro
    try:
        assert ur.t._fast.enabled(0)
        ioerr0 = ur.dev.stats["ioerr"]
        base = ur.d.queues[0].used_idx
        req = ur.d.submit(T_OUT, 8, data=os.urandom(4096))
        ur.kick()
        used = dict(wait_used(ur, base, 1))
        assert ur.d.result(req)[0] == S_IOERR and used[req.head] == 1
        barrier(ur.loop)                    # C counts after the interrupt went out
        assert ur.dev.stats["ioerr"] == ioerr0 + 1
    finally:
        with ur.t.fast_hold():
            ur.dev._blk.fd = rw
        os.close(ro)
    assert ur.read(0) == (S_OK, ur.disk[:4096])


def test_disabled_queue_hands_requests_in_flight_to_python(ur):
    """C submitted them; the queue goes off the fast path before they
    complete: the completion eventfd's Python handler reaps them into the
    same ring and interrupts."""
    settle(ur)
    reqs, base = in_flight(ur)
    if reqs is None:
        pytest.skip("every read completed inside io_uring_enter (tmpfs or cached image)")
    eng = ur.dev._engines[0]
    with ur.t.fast_hold():
        assert not ur.t._fast.enabled(0)
        used = dict(wait_used(ur, base, len(reqs)))
        assert eng.inflight == 0 and eng.stats["reaped"] > 0
    for k, req in enumerate(reqs):
        assert ur.d.result(req) == (S_OK, chunk(ur, k))
        assert used[req.head] == 65537
    assert ur.t._fast.enabled(0)
    assert ur.read(8) == (S_OK, ur.disk[4096:8192])


def test_requests_in_flight_complete_in_c(ur):
    settle(ur)
    reqs, base = in_flight(ur)
    if reqs is None:
        pytest.skip("every read completed inside io_uring_enter (tmpfs or cached image)")
    used = dict(wait_used(ur, base, len(reqs)))
    for k, req in enumerate(reqs):
        assert ur.d.result(req) == (S_OK, chunk(ur, k))
    barrier(ur.loop)
    assert ur.dev._engines[0].stats["reaped"] == 0 and len(used) == len(reqs)


def test_pause_and_snapshot_see_nothing_in_flight(ur):
    settle(ur)
    reqs, base = in_flight(ur)
    if reqs is None:
        pytest.skip("every read completed inside io_uring_enter (tmpfs or cached image)")
    ur.loop.pause()
    try:
        assert ur.dev._engines[0].inflight == 0           # finished as the loop parked
        st = ur.t.state()
        q = st["queues"][0]
        assert q["next_avail"] == q["next_used"]
    finally:
        ur.loop.resume()
    for k, req in enumerate(reqs):
        assert ur.d.result(req) == (S_OK, chunk(ur, k))


def test_reset_with_requests_in_flight_drops_them(ur):
    settle(ur)
    if in_flight(ur)[0] is None:
        pytest.skip("every read completed inside io_uring_enter (tmpfs or cached image)")
    ur.t.reset()
    assert ur.dev._engines[0].inflight == 0 and not ur.t._fast.enabled(0)


def test_broken_ring_leaves_nothing_in_flight_once_paused(ur):
    """A guest breaks its ring while reads are in flight (a head out of the
    table, as fuzz corpus uring-broken-mid-batch does): the queue needs a
    reset and no used element can go out, but the kernel still owns those
    buffers; pausing (what a snapshot does) must wait for them, not leave
    them writing guest RAM behind a paused VM."""
    settle(ur)
    eng = ur.dev._engines[0]
    reqs, base = in_flight(ur)
    if reqs is None:
        pytest.skip("every read completed inside io_uring_enter (tmpfs or cached image)")
    q = ur.d.queues[0]
    q.put_avail(q.size + 3)                            # head index out of the table
    ur.kick()
    assert until(lambda: ur.t.status & vd.DEVICE_NEEDS_RESET)
    ur.loop.pause()
    try:
        assert eng.inflight == 0
        assert ur.t.state()["device"] is not None      # the snapshot path: nothing in flight
        assert eng.inflight == 0
    finally:
        ur.loop.resume()
    assert ur.d.init()                                 # the driver starts over
    assert ur.t._fast.enabled(0)
    assert ur.read(8) == (S_OK, ur.disk[4096:8192])
