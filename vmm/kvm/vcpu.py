"""One KVM vCPU: its mmap'd kvm_run, register access, and KVM_RUN."""
import errno
import mmap
import os

from vmm.native import NativeError, check, ffi, ioctl, lib


class Vcpu:
    def __init__(self, vm, index):
        self.vm = vm
        self.index = index
        self.fd = ioctl(vm.fd, "KVM_CREATE_VCPU", index)
        self._map = mmap.mmap(self.fd, vm.kvm.vcpu_mmap_size, mmap.MAP_SHARED,
                              mmap.PROT_READ | mmap.PROT_WRITE)
        self._buf = ffi.from_buffer(self._map)
        self.run_struct = ffi.cast("struct kvm_run *", self._buf)
        # kvm_run.mmio.data: phys_addr (8 bytes) comes first in the member.
        self._mmio_data = ffi.offsetof("struct kvm_run", "mmio") + 8

    # -- running -------------------------------------------------------------
    def run(self):
        """KVM_RUN once; returns the exit reason, or KVM_EXIT_INTR when a
        signal interrupted it (how other threads kick a vCPU)."""
        r = lib.pv_ioctl_val(self.fd, lib.KVM_RUN, 0)
        # EINTR: a signal kicked us.  EAGAIN: an AP still waiting for
        # INIT/SIPI woke up without starting; both mean "look around, re-run".
        if r == -errno.EINTR or r == -errno.EAGAIN:
            return lib.KVM_EXIT_INTR
        check(r, "KVM_RUN")
        return self.run_struct.exit_reason

    def io_data(self):
        """Bytes of the current KVM_EXIT_IO data area (size * count)."""
        io = self.run_struct.io
        return self._map[io.data_offset:io.data_offset + io.size * io.count]

    def set_io_data(self, data):
        off = self.run_struct.io.data_offset
        self._map[off:off + len(data)] = data

    def mmio_data(self, length):
        return self._map[self._mmio_data:self._mmio_data + length]

    def set_mmio_data(self, data):
        self._map[self._mmio_data:self._mmio_data + len(data)] = data

    # -- state ---------------------------------------------------------------
    def _get(self, name, ctype):
        obj = ffi.new(ctype)
        ioctl(self.fd, name, obj)
        return obj

    def get_regs(self):
        return self._get("KVM_GET_REGS", "struct kvm_regs *")

    def set_regs(self, regs):
        ioctl(self.fd, "KVM_SET_REGS", regs)

    def get_sregs(self):
        return self._get("KVM_GET_SREGS", "struct kvm_sregs *")

    def set_sregs(self, sregs):
        ioctl(self.fd, "KVM_SET_SREGS", sregs)

    def get_fpu(self):
        return self._get("KVM_GET_FPU", "struct kvm_fpu *")

    def set_fpu(self, fpu):
        ioctl(self.fd, "KVM_SET_FPU", fpu)

    def get_lapic(self):
        return self._get("KVM_GET_LAPIC", "struct kvm_lapic_state *")

    def set_lapic(self, lapic):
        ioctl(self.fd, "KVM_SET_LAPIC", lapic)

    def get_mp_state(self):
        return self._get("KVM_GET_MP_STATE", "struct kvm_mp_state *").mp_state

    def set_cpuid(self, entries):
        """entries: iterable of dicts as returned by Kvm.supported_cpuid()."""
        entries = list(entries)
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": len(entries), "entries": len(entries)})
        buf.nent = len(entries)
        for i, e in enumerate(entries):
            for k, v in e.items():
                setattr(buf.entries[i], k, v)
        ioctl(self.fd, "KVM_SET_CPUID2", buf)

    def set_msrs(self, msrs):
        """msrs: list of (index, value)."""
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(msrs), "entries": len(msrs)})
        buf.nmsrs = len(msrs)
        for i, (index, value) in enumerate(msrs):
            buf.entries[i].index = index
            buf.entries[i].data = value
        n = ioctl(self.fd, "KVM_SET_MSRS", buf)
        if n != len(msrs):
            raise NativeError(f"KVM_SET_MSRS (MSR 0x{msrs[n][0]:x} refused)", 22)

    def get_msrs(self, indices):
        buf = ffi.new("struct kvm_msrs *", {"nmsrs": len(indices), "entries": len(indices)})
        buf.nmsrs = len(indices)
        for i, index in enumerate(indices):
            buf.entries[i].index = index
        n = ioctl(self.fd, "KVM_GET_MSRS", buf)
        return {buf.entries[i].index: buf.entries[i].data for i in range(n)}

    def close(self):
        if self.fd >= 0:
            self.run_struct = None
            self._buf = None
            try:
                self._map.close()
            except BufferError:  # a view is still alive; the fd close suffices
                pass
            os.close(self.fd)
            self.fd = -1
