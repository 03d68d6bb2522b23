"""A KVM virtual machine: memory slots, in-kernel irqchip and PIT, irqfd and
ioeventfd registration, IRQ lines, and the GSI routing table.

The Vm is the one owner of the routing table.  KVM_SET_GSI_ROUTING replaces
the whole table (KVM API doc 4.52), so every change resends the PIC/IOAPIC
routes KVM_CREATE_IRQCHIP installed (the same default table as
arch/x86/kvm/irq_comm.c: GSI 0-15 to both PICs and the IOAPIC, 16-23 to the
IOAPIC only) together with every MSI route devices asked for.
"""
import os
import threading

from vmm.native import NativeError, check, ffi, ioctl, lib

# Addresses KVM needs for its own use on Intel (three pages for the TSS, one
# for the EPT identity map), placed just below the 4 GiB boundary inside the
# MMIO hole where no RAM or device sits (as Firecracker and kvmtool do).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000

IOAPIC_PINS = 24
PIC_PINS = 16
MAX_ROUTES = 1024


class RoutingError(ValueError):
    """KVM refused a routing table (e.g. an MSI message it cannot deliver)."""


def default_routes():
    """[(gsi, "irqchip", chip, pin)] as KVM_CREATE_IRQCHIP sets them up."""
    routes = []
    for gsi in range(IOAPIC_PINS):
        routes.append((gsi, "irqchip", lib.KVM_IRQCHIP_IOAPIC, gsi))
        if gsi < PIC_PINS:
            chip = lib.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else lib.KVM_IRQCHIP_PIC_SLAVE
            routes.append((gsi, "irqchip", chip, gsi % 8))
    return routes


class Vm:
    def __init__(self, kvm):
        self.kvm = kvm
        self.fd = ioctl(kvm.fd, "KVM_CREATE_VM", 0)
        self._slots = 0
        self.memory_slots = []      # (slot, gpa, size, host offset)
        self.log_dirty = False
        self._routing_lock = threading.Lock()
        self._msi_routes = {}           # gsi -> (address, data)
        self._next_gsi = IOAPIC_PINS    # MSI GSIs come after the IOAPIC's pins
        self.routing_updates = 0        # tables sent (for tests and stats)

    def setup_platform(self, pit=True):
        """TSS, identity map, PIC+IOAPIC+LAPIC in the kernel, and the PIT
        (unless `pit` is false: create_pit() later)."""
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", IDENTITY_MAP_ADDR))
        ioctl(self.fd, "KVM_SET_TSS_ADDR", TSS_ADDR)
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")
        if pit:
            self.create_pit()

    def create_pit(self):
        """The in-kernel PIT (needs the irqchip).  KVM starts a kernel thread
        for it and waits for it, holding the VM's lock: 1-3 ms here."""
        pit = ffi.new("struct kvm_pit_config *")
        pit.flags = lib.KVM_PIT_SPEAKER_DUMMY
        ioctl(self.fd, "KVM_CREATE_PIT2", pit)

    def add_memory(self, memory, log_dirty=False):
        """Register every slot of a GuestMemory; `log_dirty` turns on KVM's
        dirty page log for them (KVM_MEM_LOG_DIRTY_PAGES, for diff snapshots)."""
        self.log_dirty = bool(log_dirty)
        for gpa, size, off in memory.regions:
            region = ffi.new("struct kvm_userspace_memory_region *")
            region.slot = self._slots
            region.flags = lib.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
            self.memory_slots.append((self._slots, gpa, size, off))
            region.guest_phys_addr = gpa
            region.memory_size = size
            region.userspace_addr = memory.host_base + off
            ioctl(self.fd, "KVM_SET_USER_MEMORY_REGION", region)
            self._slots += 1

    def dirty_log(self):
        """KVM_GET_DIRTY_LOG for every slot (reads and clears the log): a list
        of (host offset, bitmap bytes), one bit per 4 KiB page (KVM API doc 4.8)."""
        out = []
        for slot, _gpa, size, off in self.memory_slots:
            pages = size // 4096
            bitmap = ffi.new("uint64_t[]", (pages + 63) // 64)
            check(lib.pv_get_dirty_log(self.fd, slot, bitmap), "KVM_GET_DIRTY_LOG")
            out.append((off, bytes(ffi.buffer(bitmap))[:(pages + 7) // 8]))
        return out

    def set_irq_line(self, gsi, level):
        irq = ffi.new("struct kvm_irq_level *")
        irq.irq = gsi
        irq.level = 1 if level else 0
        ioctl(self.fd, "KVM_IRQ_LINE", irq)

    def irqfd(self, fd, gsi, deassign=False, resample_fd=None):
        """Writes to eventfd `fd` raise (edge) interrupt `gsi` inside KVM.

        With `resample_fd` (KVM API doc 4.75, KVM_IRQFD_FLAG_RESAMPLE) the
        irqfd is level-triggered instead: a write asserts `gsi` and it stays
        asserted until the guest's EOI of it, when KVM de-asserts it and
        signals `resample_fd`; the VMM asserts it again if its device still
        wants the interrupt (PCI INTx, vmm/pci/intx_irqfd.py).  KVM lowers
        the line itself when the last resample irqfd of a GSI is deassigned."""
        req = ffi.new("struct kvm_irqfd *")
        req.fd = fd
        req.gsi = gsi
        flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        if resample_fd is not None and not deassign:
            flags |= lib.KVM_IRQFD_FLAG_RESAMPLE
            req.resamplefd = resample_fd
        req.flags = flags
        ioctl(self.fd, "KVM_IRQFD", req)

    def irqfd_resample_supported(self):
        """KVM_CAP_IRQFD_RESAMPLE, asked once (on the VM fd: per-VM answer)."""
        cap = getattr(self, "_resample_cap", None)
        if cap is None:
            try:
                cap = bool(ioctl(self.fd, "KVM_CHECK_EXTENSION", lib.KVM_CAP_IRQFD_RESAMPLE))
            except NativeError:
                cap = False
            self._resample_cap = cap
        return cap

    def ioeventfd(self, fd, addr, length, datamatch=None, pio=False, deassign=False):
        """Guest writes of `length` bytes to `addr` signal eventfd `fd`
        without an exit to user space (optionally only for `datamatch`)."""
        req = ffi.new("struct kvm_ioeventfd *")
        req.addr = addr
        req.len = length
        req.fd = fd
        flags = 0
        if datamatch is not None:
            flags |= lib.KVM_IOEVENTFD_FLAG_DATAMATCH
            req.datamatch = datamatch
        if pio:
            flags |= lib.KVM_IOEVENTFD_FLAG_PIO
        if deassign:
            flags |= lib.KVM_IOEVENTFD_FLAG_DEASSIGN
        req.flags = flags
        ioctl(self.fd, "KVM_IOEVENTFD", req)

    # --- GSI routing (MSI / MSI-X) ---
    def alloc_gsi(self):
        """A GSI number for an MSI route (not routed until set_msi_route)."""
        with self._routing_lock:
            if self._next_gsi >= MAX_ROUTES:
                raise RoutingError("no GSI left for MSI routes")
            self._next_gsi += 1
            return self._next_gsi - 1

    def routing_table(self):
        """The table as it is sent: default irqchip routes, then
        (gsi, "msi", address, data) in GSI order."""
        return default_routes() + [(gsi, "msi", a, d) for gsi, (a, d)
                                   in sorted(self._msi_routes.items())]

    def set_msi_route(self, gsi, address, data):
        """Route `gsi` to an MSI message; raises RoutingError (and keeps the
        previous table) if KVM refuses it."""
        with self._routing_lock:
            old = self._msi_routes.get(gsi)
            if old == (address, data):
                return
            self._msi_routes[gsi] = (address, data)
            try:
                self._commit()
            except RoutingError:
                if old is None:
                    del self._msi_routes[gsi]
                else:
                    self._msi_routes[gsi] = old
                raise

    def remove_msi_route(self, gsi):
        with self._routing_lock:
            if self._msi_routes.pop(gsi, None) is not None:
                self._commit()

    def _commit(self):
        table = self.routing_table()
        self.routing_updates += 1
        try:
            self.set_gsi_routing(table)
        except NativeError as e:
            raise RoutingError(f"KVM_SET_GSI_ROUTING: {e.strerror}") from None

    def set_gsi_routing(self, table):
        """KVM_SET_GSI_ROUTING with `table` (routing_table() format)."""
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_irq_routing")
                      + len(table) * ffi.sizeof("struct kvm_irq_routing_entry"))
        req = ffi.cast("struct kvm_irq_routing *", buf)
        req.nr = len(table)
        for i, (gsi, kind, a, b) in enumerate(table):
            e = req.entries[i]
            e.gsi = gsi
            if kind == "irqchip":
                e.type = lib.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip, e.u.irqchip.pin = a, b
            else:
                e.type = lib.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo, e.u.msi.address_hi = a & 0xFFFFFFFF, a >> 32
                e.u.msi.data = b
        ioctl(self.fd, "KVM_SET_GSI_ROUTING", req)

    def signal_msi(self, address, data):
        """KVM_SIGNAL_MSI: inject one MSI message directly (not on the hot
        path: per-vector irqfds are; this serves tests and benchmarks)."""
        msi = ffi.new("struct kvm_msi *")
        msi.address_lo, msi.address_hi, msi.data = address & 0xFFFFFFFF, address >> 32, data
        return ioctl(self.fd, "KVM_SIGNAL_MSI", msi)

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
