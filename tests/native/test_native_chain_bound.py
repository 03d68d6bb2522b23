"""Issue #14: a chain's buffers total less than 4 GiB (the used ring's len is
32 bits, virtio 1.1 §2.6.8; rust-vmm's vm-virtio bounds it the same way), so
no device ever reports a truncated used length."""
import mmap
import struct

import pytest

from vmm.native import ffi, lib
from vmm.virtio.queue import E_TOO_BIG, MAX_CHAIN_BYTES

NEXT, WRITE = 1, 2
BIG = 1 << 32                 # guest-physical base of the large region
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)   # Linux value


@pytest.fixture(scope="module")
def big():
    """Region 0: 64 KiB of real memory for the rings; region 1: 8 GiB of
    reserved address space at 4 GiB (never touched: pop only translates)."""
    ring = ffi.new("uint8_t[]", 65536)
    res = mmap.mmap(-1, 8 << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE)
    pm = ffi.new("struct pv_mem *")
    pm.nregions = 2
    pm.r[0].gpa, pm.r[0].size, pm.r[0].host = 0, 65536, ring
    pm.r[1].gpa, pm.r[1].size, pm.r[1].host = BIG, 8 << 30, ffi.from_buffer(res)
    yield pm, ring
    del pm
    res.close()


def offer(pm, ring, descs):
    """Queue of 8 at desc 0x1000, avail 0x2000, used 0x3000; one chain."""
    ffi.memmove(ring, bytes(65536), 65536)
    vq = ffi.new("struct pv_vq *")
    assert lib.pv_vq_init(vq, pm, 8, 0x1000, 0x2000, 0x3000, 0) == 0
    for i, (addr, length, flags) in enumerate(descs):
        nxt = i + 1 if i + 1 < len(descs) else 0
        flags |= NEXT if i + 1 < len(descs) else 0
        ffi.memmove(ring + 0x1000 + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt), 16)
    ffi.memmove(ring + 0x2004, struct.pack("<H", 0), 2)
    ffi.memmove(ring + 0x2002, struct.pack("<H", 1), 2)
    return vq


@pytest.mark.parametrize("payload,ok", [
    (MAX_CHAIN_BYTES - 17, True),          # 16 + payload + 1 == 2^32 - 1: the largest
    (MAX_CHAIN_BYTES - 16, False),         # 2^32: would be reported as used len 0
    (0xFFFFFFFF, False),
])
def test_chain_total_bounded(big, payload, ok):
    pm, ring = big
    vq = offer(pm, ring, [(BIG, 16, 0), (BIG + 4096, payload, WRITE), (BIG + 8192, 1, WRITE)])
    c = ffi.new("struct pv_chain *")
    r = lib.pv_vq_pop(vq, c)
    if ok:
        assert r == 1 and c.read_len + c.write_len == MAX_CHAIN_BYTES
    else:
        assert r == -E_TOO_BIG and vq.broken == E_TOO_BIG


def test_many_descriptors_adding_past_4gib(big):
    """Five 1 GiB buffers: each is fine, their sum is not."""
    pm, ring = big
    vq = offer(pm, ring, [(BIG + (i << 30), 1 << 30, WRITE) for i in range(5)])
    c = ffi.new("struct pv_chain *")
    assert lib.pv_vq_pop(vq, c) == -E_TOO_BIG
