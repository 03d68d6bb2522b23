"""Modern virtio-pci transport (virtio 1.1 §4.1) with MSI-X, and the
transitional variant that also carries the legacy I/O header (§4.1.4.8).

The function (`t.pci`): vendor 0x1AF4, device 0x1040 + type, revision 1
(non-transitional, §4.1.2.1), or for `transitional=True` the legacy device
ID 0x1000 + n with revision 0 and subsystem device = type, plus the legacy
header in an I/O BAR0.  Everything modern is in one 64-bit memory BAR4 that
the bus places in the 32-bit MMIO hole (as QEMU does):

    0x0000 common configuration (§4.1.4.3)   0x1000 ISR status (§4.1.4.5)
    0x2000 device configuration (§4.1.4.6)   0x3000 notifications (§4.1.4.4):
           queue n at 0x3000 + 4 n (queue_notify_off = n, multiplier 4)
    0x4000 MSI-X table                         0x6000 MSI-X PBA

Capabilities, all below config offset 0x100 (without MMCONFIG a guest only
reaches 256 bytes through 0xCF8/0xCFC): common, ISR, notify, device, PCI
configuration access (§4.1.4.7: bar/offset/length written by the driver,
then pci_cfg_data reads or writes that BAR), MSI-X.

Interrupts (§4.1.5.3/4): with MSI-X enabled, a used buffer notification for
queue n goes to vector queue_msix_vector[n] and a configuration change to
config_msix_vector (no interrupt when NO_VECTOR); both are NO_VECTOR after
reset.  A vector the driver writes that the table does not have reads back
as NO_VECTOR (§4.1.5.1.2.1), which is how Linux learns the mapping failed.
Without MSI-X the device falls back to INTx with the ISR status, as the
legacy device does.  Each queue's notify address is an MMIO ioeventfd.

C fast path (vmm/virtio/fastpath.py): with ioeventfds and a VM's irqfds, a
queue whose vector is live is served in C on the I/O thread, which writes
the vector's irqfd itself; every vector, mask or Message Control change
first takes the queue off it (Msix.guard), so masking still holds messages
back (pending bit) and INTx or NO_VECTOR queues stay in Python.
"""
import contextlib
import logging
import struct

from vmm.pci import device as pd
from vmm.pci.msix import Msix
from vmm.virtio import device as vd
from vmm.virtio import pci_legacy as pl
from vmm.virtio import pci_persist
from vmm.virtio.pci_intx import IntxInterrupt
from vmm.virtio.transport import Transport

log = logging.getLogger("pyvmm.virtio.pci")

MODERN_ID_BASE = 0x1040             # §4.1.2.1
REVISION_MODERN = 1
SUBSYSTEM_MODERN = 0x40             # §4.1.2.1: non-transitional, 0x40 or higher
NO_VECTOR = 0xFFFF
BAR_MODERN = 4                      # 64-bit: registers 4 and 5
BAR_SIZE = 0x8000
COMMON, ISR, DEVICE, NOTIFY, MSIX_TABLE, MSIX_PBA = 0x0000, 0x1000, 0x2000, 0x3000, 0x4000, 0x6000
REGION = 0x1000
NOTIFY_MULTIPLIER = 4

# §4.1.4 virtio_pci_cap cfg_type
CAP_COMMON, CAP_NOTIFY, CAP_ISR, CAP_DEVICE, CAP_PCI = 1, 2, 3, 4, 5
CAP_VENDOR = 0x09

# §4.1.4.3 struct virtio_pci_common_cfg: name -> (offset, width)
COMMON_FIELDS = {
    "device_feature_select": (0, 4), "device_feature": (4, 4),
    "driver_feature_select": (8, 4), "driver_feature": (12, 4),
    "config_msix_vector": (16, 2), "num_queues": (18, 2),
    "device_status": (20, 1), "config_generation": (21, 1),
    "queue_select": (22, 2), "queue_size": (24, 2), "queue_msix_vector": (26, 2),
    "queue_enable": (28, 2), "queue_notify_off": (30, 2),
    "queue_desc": (32, 8), "queue_driver": (40, 8), "queue_device": (48, 8),
}
COMMON_SIZE = 56
_COMMON = struct.Struct("<IIIIHHBBHHHHHQQQ")
_QUEUE_ADDR = {32: "desc", 40: "driver", 48: "device"}
_BY_OFFSET = {off: (name, width) for name, (off, width) in COMMON_FIELDS.items()}

# Legacy header with MSI-X enabled (§4.1.4.8): two vector registers, config at 24
LEGACY_CONFIG_VECTOR, LEGACY_QUEUE_VECTOR, LEGACY_CONFIG_MSIX = 20, 22, 24


def _vendor_cap(cfg_type, bar, offset, length, extra=b""):
    """The body of a virtio_pci_cap after cap_vndr and cap_next (§4.1.4)."""
    return struct.pack("<BBBBxxII", 16 + len(extra), cfg_type, bar, 0, offset, length) + extra


class VirtioPciModern(IntxInterrupt, Transport):
    NAME = "virtio-pci"
    SNAPSHOT = True                     # registers, config space, MSI-X: pci_persist.py

    def __init__(self, device, mem, vm=None, irq_line=None, ioeventfd=None, ioloop=None,
                 transitional=False):
        if ioeventfd is not None and ioloop is None:
            raise ValueError("ioeventfd needs an ioloop to service the eventfds")
        self.transitional = transitional
        self.msix = None
        super().__init__(device, mem, ioloop=ioloop, legacy=False)
        t = device.device_type
        if transitional and t not in pl.TRANSITIONAL_IDS:
            raise ValueError(f"virtio device type {t} has no transitional PCI device ID")
        if len(self.queues) * NOTIFY_MULTIPLIER > REGION or len(device.config_bytes()) > REGION:
            raise ValueError("too many queues or device configuration too large")
        self.pci = pd.PciDevice(
            pl.VENDOR, pl.TRANSITIONAL_IDS[t] if transitional else MODERN_ID_BASE + t,
            pl.CLASS_CODES.get(t, pl.CLASS_OTHER),
            revision=0 if transitional else REVISION_MODERN, subsystem_vendor=pl.VENDOR,
            subsystem=t if transitional else SUBSYSTEM_MODERN, irq_pin=pd.PIN_INTA,
            irq_line=irq_line, name=f"virtio-pci-{type(device).__name__}")
        if transitional:
            size = pl.region_size(len(device.config_bytes()) + LEGACY_CONFIG_MSIX - pl.CONFIG)
            self.pci.add_bar(0, size, LegacyWindow(self), io=True)
        self.pci.add_bar(BAR_MODERN, BAR_SIZE, self, io=False, is64=True)
        add = self.pci.add_capability
        add(CAP_VENDOR, _vendor_cap(CAP_COMMON, BAR_MODERN, COMMON, COMMON_SIZE))
        add(CAP_VENDOR, _vendor_cap(CAP_ISR, BAR_MODERN, ISR, 1))
        add(CAP_VENDOR, _vendor_cap(CAP_NOTIFY, BAR_MODERN, NOTIFY,
                                    NOTIFY_MULTIPLIER * len(self.queues),
                                    struct.pack("<I", NOTIFY_MULTIPLIER)))
        add(CAP_VENDOR, _vendor_cap(CAP_DEVICE, BAR_MODERN, DEVICE,
                                    max(len(device.config_bytes()), 4)))
        # §4.1.4.7: bar (1 byte), offset and length (4 each) are the driver's
        self.pci_cfg_cap = add(CAP_VENDOR, _vendor_cap(CAP_PCI, 0, 0, 0, bytes(4)),
                               wmask=b"\0\0\xff\0\0\0" + b"\xff" * 8)
        self.pci.config_window(self.pci_cfg_cap + 16, 4, self._cfg_data_read, self._cfg_data_write)
        self.msix = Msix(self.pci, len(self.queues) + 1, BAR_MODERN, MSIX_TABLE, MSIX_PBA, vm=vm)
        self.pci.watch_config(self.msix.cap + 2, 2, self._msix_switched)
        self.pci.bar_moved = self._bar_moved
        self._ioeventfd = ioeventfd
        self.bar_address = None         # where the modern BAR decodes now
        self.port = None                # where the legacy BAR0 decodes (transitional)
        if ioeventfd is not None:
            if vm is not None and getattr(device, "fast_capable", False):
                from vmm.virtio.fastpath import FastPath
                self._fast = FastPath(None, len(self.queues))     # irqfd per queue's vector
                self.msix.guard = self._msix_guard
            self._make_notify_fds()

    @contextlib.contextmanager
    def _msix_guard(self):
        """Around an MSI-X table or Message Control change (vCPU thread): no
        queue on the fast path meanwhile; re-decided after (fast_sync).  The
        transport's lock first, as on the Python path (lock -> msix)."""
        with self._lock, self.fast_hold():
            yield

    def fast_sync(self):
        """A queue goes to C only with its vector live (Msix.live_fd)."""
        if self._fast is not None:
            fds = [self.msix.live_fd(v) for v in self.queue_vectors]
            self._fast.sync(self.device, self.activated
                            and not self.status & vd.DEVICE_NEEDS_RESET, irq_fds=fds)

    def _set_queue_vector(self, index, value):
        with self._msix_guard():
            self.queue_vectors[index] = self._vector(value)

    def _reset_state(self):
        super()._reset_state()
        self.device_feature_select = self.driver_feature_select = 0
        self.config_vector = NO_VECTOR
        self.queue_vectors = [NO_VECTOR] * len(self.queues)

    def close(self):
        super().close()
        if self.msix is not None:
            self.msix.close()

    # --- snapshots (vmm/virtio/pci_persist.py) ---
    def _extra_state(self):
        return pci_persist.save(self)

    def _restore_extra(self, st):
        pci_persist.restore(self, st)

    def restart(self):
        pci_persist.restart_irq(self)
        if self.activated:
            for q in self.queues:
                self.notify(q.index)

    # --- interrupts (§4.1.5.3, §4.1.5.4) ---
    def used(self, queue_index=0):
        if self.msix.enabled:
            self.interrupts += 1
            v = self.queue_vectors[queue_index] if 0 <= queue_index < len(self.queues) else NO_VECTOR
            if v != NO_VECTOR and (self._ioloop is None or not self._ioloop.defer(
                    (self, v), lambda: self.msix.notify(v))):   # see Transport._signal
                self.msix.notify(v)
        else:
            self._signal(vd.INT_USED)

    def _signal(self, bit):
        if bit == vd.INT_CONFIG and self.msix.enabled:
            with self._isr_lock:        # the ISR bit is set with MSI-X too (§4.1.4.5.1)
                self.interrupt_status |= bit
                self.interrupts += 1
            if self.config_vector != NO_VECTOR:
                self.msix.notify(self.config_vector)
            return
        super()._signal(bit)

    def _msix_switched(self):
        """A function using MSI-X does not drive INTx (PCI 3.0 §6.8.2); a
        line left asserted from before would stay up forever."""
        with self._isr_lock:
            self.pci.set_intx(0 if self.msix.enabled else int(bool(self.interrupt_status)))

    def _vector(self, value):
        """What a vector register reads after the driver wrote `value`."""
        return value if value == NO_VECTOR or value < self.msix.vectors else NO_VECTOR

    # --- BAR moves: the notify ioeventfds follow the BAR ---
    def _bar_moved(self, bar, old, new):
        if bar.io:
            self.port = new
        else:
            self.bar_address = new
        if self._ioeventfd is None:
            return
        for index, fd in enumerate(self._notify_fds):
            if bar.io:      # legacy QUEUE_NOTIFY: 2 bytes, value = queue index
                where = dict(length=2, datamatch=index, pio=True)
                off = pl.QUEUE_NOTIFY
            else:           # any 2-byte write at the queue's notify address
                where = dict(length=2, datamatch=None, pio=False)
                off = NOTIFY + NOTIFY_MULTIPLIER * index
            if old is not None:
                self._ioeventfd(fd, old + off, deassign=True, **where)
            if new is not None:
                self._ioeventfd(fd, new + off, **where)

    # --- the modern BAR (vCPU threads) ---
    def read(self, offset, size):
        region, off = divmod(offset, REGION)
        region *= REGION
        if region == COMMON:
            return self._common_read(off, size)
        if region == ISR:
            return self.ack_interrupt() & 0xFF if off == 0 else 0
        if region == DEVICE:
            return self.device.read_config(off, size)
        if MSIX_TABLE <= offset < MSIX_PBA:
            return self.msix.table_read(offset - MSIX_TABLE, size)
        if offset >= MSIX_PBA:
            return self.msix.pba_read(offset - MSIX_PBA, size)
        return 0                        # notify region: write-only

    def write(self, offset, size, value):
        region, off = divmod(offset, REGION)
        region *= REGION
        if region == COMMON:
            self._common_write(off, size, value)
        elif region == DEVICE:
            self.device.write_config(off, size, value)
        elif region == NOTIFY:
            q, rest = divmod(off, NOTIFY_MULTIPLIER)
            if not rest and q < len(self.queues):
                self.notify(q)
        elif MSIX_TABLE <= offset < MSIX_PBA:
            self.msix.table_write(offset - MSIX_TABLE, size, value)
        elif offset >= MSIX_PBA:
            self.msix.pba_write(offset - MSIX_PBA, size, value)

    # --- §4.1.4.3 common configuration ---
    def _common_image(self):
        q = self._queue()
        sel = self.device_feature_select
        return _COMMON.pack(
            sel, (self._offered() >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0,
            self.driver_feature_select,
            (self.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
            if self.driver_feature_select < 2 else 0,
            self.config_vector, len(self.queues), self.status, self.config_generation & 0xFF,
            self.queue_sel, q.size if q else 0, self.queue_vectors[q.index] if q else NO_VECTOR,
            int(q.ready) if q else 0, q.index if q else 0,
            q.desc if q else 0, q.driver if q else 0, q.device if q else 0)

    def _common_read(self, off, size):
        """Any access reads the bytes it covers (reads have no side effects)."""
        self.legacy = False
        data = self._common_image()[off:off + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def _common_write(self, off, size, value):
        """Writes must cover exactly one field (or a 32-bit half of a 64-bit
        queue address, §4.1.3.1); anything else is ignored."""
        self.legacy = False
        field = _BY_OFFSET.get(off)
        if off - 4 in _QUEUE_ADDR and size == 4:          # high half of a queue address
            with self._lock:
                self._queue_addr(off - 4, 32, 4, value)
            return
        if field is None or not (size == field[1] or (field[1] == 8 and size == 4)):
            log.debug("virtio-pci: %d-byte common config write at %d ignored", size, off)
            return
        name = field[0]
        with self._lock:
            if name == "device_feature_select":
                self.device_feature_select = value
            elif name == "driver_feature_select":
                self.driver_feature_select = value
            elif name == "driver_feature":
                self._driver_feature(value)
            elif name == "config_msix_vector":
                self.config_vector = self._vector(value)
            elif name == "device_status":
                self._write_status(value & 0xFF)
            elif name == "queue_select":
                self.queue_sel = value
            elif off in _QUEUE_ADDR:
                self._queue_addr(off, 0, size, value)
            else:
                self._queue_field(name, value)

    def _driver_feature(self, value):
        sel = self.driver_feature_select
        if self.status & vd.FEATURES_OK or sel > 1:
            log.debug("virtio-pci: driver_feature write ignored")
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _queue_field(self, name, value):
        q = self._queue()
        if q is None:
            log.debug("virtio-pci: %s write for queue %d (of %d) ignored", name, self.queue_sel,
                      len(self.queues))
            return
        if name == "queue_msix_vector":
            self._set_queue_vector(q.index, value)
        elif not self._queue_writable(q, name) or q.ready:
            return
        elif name == "queue_size":
            if value and value <= q.max_size:       # §4.1.4.3.2: the driver may only shrink it
                q.size = value
        elif name == "queue_enable" and value == 1:  # §4.1.4.3.2: writing 0 is not allowed
            q.ready = True

    def _queue_addr(self, off, shift, size, value):
        q = self._queue()
        if q is None or q.ready or not self._queue_writable(q, "address"):
            return
        name = _QUEUE_ADDR[off]
        mask = (1 << (8 * size)) - 1
        old = getattr(q, name)
        setattr(q, name, (old & ~(mask << shift)) | ((value & mask) << shift))

    # --- §4.1.4.7 PCI configuration access window ---
    def _cfg_window(self):
        c = self.pci_cfg_cap
        return self.pci.get(c + 4, 1), self.pci.get(c + 8, 4), self.pci.get(c + 12, 4)

    def _cfg_data_read(self, off, size):
        bar, offset, length = self._cfg_window()
        if off != 0 or length not in (1, 2, 4) or size < length or not self._cfg_ok(bar, offset, length):
            return 0
        return self.pci.bars[bar].handler.read(offset, length)

    def _cfg_data_write(self, off, size, value):
        bar, offset, length = self._cfg_window()
        if off != 0 or length not in (1, 2, 4) or size < length or not self._cfg_ok(bar, offset, length):
            log.debug("virtio-pci: PCI config access window write ignored")
            return
        self.pci.bars[bar].handler.write(offset, length, value & ((1 << (8 * length)) - 1))

    def _cfg_ok(self, bar, offset, length):
        """§4.1.4.7.1: offset aligned to length, inside an existing BAR."""
        b = self.pci.bars.get(bar)
        return b is not None and offset % length == 0 and offset + length <= b.size


class LegacyWindow:
    """BAR0 of a transitional device: the legacy header (§4.1.4.8) over the
    same transport, with the two MSI-X vector registers and the device
    configuration at 24 while MSI-X is enabled.  Using it makes the
    transport legacy (§7.2 feature and status rules) until the driver
    touches the modern common configuration again."""

    def __init__(self, t):
        self.t = t

    def _config_off(self):
        return LEGACY_CONFIG_MSIX if self.t.msix.enabled else pl.CONFIG

    def read(self, offset, size):
        t = self.t
        t.legacy = True
        cfg = self._config_off()
        if offset >= cfg:
            return t.device.read_config(offset - cfg, size)
        if cfg == LEGACY_CONFIG_MSIX and offset in (LEGACY_CONFIG_VECTOR, LEGACY_QUEUE_VECTOR):
            if size != 2:
                return 0
            q = t._queue()
            if offset == LEGACY_CONFIG_VECTOR:
                return t.config_vector
            return t.queue_vectors[q.index] if q else NO_VECTOR
        q = t._queue()
        isr = t.ack_interrupt() if offset <= pl.ISR < offset + size else 0
        header = pl._HEADER.pack(t._offered() & 0xFFFFFFFF, t.driver_features & 0xFFFFFFFF,
                                 t._pfn[q.index] if q else 0, q.max_size if q else 0,
                                 t.queue_sel, 0, t.status, isr)
        data = header[offset:offset + size]
        return int.from_bytes(data.ljust(size, b"\0"), "little")

    def write(self, offset, size, value):
        t = self.t
        t.legacy = True
        cfg = self._config_off()
        if offset >= cfg:
            t.device.write_config(offset - cfg, size, value)
        elif cfg == LEGACY_CONFIG_MSIX and offset in (LEGACY_CONFIG_VECTOR, LEGACY_QUEUE_VECTOR):
            q = t._queue()
            if size != 2:
                return
            if offset == LEGACY_CONFIG_VECTOR:
                t.config_vector = t._vector(value)
            elif q is not None:
                t._set_queue_vector(q.index, value)
        elif offset == pl.QUEUE_NOTIFY:
            t.notify(value & 0xFFFF)
        elif offset == pl.STATUS:
            t._write_status(value & 0xFF)
        elif offset == pl.GUEST_FEATURES:
            if not t.status & vd.DRIVER_OK:
                t.driver_features = value & 0xFFFFFFFF
        elif offset == pl.QUEUE_PFN:
            q = t._queue()
            if q is not None:
                q.size = q.max_size     # legacy: the device's size
                t.set_queue_pfn(q, value & 0xFFFFFFFF)
        elif offset == pl.QUEUE_SEL:
            t.queue_sel = value & 0xFFFF


__all__ = ["VirtioPciModern", "LegacyWindow", "NO_VECTOR"]
