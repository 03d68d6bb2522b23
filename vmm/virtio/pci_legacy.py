"""Legacy virtio-pci transport (virtio 1.1 §4.1.4.8 "Legacy Interfaces: A
Note on PCI Device Layout"; offsets as in Linux include/uapi/linux/
virtio_pci.h), with INTx interrupts, and its wiring into a Machine.

The transport is a PCI function (`t.pci`, a PciDevice: vendor 0x1AF4,
transitional device ID 0x1000 + n, revision 0, subsystem device = virtio
device type, interrupt pin INTA#) whose BAR0 is an I/O region holding the
legacy header, then the device configuration from offset 20 (no MSI-X):

    0 HOST_FEATURES  u32 RO   4 GUEST_FEATURES u32   8 QUEUE_PFN u32
   12 QUEUE_NUM      u16 RO  14 QUEUE_SEL      u16  16 QUEUE_NOTIFY u16
   18 STATUS         u8      19 ISR            u8 RO, read clears

Queues use the legacy layout (§2.6.2) at QUEUE_PFN * 4096 with 4096-byte
alignment; QUEUE_NUM is the device's size, the driver cannot change it.
Interrupts are level-triggered INTx (vmm/virtio/pci_intx.py): with
`intx=IrqfdIntx(...)` (a KVM resample irqfd, what pci_attach gives when KVM
has KVM_CAP_IRQFD_RESAMPLE) the ISR holds the line up, it drops at the
guest's EOI once the driver has read ISR, and the queues run on the I/O
loop's C fast path; otherwise (`irq_line`: KVM_IRQ_LINE, or no VM) the line
follows the ISR from Python, dropping when the driver reads ISR (or resets
the device), and the queues stay on the Python path.  (On
software KVM, kvm_pvm, an extra EOI reaches the IOAPIC before the guest's
handler has read ISR, so a still-asserted line is delivered once more and
the handler then reads ISR 0 and returns IRQ_NONE: about one such interrupt
per real one, seen with KVM's kvm_eoi tracepoint; harmless, no storm.)

    intx = IrqfdIntx(lambda trigger, resample, deassign=False:
                     vm.irqfd(trigger, gsi, deassign=deassign, resample_fd=resample))
    t = VirtioPciLegacy(BlkDevice(path), mem, intx=intx, ioeventfd=cb, ioloop=loop)
    # or, no resample irqfd: irq_line=lambda level: vm.set_irq_line(gsi, level)
    pci_bus.add(t.pci, irq=gsi)

`ioeventfd(fd, port, length, datamatch, deassign=False)` binds each queue's
notify eventfd to QUEUE_NOTIFY (2 bytes, datamatch = queue index) wherever
the guest puts BAR0, and unbinds it from the old place.
"""
import logging
import struct

from vmm.pci import device as pd
from vmm.virtio import device as vd
from vmm.virtio.pci_intx import ResampledIntx
from vmm.virtio.transport import Transport

log = logging.getLogger("pyvmm.virtio.pci")

# include/uapi/linux/virtio_pci.h
HOST_FEATURES, GUEST_FEATURES, QUEUE_PFN, QUEUE_NUM = 0, 4, 8, 12
QUEUE_SEL, QUEUE_NOTIFY, STATUS, ISR = 14, 16, 18, 19
CONFIG = 20                     # VIRTIO_PCI_CONFIG_OFF(false): no MSI-X vectors
QUEUE_ADDR_SHIFT = 12           # VIRTIO_PCI_QUEUE_ADDR_SHIFT
ABI_VERSION = 0                 # VIRTIO_PCI_ABI_VERSION: the revision ID
_HEADER = struct.Struct("<IIIHHHBB")

VENDOR = 0x1AF4                 # Red Hat, Inc. (virtio)
# §4.1.2.3 transitional PCI device IDs by virtio device type
TRANSITIONAL_IDS = {1: 0x1000, 2: 0x1001, 5: 0x1002, 3: 0x1003, 8: 0x1004, 4: 0x1005, 9: 0x1009}
# vsock (19) has none in the spec; Linux's legacy driver takes any ID in
# 0x1000-0x103f and reads the device type from the subsystem ID.
TRANSITIONAL_IDS[19] = 0x1000 + 19 - 1
# PCI class codes (as QEMU gives them): network/ethernet, storage/SCSI, other
CLASS_CODES = {1: 0x020000, 2: 0x010000}
CLASS_OTHER = 0xFF0000


def region_size(config_len):
    """BAR0 size: header + device config, a power of two (PCI 3.0 §6.2.5.1)."""
    size = 32
    while size < CONFIG + config_len:
        size <<= 1
    if size > 256:
        raise ValueError("device configuration too large for a legacy I/O BAR")
    return size


class VirtioPciLegacy(ResampledIntx, Transport):
    NAME = "virtio-pci"
    SNAPSHOT = True

    def __init__(self, device, mem, irq_line=None, ioeventfd=None, ioloop=None, intx=None):
        """`intx`: an IrqfdIntx (vmm/pci/intx_irqfd.py) to raise INTx with
        (then `irq_line` is unused, and the queues may run on the C fast
        path: vmm/virtio/pci_intx.py); it needs the ioloop."""
        if (ioeventfd is not None or intx is not None) and ioloop is None:
            raise ValueError("ioeventfd and intx need an ioloop to service the eventfds")
        super().__init__(device, mem, ioloop=ioloop, legacy=True)
        self._intx_irqfd = intx
        t = device.device_type
        if t not in TRANSITIONAL_IDS:
            raise ValueError(f"virtio device type {t} has no transitional PCI device ID")
        self.pci = pd.PciDevice(VENDOR, TRANSITIONAL_IDS[t], CLASS_CODES.get(t, CLASS_OTHER),
                                revision=ABI_VERSION, subsystem_vendor=VENDOR, subsystem=t,
                                irq_pin=pd.PIN_INTA, irq_line=irq_line,
                                name=f"virtio-pci-{type(device).__name__}")
        self.pci.add_bar(0, region_size(len(device.config_bytes())), self, io=True)
        self.pci.bar_moved = self._bar_moved
        self._ioeventfd = ioeventfd
        self.port = None                # where BAR0 decodes now
        if ioeventfd is not None:
            self._make_notify_fds()
        self._intx_attach()

    def reset(self):
        super().reset()
        self._intx_reset()

    def close(self):
        super().close()
        self._intx_close()

    # --- snapshots: PCI config space (command, BAR addresses, interrupt line) ---
    def _extra_state(self):
        return {"pci_config": bytes(self.pci.config).hex(), "intx": self._intx_state()}

    def _restore_extra(self, st):
        config = bytes.fromhex(st["pci_config"])
        if len(config) != len(self.pci.config) or config[:4] != bytes(self.pci.config[:4]):
            raise vd.VirtioError("virtio-pci: snapshot config space is for another function")
        self.pci.config[:] = config
        self.pci._update_mappings()         # BARs where the guest put them (ioeventfds follow)
        self._intx_disabled = bool(self.pci.get(pd.COMMAND, 2) & pd.CMD_INTX_DISABLE)
        self.pci._line = 0
        self.pci.set_intx(int(st.get("intx", 0)))

    # --- BAR0 moved by the guest (or by the bus playing firmware) ---
    def _bar_moved(self, bar, old, new):
        self.port = new
        if self._ioeventfd is None:
            return
        for index, fd in enumerate(self._notify_fds):
            if old is not None:
                self._ioeventfd(fd, old + QUEUE_NOTIFY, 2, index, deassign=True)
            if new is not None:
                self._ioeventfd(fd, new + QUEUE_NOTIFY, 2, index)

    # --- BAR0 accesses (vCPU thread) ---
    def read(self, offset, size):
        if offset >= CONFIG:
            return self.device.read_config(offset - CONFIG, size)
        q = self._queue()
        isr = self.ack_interrupt() if offset <= ISR < offset + size else 0
        header = _HEADER.pack(self._offered() & 0xFFFFFFFF, self.driver_features,
                              self._pfn[q.index] if q else 0, q.size if q else 0,
                              self.queue_sel, 0, self.status, isr)
        data = header[offset:offset + size]
        if len(data) < size:            # an access running into the device config
            rest = size - len(data)
            data += self.device.read_config(0, rest).to_bytes(rest, "little")
        return int.from_bytes(data, "little")

    def write(self, offset, size, value):
        """Writes at a register's offset set it (truncated to its width);
        read-only registers and other offsets ignore writes."""
        if offset >= CONFIG:
            self.device.write_config(offset - CONFIG, size, value)
        elif offset == QUEUE_NOTIFY:
            self.notify(value & 0xFFFF)
        elif offset == STATUS:
            self._write_status(value & 0xFF)
        elif offset == GUEST_FEATURES:
            if self.status & vd.DRIVER_OK:
                log.debug("virtio-pci: GUEST_FEATURES write after DRIVER_OK ignored")
            else:
                self.driver_features = value & 0xFFFFFFFF
        elif offset == QUEUE_PFN:
            q = self._queue()
            if q is not None:
                self.set_queue_pfn(q, value & 0xFFFFFFFF)
        elif offset == QUEUE_SEL:
            self.queue_sel = value & 0xFFFF
        else:
            log.debug("virtio-pci: %d-byte write at %d (read-only or not a register) ignored",
                      size, offset)


__all__ = ["VirtioPciLegacy"]
