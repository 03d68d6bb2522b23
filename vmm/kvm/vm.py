"""A KVM virtual machine: memory slots, in-kernel irqchip and PIT, irqfd and
ioeventfd registration, IRQ lines."""
import os

from vmm.native import check, ffi, ioctl, lib

# Addresses KVM needs for its own use on Intel (three pages for the TSS, one
# for the EPT identity map), placed just below the 4 GiB boundary inside the
# MMIO hole where no RAM or device sits (as Firecracker and kvmtool do).
TSS_ADDR = 0xFFFBD000
IDENTITY_MAP_ADDR = 0xFFFBC000


class Vm:
    def __init__(self, kvm):
        self.kvm = kvm
        self.fd = ioctl(kvm.fd, "KVM_CREATE_VM", 0)
        self._slots = 0
        self.memory_slots = []      # (slot, gpa, size, host offset)
        self.log_dirty = False

    def setup_platform(self):
        """TSS, identity map, PIC+IOAPIC+LAPIC in the kernel, and the PIT."""
        ioctl(self.fd, "KVM_SET_IDENTITY_MAP_ADDR", ffi.new("uint64_t *", IDENTITY_MAP_ADDR))
        ioctl(self.fd, "KVM_SET_TSS_ADDR", TSS_ADDR)
        ioctl(self.fd, "KVM_CREATE_IRQCHIP")
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

    def irqfd(self, fd, gsi, deassign=False):
        """Writes to eventfd `fd` raise (edge) interrupt `gsi` inside KVM."""
        req = ffi.new("struct kvm_irqfd *")
        req.fd = fd
        req.gsi = gsi
        req.flags = lib.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0
        ioctl(self.fd, "KVM_IRQFD", req)

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

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
