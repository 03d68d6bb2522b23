"""Write the seed corpora of the native fuzz targets (native/fuzz/corpus/<target>/).

    python3 native/fuzz/make_seeds.py

Each seed is a well-formed guest, laid out as fuzz_common.h reads it: a
32-byte header (queue size, flags, ring addresses, starting indexes, target
bytes), guest RAM from byte 32 (region 0 at gpa 0, region 1 at gpa 0x3000,
then the region ending at 2^64), and ops read backwards from the end.
Seeds give the fuzzer real chains (direct, indirect, split, wrapping
indexes) to mutate; random bytes alone rarely form a ring.
"""
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
REG = 0x1000
R1 = 0x3000
NEXT, WRITE, INDIRECT = 1, 2, 4


class Guest:
    def __init__(self, qlog2=4, event_idx=True, indirect=True, desc=0x0, avail=0x100,
                 used=0x200, last_avail=0, used_idx=0, extra=b""):
        self.size = 1 << qlog2
        flags = (1 if event_idx else 0) | (2 if indirect else 0)
        self.hdr = struct.pack("<BBHHHHH", qlog2, flags, desc, avail, used, last_avail, used_idx)
        self.hdr = (self.hdr + extra).ljust(32, b"\0")
        self.mem = bytearray(2 * REG)        # regions 0 and 1 (region 2 stays zero)
        self.desc, self.avail, self.used = desc, avail, used
        self.avail_idx = last_avail
        self.used_idx0 = used_idx
        self.next_desc = 0
        self.heap = 0x400
        self.ops = b""
        self.put(used + 2, struct.pack("<H", used_idx))

    def off(self, gpa):
        return gpa if gpa < REG else gpa - R1 + REG

    def put(self, gpa, data):
        o = self.off(gpa)
        self.mem[o:o + len(data)] = data

    def alloc(self, n, fill=0):
        gpa, self.heap = self.heap, (self.heap + n + 15) & ~15
        if self.heap > REG:              # continue in region 1
            gpa, self.heap = R1, (R1 + n + 15) & ~15
        self.put(gpa, bytes([fill]) * n)
        return gpa

    def desc_at(self, table, i, addr, length, flags, nxt=0):
        self.put(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def chain(self, segs, indirect=False):
        """segs: [(gpa, len, writable)]; offers the chain; returns its head."""
        n = len(segs)
        if indirect:
            table = self.alloc(16 * n)
            for k, (g, ln, w) in enumerate(segs):
                self.desc_at(table, k, g, ln, (WRITE if w else 0) | (NEXT if k + 1 < n else 0),
                             k + 1 if k + 1 < n else 0)
            head = self.next_desc
            self.next_desc += 1
            self.desc_at(self.desc, head, table, 16 * n, INDIRECT)
        else:
            head = self.next_desc
            for k, (g, ln, w) in enumerate(segs):
                i = self.next_desc
                self.next_desc += 1
                last = k + 1 == n
                self.desc_at(self.desc, i, g, ln, (WRITE if w else 0) | (0 if last else NEXT),
                             0 if last else i + 1)
        self.put(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.put(self.avail + 2, struct.pack("<H", self.avail_idx))
        return head

    def op(self, *values):
        """Ops in execution order: (value, nbytes) pairs or single op bytes."""
        for v in values:
            v, n = v if isinstance(v, tuple) else (v, 1)
            self.ops += v.to_bytes(n, "big")

    def bytes(self):
        # trailing zeros may be meaningful (a ring entry naming head 0):
        # keep 64 of them before the ops, which land in guest RAM too
        used_mem = bytes(self.mem).rstrip(b"\0")
        used_mem = bytes(self.mem[:len(used_mem) + 64])
        return self.hdr + used_mem + bytes(reversed(self.ops))


def write(target, name, data):
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def virtq_seeds():
    POP, PUSH, IRQ, NOTIFY, WR = 0, 2, 3, 4, 5
    for name, kw in (("direct-indirect-event-idx", {}),
                     ("no-event-idx", dict(event_idx=False)),
                     ("wrapping-indexes", dict(last_avail=0xFFFE, used_idx=0xFFFE)),
                     ("ring-in-region1", dict(desc=0x3000, avail=0x3100, used=0x3200))):
        g = Guest(**kw)
        if "desc" in kw:
            g.heap = 0x400
        a, b, c = g.alloc(16), g.alloc(64), g.alloc(32)
        g.chain([(a, 16, False), (b, 64, True)])
        g.chain([(a, 16, False), (R1 + 0x800, 8, False), (c, 32, True)], indirect=True)
        g.chain([(b, 64, True)])
        g.op(POP, POP, POP, POP, (PUSH, 1), (1, 2), (80, 4), (PUSH, 1), (0, 2), (1, 4),
             IRQ, NOTIFY, 0x84, WR, (g.avail + 2, 2), (0, 1), (0, 2), POP, IRQ)
        write("virtq", name, g.bytes())
    # a loop (next pointing back) and an indirect table pointing past RAM
    g = Guest()
    g.desc_at(0, 0, 0x400, 16, NEXT, 1)
    g.desc_at(0, 1, 0x400, 16, NEXT, 0)
    g.put(0x102, struct.pack("<HH", 1, 0))
    g.op(POP, POP)
    write("virtq", "loop", g.bytes())
    g = Guest()
    g.desc_at(0, 0, 0x2FF0, 32, INDIRECT)
    g.put(0x102, struct.pack("<HH", 1, 0))
    g.op(POP, POP)
    write("virtq", "indirect-outside-ram", g.bytes())


def blk_seeds():
    T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WZ = 0, 1, 4, 8, 11, 13
    KICK, WR = 0, 1

    def req(g, typ, sector=0, payload=b"", read_len=0, split=1, indirect=False):
        h = g.alloc(16)
        g.put(h, struct.pack("<IIQ", typ, 0, sector))
        segs = [(h, 16, False)]
        n = len(payload) or read_len
        for k in range(split):
            a, b = n * k // split, n * (k + 1) // split
            if b > a:
                gpa = g.alloc(b - a)
                if payload:
                    g.put(gpa, payload[a:b])
                segs.append((gpa, b - a, not payload))
        segs.append((g.alloc(1, 0xFF), 1, True))
        g.chain(segs, indirect=indirect)

    def seg(sector, num, flags=0):
        return struct.pack("<QII", sector, num, flags)

    cases = {
        "read": [dict(typ=T_IN, sector=1, read_len=512)],
        "read-split-indirect": [dict(typ=T_IN, sector=2, read_len=1024, split=3, indirect=True)],
        "write": [dict(typ=T_OUT, sector=3, payload=b"\x11" * 512)],
        "flush-getid": [dict(typ=T_FLUSH), dict(typ=T_GET_ID, read_len=20)],
        "discard": [dict(typ=T_DISCARD, payload=seg(0, 8) + seg(16, 8))],
        "write-zeroes": [dict(typ=T_WZ, payload=seg(8, 8, 1) + seg(40, 24))],
        "mixed": [dict(typ=T_IN, sector=0, read_len=512), dict(typ=T_OUT, sector=63,
                  payload=b"\x22" * 512), dict(typ=T_WZ, payload=seg(1, 1)),
                  dict(typ=99), dict(typ=T_IN, sector=64, read_len=512)],
    }
    for name, reqs in cases.items():
        for extra in (b"", b"\x0a"):     # bits 2-3: 32 segments; bit1: no ZERO_RANGE
            g = Guest(extra=extra or b"\x08")
            for r in reqs:
                req(g, **r)
            g.op(KICK, WR, (0x400 + 16 + 8 if "discard" in name or "zero" in name else 0x400, 2),
                 (3, 1), (0x7FFF_FFFF_FFFF_FFFF, 8), KICK, KICK)
            write("blk", name + ("-nozr" if extra else ""), g.bytes())
            if not extra:       # the I/O loop's fast path: the same guests, polling off/on
                write("fast", name, g.bytes())
                g2 = Guest(extra=b"\x08\x00\x00\x02")
                for r in reqs:
                    req(g2, **r)
                g2.ops = g.ops
                write("fast", name + "-poll", g2.bytes())
                g3 = Guest(extra=b"\x08\x00\x00\x04")     # bit2: MSI-X (no ISR bit)
                for r in reqs:
                    req(g3, **r)
                g3.ops = g.ops
                write("fast", name + "-msix", g3.bytes())
            if not extra:       # the io_uring engine: submit, reap, reap waiting for all
                g.ops = b""
                g.op(0, 2, 0x82, 3, (0x400, 2), (3, 1), (0, 8), 0, 0x82)
                write("uring", name, g.bytes())


def net_seeds():
    SEND, RUN, WR = 0, 1, 2
    # bit3: through the fast path (native/src/fastnet.c), bit4: an MSI-X interrupt
    for name, flags in (("rx", 0), ("rx-mrg", 1), ("rx-legacy-hdr", 2), ("tx", 4),
                        ("fast-rx", 8), ("fast-rx-mrg-msix", 1 | 8 | 16), ("fast-tx", 4 | 8),
                        ("fast-tx-msix", 4 | 8 | 16)):
        g = Guest(extra=bytes([flags]))
        if flags & 4:
            for ln in (60, 200):
                h = g.alloc(12)
                d = g.alloc(ln, 0x33)
                g.chain([(h, 12, False), (d, ln, False)], indirect=ln > 100)
            g.op(RUN, WR, (g.avail + 2, 2), (1, 1), (3, 2), RUN)
        else:
            for k in range(4):
                g.chain([(g.alloc(128), 128, True), (g.alloc(256), 256, True)], indirect=k == 3)
            g.op((SEND, 1), (100, 2), (0x44, 1), RUN, (SEND, 1), (700, 2), (0x55, 1), RUN,
                 (SEND, 1), (5, 2), (0, 1), RUN, (0x80, 1), (3000, 2), (1, 1), RUN)
        write("net", name, g.bytes())


def vsock_seeds():
    TX, RX, POLL, WRITE, READ, SHUT = 0, 2, 4, 5, 6, 7

    def pkt(op, length=0, src_port=2000, dst_port=1000, buf_alloc=65536, fwd_cnt=0, flags=0):
        return struct.pack("<QQIIIHHIII", 3, 2, src_port, dst_port, length, 1, op, flags,
                           buf_alloc, fwd_cnt)

    # receive queue rings at 0x800 (descriptors), 0x900, 0xA00
    rxq = struct.pack("<HHH", 0x800, 0x900, 0xA00)
    for name, extra, plan in (
            ("rw-both-ways", bytes([0, 1, 1, 4]), "rw"),
            ("three-conns-small-credit", bytes([2, 0, 0, 0]), "rw"),
            ("credit-and-shutdown", bytes([0, 1, 0, 2]), "ctl")):
        g = Guest(extra=extra + rxq)
        g.heap = 0xC00
        for k in range(3):
            h = g.alloc(44)
            d = g.alloc(200, 0x41 + k)
            g.put(h, pkt(5, 200, src_port=2000 + k, dst_port=1000 + k))
            g.chain([(h, 44, False), (d, 200, False)], indirect=k == 2)
        if plan == "ctl":
            for op in (6, 7, 4):            # CREDIT_UPDATE, CREDIT_REQUEST, SHUTDOWN
                h = g.alloc(44)
                g.put(h, pkt(op, fwd_cnt=100))
                g.chain([(h, 44, False)])
        g.desc, g.avail, g.next_desc, g.avail_idx = 0x800, 0x900, 0, 0
        for k in range(3):
            g.chain([(g.alloc(44), 44, True), (g.alloc(1024), 1024, True)], indirect=k == 1)
        g.op((WRITE, 1), (100, 2), (0x61, 1), (WRITE | 0x10, 1), (3000, 2), (0x62, 1), POLL,
             TX, RX, READ, POLL, RX, (SHUT, 1), POLL, RX, TX, (9, 1), (0, 1), (5, 4), (6, 4), RX)
        write("vsock", name, g.bytes())
    # a 12000-byte RW (three descriptors over the same 4000 bytes) fills the
    # small socket buffer: the rest waits in pend until the application
    # reads and EPOLLOUT flushes it; then SHUTDOWN both ways (RST after flush)
    g = Guest(extra=bytes([0, 2, 2, 4]) + rxq)
    g.heap = 0xC00
    h, d = g.alloc(44), R1
    g.put(h, pkt(5, 12000, buf_alloc=65536))
    g.put(d, bytes([0x5A]) * 4000)
    g.chain([(h, 44, False), (d, 4000, False), (d, 4000, False), (d, 4000, False)])
    s = g.alloc(44)
    g.put(s, pkt(4, flags=3))                       # SHUT_RCV | SHUT_SEND
    g.chain([(s, 44, False)])
    g.desc, g.avail, g.next_desc, g.avail_idx = 0x800, 0x900, 0, 0
    for k in range(2):
        g.chain([(g.alloc(44), 44, True), (g.alloc(512), 512, True)])
    g.op(TX, READ, POLL, (9, 1), (1, 1), READ, POLL, TX, POLL, RX, RX, READ)
    write("vsock", "pend-flush-shutdown", g.bytes())


if __name__ == "__main__":
    vsock_seeds()
    virtq_seeds()
    blk_seeds()
    net_seeds()
