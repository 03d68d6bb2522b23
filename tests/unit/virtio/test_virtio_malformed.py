"""Malformed chains (virtio 1.1 §2.6.5, §2.1.2): the device sets
DEVICE_NEEDS_RESET, sends a config change interrupt, stops the queue; the
VMM keeps running, nothing is written (image, guest buffers, guards), and a
reset brings the device back."""
import struct

import pytest

from vmm.virtio import device as vd
from vmm.testing.mockdriver import T_IN, T_OUT
from vmm.virtio.queue import (E_AVAIL_IDX, E_HEAD, E_INDIRECT, E_LOOP, E_NEXT, E_ORDER, E_RANGE,
                              E_REQ, VRING_DESC_F_INDIRECT as IND, VRING_DESC_F_NEXT as NXT,
                              VRING_DESC_F_WRITE as W)

PAT = 0x3C


class Bufs:
    """Guard-fenced buffers: an OUT header for sector 0, an IN header, data, status."""

    def __init__(self, d, mem):
        self.out_hdr = d.alloc(16, 16, 16)
        mem.write(self.out_hdr, struct.pack("<IIQ", T_OUT, 0, 0))
        self.in_hdr = d.alloc(16, 16, 16)
        mem.write(self.in_hdr, struct.pack("<IIQ", T_IN, 0, 0))
        self.data = d.alloc(512, 16, 16, fill=PAT)
        self.status = d.alloc(1, 1, 16, fill=0xFF)
        self.mem = mem

    def untouched(self):
        return (self.mem.read(self.data, 512) == bytes([PAT]) * 512
                and self.mem.read(self.status, 1) == b"\xff")


def table(d, entries):
    """An indirect table of (addr, len, flags, next)."""
    gpa = d.alloc(16 * max(1, len(entries)), 16, 16)
    for i, e in enumerate(entries):
        d.mem.write(gpa + 16 * i, struct.pack("<QIHH", *e))
    return gpa


def cases(d, mem, b, size):
    """name -> (descriptors {index: (addr, len, flags, next)}, head, expected error)."""
    end = mem.end
    return {
        "too_short_header": ({0: (b.out_hdr, 8, NXT, 1), 1: (b.status, 1, W, 0)}, 0, E_REQ),
        "no_status": ({0: (b.out_hdr, 16, NXT, 1), 1: (b.data, 512, 0, 0)}, 0, E_REQ),
        "status_readable": ({0: (b.out_hdr, 16, NXT, 1), 1: (b.data, 512, NXT, 2),
                             2: (b.status, 1, 0, 0)}, 0, E_REQ),
        "in_data_readable": ({0: (b.in_hdr, 16, NXT, 1), 1: (b.data, 512, NXT, 2),
                              2: (b.status, 1, W, 0)}, 0, E_REQ),
        "out_data_writable": ({0: (b.out_hdr, 16, NXT, 1), 1: (b.data, 512, NXT | W, 2),
                               2: (b.status, 1, W, 0)}, 0, E_REQ),
        "readable_after_writable": ({0: (b.status, 1, W | NXT, 1), 1: (b.out_hdr, 16, NXT, 2),
                                     2: (b.data, 512, 0, 0)}, 0, E_ORDER),
        "buffer_past_ram": ({0: (b.out_hdr, 16, NXT, 1), 1: (end + 4096, 512, NXT, 2),
                             2: (b.status, 1, W, 0)}, 0, E_RANGE),
        "buffer_straddles_ram_end": ({0: (b.out_hdr, 16, NXT, 1), 1: (end - 256, 512, NXT, 2),
                                      2: (b.status, 1, W, 0)}, 0, E_RANGE),
        "buffer_addr_wraps": ({0: (b.out_hdr, 16, NXT, 1), 1: (2 ** 64 - 256, 512, NXT, 2),
                               2: (b.status, 1, W, 0)}, 0, E_RANGE),
        "loop": ({0: (b.out_hdr, 16, NXT, 1), 1: (b.data, 512, NXT, 0)}, 0, E_LOOP),
        "self_loop": ({3: (b.out_hdr, 16, NXT, 3)}, 3, E_LOOP),
        "next_out_of_table": ({0: (b.out_hdr, 16, NXT, size + 5)}, 0, E_NEXT),
        "head_out_of_table": ({}, size, E_HEAD),
        "nested_indirect": ({0: (table(d, [(b.out_hdr, 16, NXT, 1),
                                           (table(d, [(b.status, 1, W, 0)]), 16, IND, 0)]),
                                 32, IND, 0)}, 0, E_INDIRECT),
        "indirect_len_not_multiple_of_16": ({0: (table(d, [(b.out_hdr, 16, 0, 0)]), 24, IND, 0)},
                                            0, E_INDIRECT),
        "indirect_len_zero": ({0: (table(d, []), 0, IND, 0)}, 0, E_INDIRECT),
        "indirect_too_long": ({0: (b.data, 16 * (size + 1), IND, 0)}, 0, E_INDIRECT),
        "indirect_with_next": ({0: (table(d, [(b.out_hdr, 16, 0, 0)]), 16, IND | NXT, 1),
                                1: (b.status, 1, W, 0)}, 0, E_INDIRECT),
        "indirect_table_past_ram": ({0: (end - 16, 32, IND, 0)}, 0, E_RANGE),
        "indirect_loop": ({0: (table(d, [(b.out_hdr, 16, NXT, 1), (b.data, 512, NXT, 0)]),
                               32, IND, 0)}, 0, E_LOOP),
        "indirect_next_out_of_table": ({0: (table(d, [(b.out_hdr, 16, NXT, 2), (b.status, 1, W, 0)]),
                                            32, IND, 0)}, 0, E_NEXT),
    }


CASE_NAMES = ["too_short_header", "no_status", "status_readable", "in_data_readable",
              "out_data_writable", "readable_after_writable", "buffer_past_ram",
              "buffer_straddles_ram_end", "buffer_addr_wraps", "loop", "self_loop",
              "next_out_of_table", "head_out_of_table", "nested_indirect",
              "indirect_len_not_multiple_of_16", "indirect_len_zero", "indirect_too_long",
              "indirect_with_next", "indirect_table_past_ram", "indirect_loop",
              "indirect_next_out_of_table"]


def check_broken(r, b, before, code):
    assert r.t.status & vd.DEVICE_NEEDS_RESET
    assert r.t.interrupt_status & vd.INT_CONFIG
    assert r.t.needs_reset_reason is not None
    assert r.dev._ring.broken == code
    assert r.disk() == before
    assert b.untouched()
    assert r.d.check_guards() == []


def recover(r):
    """§2.1.2: the driver resets and re-initializes; the device works again."""
    r.d.reset_arena()
    assert r.d.init()
    assert r.t.status & vd.DEVICE_NEEDS_RESET == 0
    status, data, _ = r.d.run(T_IN, 0, read_len=512)
    assert status == 0 and data == r.disk()[:512]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_malformed_chain(rig, mem, name):
    r = rig()
    q = r.d.queues[0]
    b = Bufs(r.d, mem)
    descs, head, code = cases(r.d, mem, b, q.size)[name]
    assert {d for d in cases(r.d, mem, b, q.size)} == set(CASE_NAMES)
    before = r.disk()
    # one good request first: it completes, the bad one after it does not
    good = r.d.submit(T_IN, 1, read_len=512)
    for i, (addr, length, flags, nxt) in descs.items():
        q.write_desc(i + 100, addr, length, flags, nxt + 100 if flags & NXT else 0)
    q.put_avail(head + 100 if head < q.size else head)
    r.d.kick()
    assert [h for h, _ in q.get_used()] == [good.head]
    check_broken(r, b, before, code)
    # the queue is stopped: a valid request is not processed
    r.d.submit(T_OUT, 0, data=b"\x11" * 512)
    r.d.kick()
    assert q.get_used() == []
    assert r.disk() == before
    recover(r)


def test_avail_idx_jump(rig, mem):
    r = rig()
    q = r.d.queues[0]
    b = Bufs(r.d, mem)
    before = r.disk()
    q.avail_idx = q.size + 1
    q.publish()
    r.d.kick()
    check_broken(r, b, before, E_AVAIL_IDX)
    recover(r)


def test_indirect_not_negotiated(rig, mem):
    r = rig(features=~(1 << vd.VIRTIO_F_RING_INDIRECT_DESC))
    assert not r.d.features >> vd.VIRTIO_F_RING_INDIRECT_DESC & 1
    b = Bufs(r.d, mem)
    before = r.disk()
    r.d.submit(T_OUT, 0, data=b"\x22" * 512, indirect=True)
    r.d.kick()
    check_broken(r, b, before, E_INDIRECT)


@pytest.mark.parametrize("bad", ["desc_past_ram", "desc_misaligned", "used_misaligned",
                                 "size_not_pow2", "size_too_big"])
def test_bad_ring_at_driver_ok(rig, mem, bad):
    from vmm.virtio import mmio as m
    r = rig()
    d = r.d
    d.wr(m.STATUS, 0)
    for bit in (vd.ACKNOWLEDGE, vd.DRIVER):
        d.set_status(bit)
    d.wr(m.DRIVER_FEATURES_SEL, 1)
    d.wr(m.DRIVER_FEATURES, 1)                 # VERSION_1
    d.set_status(vd.FEATURES_OK)
    d.wr(m.QUEUE_SEL, 0)
    regs = {m.QUEUE_NUM: 16, m.QUEUE_DESC_LOW: 0x20000, m.QUEUE_DRIVER_LOW: 0x21000,
            m.QUEUE_DEVICE_LOW: 0x22000}
    regs.update({"desc_past_ram": {m.QUEUE_DESC_LOW: mem.end - 64},
                 "desc_misaligned": {m.QUEUE_DESC_LOW: 0x20008},
                 "used_misaligned": {m.QUEUE_DEVICE_LOW: 0x22002},
                 "size_not_pow2": {m.QUEUE_NUM: 12},
                 "size_too_big": {m.QUEUE_NUM: 512}}[bad])
    for reg, v in regs.items():
        d.wr(reg, v)
    d.wr(m.QUEUE_READY, 1)
    d.set_status(vd.DRIVER_OK)
    assert d.status() & vd.DEVICE_NEEDS_RESET
    assert d.rd(m.INTERRUPT_STATUS) & vd.INT_CONFIG
    assert not r.t.activated
    d.kick()                                   # ignored, no crash
    recover(r)
