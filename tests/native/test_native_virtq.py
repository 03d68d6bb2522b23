"""native/src/virtq.c and blk.c through cffi, without the Python device."""
import os
import random
import struct

import pytest

from vmm.memory import GuestMemory, MiB
from vmm.native import ffi, lib
from vmm.virtio.queue import (E_HEAD, E_LOOP, E_RANGE, E_REQ, E_RING, NativeRing, PyRing,
                              QueueError, Virtqueue, native_mem)

NEXT, WRITE, INDIRECT = 1, 2, 4


@pytest.fixture(scope="module")
def mem():
    m = GuestMemory(16 * MiB)
    yield m
    m.close()


def two_region_mem():
    """Two adjacent guest regions backed by separate host buffers."""
    bufs = [ffi.new("uint8_t[]", 4096), ffi.new("uint8_t[]", 4096)]
    m = ffi.new("struct pv_mem *")
    m.nregions = 2
    for i, b in enumerate(bufs):
        m.r[i].gpa, m.r[i].size, m.r[i].host = 4096 * i, 4096, b
    return m, bufs


def test_layouts():
    assert ffi.sizeof("struct iovec") == 16
    assert ffi.offsetof("struct iovec", "iov_len") == 8
    assert lib.PV_VQ_MAX_SIZE >= 256 and lib.PV_MEM_MAX_REGIONS >= 2


@pytest.mark.parametrize("gpa,length,ok", [
    (0, 4096, True), (4000, 96, True), (4096, 4096, True), (8192, 0, True),
    (4000, 200, False),                   # straddles two regions: refused
    (8000, 200, False), (8193, 0, False), (2 ** 64 - 16, 32, False), (16, 2 ** 64 - 8, False),
])
def test_translate(gpa, length, ok):
    m, bufs = two_region_mem()
    host = ffi.new("void **")
    r = lib.pv_mem_translate(m, gpa, length, host)
    assert (r == 0) == ok
    if ok and length:
        region = gpa // 4096
        assert int(ffi.cast("uintptr_t", host[0])) == \
            int(ffi.cast("uintptr_t", bufs[region])) + gpa % 4096


def vq_of(mem, size=8, desc=0x1000, avail=0x2000, used=0x3000, flags=0):
    pm = native_mem(mem)
    vq = ffi.new("struct pv_vq *")
    return lib.pv_vq_init(vq, pm, size, desc, avail, used, flags), vq, pm


@pytest.mark.parametrize("kw", [dict(size=0), dict(size=6), dict(size=2048), dict(desc=0x1008),
                                dict(avail=0x2001), dict(used=0x3002),
                                dict(used=16 * MiB - 8), dict(desc=2 ** 64 - 16)])
def test_init_rejects(mem, kw):
    r, vq, _ = vq_of(mem, **kw)
    assert r == -E_RING and vq.broken == E_RING
    chain = ffi.new("struct pv_chain *")
    assert lib.pv_vq_pop(vq, chain) == -E_RING      # a failed queue stays unusable


def zero(mem):
    mem.view(0, 0x10000)[:] = 0


def test_pop_push_and_barrier_fields(mem):
    zero(mem)
    r, vq, pm = vq_of(mem, flags=lib.PV_VQ_F_EVENT_IDX)
    assert r == 0
    chain = ffi.new("struct pv_chain *")
    assert lib.pv_vq_pop(vq, chain) == 0
    mem.write(0x1000 + 16 * 2, struct.pack("<QIHH", 0x8000, 100, NEXT, 5))
    mem.write(0x1000 + 16 * 5, struct.pack("<QIHH", 0x9000, 7, WRITE, 0))
    mem.write_int(0x2004, 2, 2)                     # avail.ring[0] = 2
    mem.write_int(0x2002, 1, 2)                     # avail.idx = 1
    assert lib.pv_vq_pop(vq, chain) == 1
    assert (chain.head, chain.nseg, chain.nread, chain.read_len, chain.write_len) == (2, 2, 1, 100, 7)
    assert int(ffi.cast("uintptr_t", chain.iov[1].iov_base)) == mem.host_addr(0x9000)
    assert lib.pv_vq_pop(vq, chain) == 0
    lib.pv_vq_push(vq, 2, 7)
    assert mem.read(0x3000, 12) == struct.pack("<HHII", 0, 1, 2, 7)
    assert lib.pv_vq_need_interrupt(vq) == 1        # first decision always signals
    assert lib.pv_vq_enable_notify(vq) == 0
    assert mem.read_int(0x3004 + 8 * 8, 2) == 1     # avail_event = last_avail
    mem.write_int(0x2002, 2, 2)
    assert lib.pv_vq_enable_notify(vq) == 1         # raced: more work


@pytest.mark.parametrize("event,old,new,expect", [
    (0, 0, 1, True), (5, 3, 6, True), (5, 3, 5, False), (5, 6, 9, False),
    (0xFFFF, 0xFFFE, 0, True), (10, 0, 10, False), (9, 0, 10, True),
])
def test_vring_need_event(mem, event, old, new, expect):
    zero(mem)
    r, vq, pm = vq_of(mem, flags=lib.PV_VQ_F_EVENT_IDX)
    vq.signalled_used, vq.signalled_valid, vq.used_idx = old, 1, new
    mem.write_int(0x2004 + 2 * 8, event, 2)         # used_event
    assert lib.pv_vq_need_interrupt(vq) == expect


def test_no_interrupt_flag(mem):
    zero(mem)
    r, vq, pm = vq_of(mem)
    assert lib.pv_vq_need_interrupt(vq) == 1
    mem.write_int(0x2000, 1, 2)
    assert lib.pv_vq_need_interrupt(vq) == 0


def test_native_and_python_rings_agree_on_random_chains(mem):
    """Fuzz: random descriptor tables; both walkers give the same chains or
    the same error, and neither crashes."""
    rnd = random.Random(1234)
    size = 16
    q = Virtqueue(0, size)
    q.desc, q.driver, q.device = 0x1000, 0x2000, 0x3000
    outcomes = set()
    for trial in range(400):
        zero(mem)
        for i in range(size):
            addr = rnd.choice([0x8000 + 64 * i, 0x4000, mem.end - 8, mem.end + 64, 2 ** 64 - 8])
            ln = rnd.choice([0, 1, 16, 48, 64, 4097])
            flags = rnd.choice([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, NEXT | INDIRECT])
            mem.write(0x1000 + 16 * i, struct.pack("<QIHH", addr, ln, flags, rnd.randrange(size + 2)))
        for k in range(32):                          # possible indirect tables at 0x4000
            mem.write(0x4000 + 16 * k, struct.pack("<QIHH", 0x9000, rnd.choice([1, 8]),
                                                   rnd.choice([0, NEXT, WRITE, NEXT | WRITE]),
                                                   rnd.randrange(6)))
        n = rnd.choice([1, 3, size, size + 1])
        for k in range(min(n, size)):
            mem.write_int(0x2004 + 2 * k, rnd.randrange(size + 1), 2)
        mem.write_int(0x2002, n, 2)
        results = []
        for cls in (NativeRing, PyRing):
            ring = cls(mem, q, event_idx=True, indirect=True)
            got = []
            try:
                while (c := ring.pop()) is not None:
                    got.append((c.head, [bytes(v) for v in c.readable],
                                [len(v) for v in c.writable]))
            except QueueError as e:
                got.append(("error", e.code))
            results.append(got)
        assert results[0] == results[1], trial
        outcomes.add(results[0][-1][0] if results[0] else "empty")
    assert "error" in outcomes and len(outcomes) > 2


def buf(data):
    return ffi.new("uint8_t[]", list(data))   # (bytes would add a NUL)


def chain_of(segments):
    """A pv_chain over host buffers: [(cdata buffer, writable)]."""
    c = ffi.new("struct pv_chain *")
    c.nseg = len(segments)
    for i, (buf, w) in enumerate(segments):
        c.iov[i].iov_base = buf
        c.iov[i].iov_len = len(buf)
        if w:
            c.write_len += len(buf)
        else:
            c.nread += 1
            c.read_len += len(buf)
    return c


@pytest.fixture
def blk(tmp_path):
    path = tmp_path / "img"
    path.write_bytes(os.urandom(64 * 1024))
    fd = os.open(path, os.O_RDWR)
    b = ffi.new("struct pv_blk *")
    b.fd, b.capacity = fd, 128
    yield b, path
    os.close(fd)


def test_blk_request_byte_framing(blk):
    """Header split byte by byte, data and status sharing the last buffer."""
    b, path = blk
    hdr = struct.pack("<IIQ", 0, 0, 3)
    segs = [(buf(hdr[i:i + 1]), False) for i in range(16)]
    first = ffi.new("uint8_t[]", 1000)
    last = ffi.new("uint8_t[]", 25)                 # 24 data bytes + status
    last[24] = 0xEE
    c = chain_of(segs + [(first, True), (last, True)])
    used = ffi.new("uint32_t *")
    assert lib.pv_blk_request(b, c, used) == 0 and used[0] == 1025
    disk = path.read_bytes()
    assert bytes(ffi.buffer(first)) + bytes(ffi.buffer(last, 24)) == disk[3 * 512:4 * 512 + 512]
    assert last[24] == 0


def test_blk_request_malformed_writes_nothing(blk):
    b, path = blk
    hdr = buf(struct.pack("<IIQ", 1, 0, 0))
    data = buf(b"\x55" * 512)
    status = buf(b"\x99")
    used = ffi.new("uint32_t *")
    before = path.read_bytes()
    for segs in ([(hdr, False), (data, False)],                    # no status
                 [(hdr, False), (data, True), (status, True)],     # OUT data writable
                 [(ffi.new("uint8_t[]", 15), False), (status, True)]):  # header short
        assert lib.pv_blk_request(b, chain_of(segs), used) == -E_REQ
    assert status[0] == 0x99 and path.read_bytes() == before


def test_bench_pread(blk):
    b, path = blk
    buf = ffi.new("uint8_t[]", 4096)
    offs = ffi.new("uint64_t[]", [0, 4096, 8192])
    assert lib.pv_bench_pread(b.fd, buf, 4096, offs, 3) == 3 * 4096
    assert bytes(buf) == path.read_bytes()[8192:12288]
    assert lib.pv_bench_pread(-1, buf, 4096, offs, 1) < 0


def test_errors_have_messages():
    from vmm.virtio.queue import ERRORS
    for code in (E_HEAD, E_LOOP, E_RANGE, E_REQ, E_RING):
        assert str(QueueError(code, 0)).startswith("queue 0: ") and ERRORS[code]


def test_two_regions_around_the_mmio_hole():
    """RAM above 4 GiB is a second region: rings and buffers may live there;
    a buffer running from low RAM into the hole is refused."""
    from vmm.memory import GiB, MMIO_HOLE_START
    big = GuestMemory(3 * GiB + 64 * MiB)
    try:
        assert len(big.regions) == 2
        hi = big.regions[1][0]
        q = Virtqueue(0, 8)
        q.desc, q.driver, q.device = hi, hi + 0x1000, hi + 0x2000
        big.write(hi, struct.pack("<QIHH", hi + 0x8000, 64, NEXT, 1)
                  + struct.pack("<QIHH", MMIO_HOLE_START - 4096, 4096, WRITE, 0))
        big.write(hi + 0x1000, struct.pack("<HHHH", 0, 2, 0, 1))
        big.write(hi + 16, struct.pack("<QIHH", MMIO_HOLE_START - 4096, 4096, WRITE, 0))
        big.write(hi + 32, struct.pack("<QIHH", MMIO_HOLE_START - 256, 512, WRITE, 0))
        for cls in (NativeRing, PyRing):
            ring = cls(big, q)
            c = ring.pop()
            assert c.head == 0 and [len(v) for v in c.readable + c.writable] == [64, 4096]
            assert c.writable[0].ctypes.data == big.host_addr(MMIO_HOLE_START - 4096)
            big.write_int(hi + 0x1004 + 2, 2, 2)          # avail.ring[1] = 2: straddles
            with pytest.raises(QueueError) as e:
                ring.pop()
            assert e.value.code == E_RANGE
    finally:
        big.close()
