"""/dev/kvm: API version and capability checks, supported CPUID."""
import errno
import os

from vmm.native import NativeError, check, ffi, ioctl, lib

# What the VMM relies on; checked once at start with a clear message.
REQUIRED_CAPS = (
    "KVM_CAP_IRQCHIP", "KVM_CAP_USER_MEMORY", "KVM_CAP_SET_TSS_ADDR",
    "KVM_CAP_SET_IDENTITY_MAP_ADDR", "KVM_CAP_PIT2", "KVM_CAP_EXT_CPUID",
    "KVM_CAP_IOEVENTFD", "KVM_CAP_IRQFD", "KVM_CAP_IMMEDIATE_EXIT", "KVM_CAP_MP_STATE",
)


class KvmUnavailable(Exception):
    """/dev/kvm is missing, inaccessible, or lacks something we need."""


class Kvm:
    def __init__(self, path="/dev/kvm"):
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            raise KvmUnavailable(f"cannot open {path}: {e.strerror}") from None
        version = ioctl(self.fd, "KVM_GET_API_VERSION")
        if version != lib.KVM_API_VERSION:
            raise KvmUnavailable(f"KVM API version {version}, need {lib.KVM_API_VERSION}")
        missing = [c for c in REQUIRED_CAPS if not self.check_extension(c)]
        if missing:
            raise KvmUnavailable("KVM lacks " + ", ".join(missing))
        self.vcpu_mmap_size = ioctl(self.fd, "KVM_GET_VCPU_MMAP_SIZE")
        self._cpuid = None

    def check_extension(self, cap):
        return ioctl(self.fd, "KVM_CHECK_EXTENSION", getattr(lib, cap))

    def supported_cpuid(self):
        """List of dicts (function, index, flags, eax, ebx, ecx, edx): fresh
        copies of the table KVM reported the first time (it does not change)."""
        if self._cpuid is None:
            self._cpuid = self._read_supported_cpuid()
        return [dict(e) for e in self._cpuid]

    def _read_supported_cpuid(self):
        n = 128
        while True:
            buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
            r = lib.pv_ioctl(self.fd, lib.KVM_GET_SUPPORTED_CPUID, buf)
            if r == -errno.E2BIG:  # the table is bigger: grow and retry
                n *= 2
                continue
            check(r, "KVM_GET_SUPPORTED_CPUID")
            return [{k: getattr(buf.entries[i], k)
                     for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")}
                    for i in range(buf.nent)]

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def software_kvm():
    """True when /dev/kvm is the software kind (kvm_pvm), see kvm-host notes."""
    return os.path.exists("/sys/module/kvm_pvm")


__all__ = ["Kvm", "KvmUnavailable", "NativeError", "software_kvm"]
