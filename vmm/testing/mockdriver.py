"""A virtio driver in Python, for tests and benchmarks: it lays out
descriptor tables and rings in a GuestMemory and talks to a transport only
through its register read/write methods, as a guest would (virtio 1.1 §3.1.1
initialization, §2.6.13 supplying buffers).  Register access goes through an
adapter: MmioRegs (§4.2.3, VirtioMmio) or PciLegacyRegs (§4.1.4.8 legacy
header in BAR0: any object with read/write at BAR offsets, such as a
VirtioPciLegacy or a PortWindow on a port bus; legacy initialization per
§7.2, no FEATURES_OK, rings in the legacy layout at a page frame).

PciModernRegs drives a modern virtio-pci function (§4.1.4, VirtioPciModern)
the way Linux's virtio_pci_modern does: it finds the common, notify, ISR and
device regions by walking the vendor capabilities in configuration space,
accesses each common-configuration field with its own width (64-bit queue
addresses as two 32-bit halves), and can enable MSI-X with one vector per
queue plus one for configuration changes.

Every buffer it allocates can be fenced by guard bytes; `check_guards()`
reports any guard a device overwrote.
"""
import struct

from vmm.virtio import device as vd
from vmm.virtio import mmio as m
from vmm.virtio import pci_legacy as pl
from vmm.virtio import pci_modern as pm
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


class PciModernRegs:
    """Modern virtio-pci (§4.1.4) through its capabilities, for a MockDriver.
    `msix=True` enables MSI-X (Message Control) and maps config to vector 0
    and queue n to vector n + 1, with table entries unmasked."""
    features_ok = True
    MSI_ADDRESS = 0xFEE00000

    def __init__(self, t, msix=False):
        self.t, self.pci, self.msix = t, t.pci, msix
        self.caps = {}                  # cfg_type -> (bar, offset, length, extra bytes)
        self.msix_cap = None
        off = self.pci.read_config(0x34, 1)
        seen = 0
        while off and seen < 48:
            cap_id = self.pci.read_config(off, 1)
            if cap_id == pm.CAP_VENDOR:
                cap_len, cfg_type, bar = (self.pci.read_config(off + i, 1) for i in (2, 3, 4))
                extra = bytes(self.pci.read_config(off + 16 + i, 1) for i in range(cap_len - 16))
                self.caps.setdefault(cfg_type, (bar, self.pci.read_config(off + 8, 4),
                                                self.pci.read_config(off + 12, 4), extra, off))
            elif cap_id == 0x11:
                self.msix_cap = off
            off = self.pci.read_config(off + 1, 1)
            seen += 1

    def region(self, cfg_type):
        bar, offset, length, _, _ = self.caps[cfg_type]
        return self.pci.bars[bar].handler, offset

    def common(self, name, value=None):
        """Read (value None) or write one common-configuration field."""
        h, base = self.region(pm.CAP_COMMON)
        off, width = pm.COMMON_FIELDS[name]
        if value is None:
            if width == 8:
                return h.read(base + off, 4) | h.read(base + off + 4, 4) << 32
            return h.read(base + off, width)
        if width == 8:
            h.write(base + off, 4, value & 0xFFFFFFFF)
            h.write(base + off + 4, 4, value >> 32)
        else:
            h.write(base + off, width, value)

    def check(self):
        if not {pm.CAP_COMMON, pm.CAP_NOTIFY, pm.CAP_ISR, pm.CAP_DEVICE} <= set(self.caps):
            raise DriverError("modern virtio-pci capabilities missing")

    def status(self):
        return self.common("device_status")

    def write_status(self, value):
        self.common("device_status", value)

    def device_features(self):
        f = 0
        for sel in (0, 1):
            self.common("device_feature_select", sel)
            f |= self.common("device_feature") << (32 * sel)
        return f

    def write_features(self, features):
        for sel in (0, 1):
            self.common("driver_feature_select", sel)
            self.common("driver_feature", (features >> (32 * sel)) & 0xFFFFFFFF)

    def config(self, offset, size):
        h, base = self.region(pm.CAP_DEVICE)
        return h.read(base + offset, size)

    def kick(self, q):
        h, base = self.region(pm.CAP_NOTIFY)
        mult = int.from_bytes(self.caps[pm.CAP_NOTIFY][3][:4], "little")
        self.common("queue_select", q)
        h.write(base + self.common("queue_notify_off") * mult, 2, q)

    def ack_interrupt(self):
        h, base = self.region(pm.CAP_ISR)
        return h.read(base, 1)

    def enable_msix(self, vectors):
        """MSI-X on, and table entries 0..vectors-1 unmasked (vector v's
        message: data 0x40 + v)."""
        ctrl = self.msix_cap + 2
        self.pci.write_config(ctrl, 2, self.pci.read_config(ctrl, 2) | 0x8000)
        bir = self.pci.read_config(self.msix_cap + 4, 4)
        h = self.pci.bars[bir & 7].handler
        for v in range(vectors):
            e = (bir & ~7) + 16 * v
            h.write(e, 4, self.MSI_ADDRESS)
            h.write(e + 4, 4, 0)
            h.write(e + 8, 4, 0x40 + v)
            h.write(e + 12, 4, 0)

    def setup_queues(self, drv, queue_sizes):
        n = self.common("num_queues")
        if self.msix:
            self.enable_msix(n + 1)
            self.common("config_msix_vector", 0)
            if self.common("config_msix_vector") != 0:
                raise DriverError("config vector not accepted")
        queues = []
        for i in range(n):
            self.common("queue_select", i)
            if self.common("queue_enable"):
                raise DriverError(f"queue {i} already live")
            qmax = self.common("queue_size")
            size = min(qmax, queue_sizes[i]) if queue_sizes else qmax
            q = DriverQueue(drv, i, size)
            self.common("queue_size", size)
            self.common("queue_desc", q.desc)
            self.common("queue_driver", q.avail)
            self.common("queue_device", q.used)
            if self.msix:
                self.common("queue_msix_vector", i + 1)
                if self.common("queue_msix_vector") != i + 1:
                    raise DriverError(f"queue {i} vector not accepted")
            self.common("queue_enable", 1)
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
            regs = (PciLegacyRegs if isinstance(transport, pl.VirtioPciLegacy) else
                    PciModernRegs if isinstance(transport, pm.VirtioPciModern) else MmioRegs)
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
