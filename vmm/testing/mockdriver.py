"""A virtio driver in Python, for tests and benchmarks: it lays out
descriptor tables and rings in a GuestMemory and talks to a transport only
through its register read/write methods, as a guest would (virtio 1.1 §3.1.1
initialization, §2.6.13 supplying buffers).  Register access goes through an
adapter: MmioRegs (§4.2.3, VirtioMmio) or PciLegacyRegs (§4.1.4.8 legacy
header in BAR0: any object with read/write at BAR offsets, such as a
VirtioPciLegacy or a PortWindow on a port bus; legacy initialization per
§7.2, no FEATURES_OK, rings in the legacy layout at a page frame).

PciModernRegs (vmm/testing/pcimodern_regs.py) does the same for modern
virtio-pci (§4.1.4) through its capabilities.

Every buffer it allocates can be fenced by guard bytes; `check_guards()`
reports any guard a device overwrote.
"""
import struct
import time

from vmm.virtio import device as vd
from vmm.virtio import mmio as m
from vmm.virtio import pci_legacy as pl
from vmm.virtio.queue import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

GUARD = 0xA5
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13


class DriverError(Exception):
    pass


class DriverQueue:
    """The driver's side of one split virtqueue (§2.6)."""

    def __init__(self, drv, index, size, legacy_align=None):
        self.drv, self.mem, self.index, self.size = drv, drv.mem, index, size
        if legacy_align:      # §2.6.2 legacy layout: one block, used ring aligned
            a = legacy_align
            used_off = (16 * size + 6 + 2 * size + a - 1) // a * a
            self.desc = drv.alloc(used_off + 6 + 8 * size, a)
            self.avail, self.used = self.desc + 16 * size, self.desc + used_off
        else:
            self.desc = drv.alloc(16 * size, 16)
            self.avail = drv.alloc(6 + 2 * size, 2)
            self.used = drv.alloc(6 + 8 * size, 4)
        self.free = list(range(size))
        self.avail_idx = 0
        self.last_used = 0
        self.chains = {}              # head -> descriptor indexes to free
        self.auto_used_event = True
        self.event_idx = bool(drv.features >> vd.VIRTIO_F_RING_EVENT_IDX & 1)

    def write_desc(self, i, addr, length, flags=0, nxt=0, table=None):
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, segments, indirect=False, publish=True):
        """Make a chain of (gpa, length, writable) and offer it; returns the head."""
        n = len(segments)
        if indirect:
            table = self.drv.alloc(16 * n, 16)
            for k, (gpa, length, w) in enumerate(segments):
                flags = (VRING_DESC_F_WRITE if w else 0) | (VRING_DESC_F_NEXT if k + 1 < n else 0)
                self.write_desc(k, gpa, length, flags, k + 1 if k + 1 < n else 0, table=table)
            head = self._take(1)[0]
            self.write_desc(head, table, 16 * n, VRING_DESC_F_INDIRECT)
            self.chains[head] = [head]
        else:
            idx = self._take(n)
            for k, (gpa, length, w) in enumerate(segments):
                last = k + 1 == n
                flags = (VRING_DESC_F_WRITE if w else 0) | (0 if last else VRING_DESC_F_NEXT)
                self.write_desc(idx[k], gpa, length, flags, 0 if last else idx[k + 1])
            head = idx[0]
            self.chains[head] = idx
        self.put_avail(head, publish)
        return head

    def _take(self, n):
        if len(self.free) < n:
            raise DriverError(f"queue {self.index}: {n} descriptors wanted, {len(self.free)} free")
        taken, self.free = self.free[:n], self.free[n:]
        return taken

    def put_avail(self, head, publish=True):
        self.mem.write_int(self.avail + 4 + 2 * (self.avail_idx % self.size), head, 2)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self):
        self.mem.write_int(self.avail + 2, self.avail_idx, 2)

    @property
    def used_idx(self):
        return self.mem.read_int(self.used + 2, 2)

    def get_used(self):
        """New used elements [(id, len)], freeing their descriptors; with
        EVENT_IDX, asks for an interrupt at the next one (as Linux does)."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.mem.read(slot, 8))
            self.free.extend(self.chains.pop(head, []))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx and self.auto_used_event:
            self.set_used_event(self.last_used)
        return out

    def wait_used(self, n, timeout, poll=0.005):
        """get_used() until `n` elements came back or `timeout` seconds pass
        (a device on another thread, e.g. a Machine's I/O thread)."""
        got, deadline = [], time.monotonic() + timeout
        while len(got) < n and time.monotonic() < deadline:
            got += self.get_used()
            time.sleep(poll)
        return got

    # §2.6.7 notification suppression fields
    def set_used_event(self, value):
        self.mem.write_int(self.avail + 4 + 2 * self.size, value, 2)

    @property
    def avail_event(self):
        return self.mem.read_int(self.used + 4 + 8 * self.size, 2)

    def set_no_interrupt(self, on):
        self.mem.write_int(self.avail, 1 if on else 0, 2)


class MmioRegs:
    """virtio-mmio registers (§4.2.2) for a MockDriver."""
    features_ok = True

    def __init__(self, t):
        self.t = t

    def rd(self, off):
        return self.t.read(off, 4)

    def wr(self, off, value):
        self.t.write(off, 4, value)

    def check(self):
        if self.rd(m.MAGIC_VALUE) != m.MAGIC or self.rd(m.VERSION) != 2:
            raise DriverError("not a virtio-mmio version 2 device")

    def status(self):
        return self.rd(m.STATUS)

    def write_status(self, value):
        self.wr(m.STATUS, value)

    def device_features(self):
        f = 0
        for sel in (0, 1):
            self.wr(m.DEVICE_FEATURES_SEL, sel)
            f |= self.rd(m.DEVICE_FEATURES) << (32 * sel)
        return f

    def write_features(self, features):
        for sel in (0, 1):
            self.wr(m.DRIVER_FEATURES_SEL, sel)
            self.wr(m.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)

    def config(self, offset, size):
        return self.t.read(m.CONFIG + offset, size)

    def kick(self, q):
        self.wr(m.QUEUE_NOTIFY, q)

    def ack_interrupt(self):
        isr = self.rd(m.INTERRUPT_STATUS)
        self.wr(m.INTERRUPT_ACK, isr)
        return isr

    def setup_queues(self, drv, queue_sizes):
        queues = []
        for i in range(len(self.t.queues)):
            self.wr(m.QUEUE_SEL, i)
            if self.rd(m.QUEUE_READY):
                raise DriverError(f"queue {i} already live")
            qmax = self.rd(m.QUEUE_NUM_MAX)
            size = min(qmax, queue_sizes[i]) if queue_sizes else qmax
            q = DriverQueue(drv, i, size)
            self.wr(m.QUEUE_NUM, size)
            for reg, addr in ((m.QUEUE_DESC_LOW, q.desc), (m.QUEUE_DRIVER_LOW, q.avail),
                              (m.QUEUE_DEVICE_LOW, q.used)):
                self.wr(reg, addr & 0xFFFFFFFF)
                self.wr(reg + 4, addr >> 32)
            self.wr(m.QUEUE_READY, 1)
            queues.append(q)
        return queues


class PciLegacyRegs:
    """Legacy virtio-pci header in BAR0 (§4.1.4.8), accessed with the sizes
    Linux's virtio_pci_legacy uses (ioread/iowrite 8, 16 and 32)."""
    features_ok = False         # §7.2: legacy drivers do not set FEATURES_OK
    MAX_QUEUES = 64

    def __init__(self, t):
        self.t = t

    def check(self):
        pass                    # identification is by PCI IDs, not in BAR0

    def status(self):
        return self.t.read(pl.STATUS, 1)

    def write_status(self, value):
        self.t.write(pl.STATUS, 1, value)

    def device_features(self):
        return self.t.read(pl.HOST_FEATURES, 4)

    def write_features(self, features):
        self.t.write(pl.GUEST_FEATURES, 4, features & 0xFFFFFFFF)

    def config(self, offset, size):
        return self.t.read(pl.CONFIG + offset, size)

    def kick(self, q):
        self.t.write(pl.QUEUE_NOTIFY, 2, q)

    def ack_interrupt(self):
        return self.t.read(pl.ISR, 1)

    def setup_queues(self, drv, queue_sizes):
        """Every queue whose QUEUE_NUM is non-zero; the size is the device's."""
        queues = []
        for i in range(self.MAX_QUEUES):
            self.t.write(pl.QUEUE_SEL, 2, i)
            size = self.t.read(pl.QUEUE_NUM, 2)
            if size == 0:
                break
            if self.t.read(pl.QUEUE_PFN, 4):
                raise DriverError(f"queue {i} already live")
            q = DriverQueue(drv, i, size, legacy_align=1 << pl.QUEUE_ADDR_SHIFT)
            self.t.write(pl.QUEUE_PFN, 4, q.desc >> pl.QUEUE_ADDR_SHIFT)
            queues.append(q)
        return queues


class PortWindow:
    """BAR-relative read/write over a port (or memory) bus, so a driver can
    reach a device through the same dispatch a guest's `in`/`out` take."""

    def __init__(self, bus, base):
        self.bus, self.base = bus, base

    def read(self, offset, size):
        return self.bus.read(self.base + offset, size)

    def write(self, offset, size, value):
        self.bus.write(self.base + offset, size, value)


class MockDriver:
    def __init__(self, transport, mem, arena=0x10000, arena_size=8 << 20, regs=None):
        self.t, self.mem = transport, mem
        if regs is None:
            from vmm.testing.pcimodern_regs import PciModernRegs
            from vmm.virtio.pci_modern import VirtioPciModern
            regs = (PciLegacyRegs if isinstance(transport, pl.VirtioPciLegacy) else
                    PciModernRegs if isinstance(transport, VirtioPciModern) else MmioRegs)
        self.regs = regs(transport)
        self._next, self._end = arena, arena + arena_size
        self.guards = []              # (gpa, length) filled with GUARD
        self.queues = []
        self.features = 0

    # --- registers (rd/wr: raw 4-byte transport accesses) ---
    def rd(self, off):
        return self.t.read(off, 4)

    def wr(self, off, value):
        self.t.write(off, 4, value)

    def status(self):
        return self.regs.status()

    def set_status(self, bits):
        self.regs.write_status(self.status() | bits)

    def device_features(self):
        return self.regs.device_features()

    def config(self, offset, size=4):
        return self.regs.config(offset, size)

    def kick(self, q=0):
        self.regs.kick(q)

    def ack_interrupt(self):
        return self.regs.ack_interrupt()

    def control(self, q, cls, cmd, data=b""):
        """A virtio-net control command (§5.1.6.5) on queue `q`; returns the
        ack byte the device wrote (None if it did not complete the chain)."""
        hdr = self.alloc(2 + len(data), 2)
        self.mem.write(hdr, bytes([cls, cmd]) + bytes(data))
        ack = self.alloc(1, 1, fill=0xEE)
        head = self.queues[q].add([(hdr, 2 + len(data), False), (ack, 1, True)])
        self.kick(q)
        used = dict(self.queues[q].get_used())
        if head not in used:
            return None
        return self.mem.read(ack, 1)[0]

    # --- guest memory ---
    def alloc(self, size, align=16, guard=0, fill=0):
        """Zeroed (or `fill`ed) guest memory, optionally fenced by guard bytes."""
        start = (self._next + guard + align - 1) // align * align
        if start + size + guard > self._end:
            raise DriverError("mock driver arena exhausted")
        if guard:
            for gpa in (start - guard, start + size):
                self.mem.write(gpa, bytes([GUARD]) * guard)
                self.guards.append((gpa, guard))
        self.mem.view(start, size)[:] = fill
        self._next = start + size + guard
        return start

    def check_guards(self):
        """Guard ranges a device wrote into: [] when all are intact."""
        bad = []
        for gpa, n in self.guards:
            if self.mem.read(gpa, n) != bytes([GUARD]) * n:
                bad.append(gpa)
        return bad

    # --- §3.1.1 device initialization (§7.2 for legacy interfaces) ---
    def init(self, features=None, queue_sizes=None):
        """Reset, negotiate (`features` masks what the device offers), set up
        every queue, DRIVER_OK.  Returns False if FEATURES_OK was refused."""
        r = self.regs
        r.check()
        r.write_status(0)
        self.set_status(vd.ACKNOWLEDGE)
        self.set_status(vd.DRIVER)
        offered = self.device_features()
        self.features = offered if features is None else offered & features
        r.write_features(self.features)
        if r.features_ok:
            self.set_status(vd.FEATURES_OK)
            if not self.status() & vd.FEATURES_OK:
                return False
        self.queues = r.setup_queues(self, queue_sizes)
        self.set_status(vd.DRIVER_OK)
        return True


class BlkRequest:
    __slots__ = ("head", "header", "data", "status")

    def __init__(self, head, header, data, status):
        self.head, self.header, self.data, self.status = head, header, data, status


class BlkDriver(MockDriver):
    """virtio-blk requests (§5.2.6) from guard-fenced buffers."""

    def submit(self, typ, sector=0, data=b"", read_len=0, split=1, indirect=False,
               guard=16, publish=True):
        """Offer one request: header, data (written when `data`, else
        `read_len` device-writable bytes) in `split` pieces, status byte."""
        q = self.queues[0]
        header = self.alloc(16, 16, guard)
        self.mem.write(header, struct.pack("<IIQ", typ, 0, sector))
        segs = [(header, 16, False)]
        payload, writable = (data, False) if data else (read_len, True)
        total = len(payload) if not writable else payload
        bufs = []
        if total:
            cuts = [total * k // split for k in range(split + 1)]
            for a, b in zip(cuts, cuts[1:]):
                if b == a:
                    continue
                gpa = self.alloc(b - a, 16, guard, fill=0x5A if writable else 0)
                if not writable:
                    self.mem.write(gpa, payload[a:b])
                bufs.append((gpa, b - a))
                segs.append((gpa, b - a, writable))
        status = self.alloc(1, 1, guard, fill=0xFF)
        segs.append((status, 1, True))
        head = q.add(segs, indirect=indirect, publish=publish)
        return BlkRequest(head, header, bufs, status)

    def result(self, req):
        """(status byte, bytes of the data buffers) of a request."""
        data = b"".join(self.mem.read(gpa, n) for gpa, n in req.data)
        return self.mem.read(req.status, 1)[0], data

    def run(self, typ, sector=0, data=b"", read_len=0, **kw):
        """Submit, kick, and return (status, data, used_len)."""
        req = self.submit(typ, sector, data, read_len, **kw)
        self.kick()
        used = dict(self.queues[0].get_used())
        if req.head not in used:
            raise DriverError(f"request {req.head} not completed (status 0x{self.status():x})")
        status, out = self.result(req)
        return status, out, used[req.head]

    def reset_arena(self, arena=0x10000):
        """Forget all buffers (after a device reset)."""
        self._next = arena
        self.guards = []
