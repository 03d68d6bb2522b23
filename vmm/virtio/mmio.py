"""virtio-mmio transport (virtio 1.1 §4.2): version 2 (§4.2.2), optionally
the legacy version 1 interface (§4.2.4) behind `legacy=True`.

A VirtioMmio is a bus device for a 0x200-byte window:

    t = VirtioMmio(BlkDevice(path), mem, irq=irq_eventfd,
                   register_ioeventfd=cb, ioloop=loop)
    mmio_bus.register(base, VirtioMmio.WINDOW, t)
    cmdline += " " + VirtioMmio.cmdline(base, gsi)

`irq` is an eventfd (int: 8-byte 1 written per interrupt, e.g. a KVM irqfd)
or a callable, or None.  `register_ioeventfd(fd, offset, length, datamatch)`
is called once per queue with a new eventfd for QueueNotify (offset 0x50,
datamatch = queue index); the fds are serviced by `ioloop`.  Without it a
QueueNotify write calls the device on the writer's thread.
"""
import logging
import os
import threading

from vmm.virtio import device as vd
from vmm.virtio.ioloop import drain_eventfd
from vmm.virtio.queue import Virtqueue

log = logging.getLogger("pyvmm.virtio.mmio")

MAGIC = 0x74726976            # "virt"
VENDOR_ID = 0x4D565950        # "PYVM"

# §4.2.2 register offsets (legacy-only ones from §4.2.4)
MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
GUEST_PAGE_SIZE = 0x028                                  # legacy
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM = 0x030, 0x034, 0x038
QUEUE_ALIGN, QUEUE_PFN = 0x03C, 0x040                    # legacy
QUEUE_READY, QUEUE_NOTIFY = 0x044, 0x050
INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_DRIVER_LOW, QUEUE_DRIVER_HIGH = 0x090, 0x094
QUEUE_DEVICE_LOW, QUEUE_DEVICE_HIGH = 0x0A0, 0x0A4
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100

_QUEUE_ADDR = {QUEUE_DESC_LOW: ("desc", 0), QUEUE_DESC_HIGH: ("desc", 32),
               QUEUE_DRIVER_LOW: ("driver", 0), QUEUE_DRIVER_HIGH: ("driver", 32),
               QUEUE_DEVICE_LOW: ("device", 0), QUEUE_DEVICE_HIGH: ("device", 32)}
_ONE = (1).to_bytes(8, "little")


class VirtioMmio(vd.Interrupt):
    WINDOW = 0x200

    def __init__(self, device, mem, irq=None, register_ioeventfd=None, ioloop=None, legacy=False):
        if register_ioeventfd is not None and ioloop is None:
            raise ValueError("register_ioeventfd needs an ioloop to service the eventfds")
        self.device = device
        self.mem = mem
        self.legacy = legacy
        self._irq = irq
        self._ioloop = ioloop
        self._lock = threading.RLock()      # status, activation and queue processing
        self._isr_lock = threading.Lock()
        self.queues = [Virtqueue(i, n) for i, n in enumerate(device.queue_max_sizes)]
        self._notify_fds = []
        self.interrupts = 0                 # interrupts signalled (for tests and stats)
        self.config_generation = 0
        self.needs_reset_reason = None
        self._reset_state()
        if register_ioeventfd is not None:
            for q in self.queues:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._notify_fds.append(fd)
                register_ioeventfd(fd, QUEUE_NOTIFY, 4, q.index)
                ioloop.add(fd, self._eventfd_handler(fd, q.index))

    @staticmethod
    def cmdline(base, irq):
        """The Linux kernel parameter announcing a window (virtio_mmio.device=)."""
        return f"virtio_mmio.device={VirtioMmio.WINDOW}@0x{base:x}:{irq}"

    @property
    def notify_fds(self):
        return list(self._notify_fds)

    def _reset_state(self):
        self.status = 0
        self.interrupt_status = 0
        self.device_features_sel = self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.activated = False
        self.guest_page_size = 4096
        self._align = [4096] * len(self.queues)
        self._pfn = [0] * len(self.queues)
        for q in self.queues:
            q.reset()

    def reset(self):
        """§2.1.1 / §4.2.2 Status write of 0: device and transport to initial state."""
        with self._lock:
            self.device.reset()
            self._reset_state()
            self.needs_reset_reason = None

    def close(self):
        """Detach the notify eventfds and close the device (after the VM stopped)."""
        for fd in self._notify_fds:
            if self._ioloop is not None:
                self._ioloop.remove(fd)
            os.close(fd)
        self._notify_fds = []
        with self._lock:
            self.device.close()

    # --- Interrupt (called by the device, possibly on the I/O thread) ---
    def _signal(self, bit):
        with self._isr_lock:
            self.interrupt_status |= bit
            self.interrupts += 1
        irq = self._irq
        if irq is None:
            return
        if callable(irq):
            irq()
        else:
            os.write(irq, _ONE)

    def used(self, queue_index=0):
        self._signal(vd.INT_USED)

    def config(self):
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        self._signal(vd.INT_CONFIG)

    def needs_reset(self, reason):
        log.warning("virtio-mmio %s: device needs reset: %s", type(self.device).__name__, reason)
        self.needs_reset_reason = str(reason)
        self.status |= vd.DEVICE_NEEDS_RESET
        if self.status & vd.DRIVER_OK:          # §2.1.2
            self._signal(vd.INT_CONFIG)

    # --- notifications ---
    def _eventfd_handler(self, fd, index):
        def handler():
            drain_eventfd(fd)
            self.notify(index)
        return handler

    def notify(self, index):
        """A driver notification for queue `index` (any thread)."""
        with self._lock:
            if (not self.activated or self.status & vd.DEVICE_NEEDS_RESET
                    or not 0 <= index < len(self.queues)):
                return
            try:
                self.device.queue_notify(index)
            except Exception as e:   # a device bug must not take the VMM down
                log.exception("virtio device %s: queue %d", type(self.device).__name__, index)
                self.needs_reset(f"internal error: {e}")

    # --- register access (vCPU thread) ---
    def read(self, offset, size):
        if offset >= CONFIG:
            return self.device.read_config(offset - CONFIG, size)
        if size != 4 or offset & 3:     # §4.2.2.2: 32-bit aligned accesses only
            log.debug("virtio-mmio: %d-byte read at 0x%x ignored", size, offset)
            return 0
        q = self._queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return 1 if self.legacy else 2
        if offset == DEVICE_ID:
            return self.device.device_type
        if offset == VENDOR:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            return (self._offered() >> (32 * self.device_features_sel)) & 0xFFFFFFFF \
                if self.device_features_sel < 2 else 0
        if offset == QUEUE_NUM_MAX:
            return q.max_size if q else 0
        if offset == QUEUE_READY and not self.legacy:
            return int(q.ready) if q else 0
        if offset == QUEUE_PFN and self.legacy:
            return self._pfn[q.index] if q else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION and not self.legacy:
            return self.config_generation
        log.debug("virtio-mmio: read of write-only/reserved register 0x%x", offset)
        return 0

    def write(self, offset, size, value):
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, size, value)
            return
        if size != 4 or offset & 3:
            log.debug("virtio-mmio: %d-byte write at 0x%x ignored", size, offset)
            return
        value &= 0xFFFFFFFF
        if offset == QUEUE_NOTIFY:
            self.notify(value)
        elif offset == INTERRUPT_ACK:
            with self._isr_lock:
                self.interrupt_status &= ~value
        elif offset == STATUS:
            self._write_status(value)
        elif offset == DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self.queue_sel = value
        elif offset == GUEST_PAGE_SIZE and self.legacy:
            self.guest_page_size = value
        else:
            self._write_queue(offset, value)

    def _offered(self):
        f = self.device.features
        if self.legacy:      # §4.2.4: a legacy interface does not offer VERSION_1
            f &= ~vd.bit(vd.VIRTIO_F_VERSION_1)
        return f

    def _queue(self):
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _write_driver_features(self, value):
        if self.status & vd.FEATURES_OK or self.driver_features_sel > 1:
            log.debug("virtio-mmio: DriverFeatures write ignored")
            return
        shift = 32 * self.driver_features_sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _write_queue(self, offset, value):
        q = self._queue()
        if q is None:
            return
        if self.status & vd.DRIVER_OK or (q.ready and offset not in (QUEUE_READY, QUEUE_PFN)):
            log.debug("virtio-mmio: queue %d register 0x%x write while live ignored", q.index, offset)
            return
        if offset == QUEUE_NUM:
            q.size = value
        elif offset == QUEUE_READY and not self.legacy:
            q.ready = bool(value & 1)
        elif offset in _QUEUE_ADDR and not self.legacy:
            name, shift = _QUEUE_ADDR[offset]
            old = getattr(q, name)
            setattr(q, name, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
        elif offset == QUEUE_ALIGN and self.legacy:
            self._align[q.index] = value
        elif offset == QUEUE_PFN and self.legacy:
            self._legacy_pfn(q, value)
        else:
            log.debug("virtio-mmio: write to read-only/reserved register 0x%x", offset)

    def _legacy_pfn(self, q, pfn):
        """§4.2.4 / §2.6.2 legacy layout: desc, avail right after, used aligned."""
        self._pfn[q.index] = pfn
        if pfn == 0:
            q.ready = False
            return
        align = self._align[q.index] or 4096
        q.desc = pfn * self.guest_page_size
        q.driver = q.desc + 16 * q.size
        q.device = (q.driver + 6 + 2 * q.size + align - 1) // align * align
        q.ready = True

    def _write_status(self, value):
        """§2.1 / §3.1.1 status state machine."""
        with self._lock:
            if value == 0:
                self.reset()
                return
            old = self.status & ~vd.DEVICE_NEEDS_RESET
            value &= 0xFF & ~vd.DEVICE_NEEDS_RESET      # only the device sets it
            if old & ~value:
                log.warning("virtio-mmio: driver tried to clear status bits (0x%x -> 0x%x)", old, value)
                return
            new = value & ~old
            if new & vd.FEATURES_OK and not self.legacy and not self._features_ok(value):
                value &= ~vd.FEATURES_OK        # §3.1.1 step 6: driver re-reads, sees it unset
            if new & vd.DRIVER_OK:
                if not self.legacy and not value & vd.FEATURES_OK:
                    log.warning("virtio-mmio: DRIVER_OK without FEATURES_OK ignored")
                    value &= ~vd.DRIVER_OK
                else:
                    if self.legacy:
                        self.device.acked_features = self.driver_features & self._offered()
                    self.status = value | (self.status & vd.DEVICE_NEEDS_RESET)
                    self._activate()
                    return
            self.status = value | (self.status & vd.DEVICE_NEEDS_RESET)

    def _features_ok(self, value):
        need = vd.ACKNOWLEDGE | vd.DRIVER
        offered = self._offered()
        drv = self.driver_features
        if value & need != need:
            log.warning("virtio-mmio: FEATURES_OK before ACKNOWLEDGE|DRIVER")
            return False
        if drv & ~offered:
            log.warning("virtio-mmio: driver accepted unoffered features 0x%x", drv & ~offered)
            return False
        if not drv & vd.bit(vd.VIRTIO_F_VERSION_1):
            log.warning("virtio-mmio: driver did not accept VIRTIO_F_VERSION_1")
            return False
        self.device.acked_features = drv
        return True

    def _activate(self):
        try:
            self.device.activate(self.mem, self.queues, self)
            self.activated = True
        except Exception as e:
            self.needs_reset(e)
