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

from vmm.virtio import device as vd
from vmm.virtio.transport import Transport

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


class VirtioMmio(Transport):
    WINDOW = 0x200
    NAME = "virtio-mmio"
    SNAPSHOT = True

    def __init__(self, device, mem, irq=None, register_ioeventfd=None, ioloop=None, legacy=False):
        if register_ioeventfd is not None and ioloop is None:
            raise ValueError("register_ioeventfd needs an ioloop to service the eventfds")
        super().__init__(device, mem, irq=irq, ioloop=ioloop, legacy=legacy)
        if register_ioeventfd is not None:
            self._make_notify_fds(lambda fd, index: register_ioeventfd(fd, QUEUE_NOTIFY, 4, index))

    @staticmethod
    def cmdline(base, irq):
        """The Linux kernel parameter announcing a window (virtio_mmio.device=)."""
        return f"virtio_mmio.device={VirtioMmio.WINDOW}@0x{base:x}:{irq}"

    def _reset_state(self):
        super()._reset_state()
        self.device_features_sel = self.driver_features_sel = 0
        self.guest_page_size = 4096
        self._align = [4096] * len(self.queues)

    # --- snapshots ---
    def _extra_state(self):
        return {"device_features_sel": self.device_features_sel,
                "driver_features_sel": self.driver_features_sel,
                "guest_page_size": self.guest_page_size, "align": list(self._align)}

    def _restore_extra(self, st):
        self.device_features_sel = int(st["device_features_sel"])
        self.driver_features_sel = int(st["driver_features_sel"])
        self.guest_page_size = int(st["guest_page_size"])
        self._align = [int(a) for a in st["align"]][:len(self.queues)]

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
            self.ack_interrupt(value)
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
            self.set_queue_pfn(q, value, self.guest_page_size, self._align[q.index])  # §4.2.4
        else:
            log.debug("virtio-mmio: write to read-only/reserved register 0x%x", offset)
