"""Guest RAM: one anonymous mapping, split into KVM memory slots around the
MMIO/PCI hole below 4 GiB, readable from Python (numpy) and from C (host
addresses).  Every access is range-checked against the slots: a guest-provided
address never reaches memory the guest does not own.
"""
import functools

from vmm.native import ffi, lib

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

# The hole for MMIO windows, PCI and the IOAPIC/LAPIC below 4 GiB (as
# Firecracker and QEMU's microvm do); RAM that does not fit below it moves
# above 4 GiB.
MMIO_HOLE_START = 3 * GiB
MMIO_HOLE_END = 4 * GiB
MIN_MEM = 16 * MiB
MAX_MEM = 1 << 40
HUGE_ALIGN = 2 * MiB


class GuestMemoryError(Exception):
    """A guest-physical range outside RAM."""


class GuestMemory:
    """Guest RAM of `size` bytes.

    `regions` is a list of (gpa, size, host_offset) tuples, one per KVM slot.
    `array` is a numpy uint8 view of the whole host mapping (numpy is imported
    on first use: it costs ~45 ms of VMM start-up that booting does not need).
    """

    def __init__(self, size, backing=None):
        """`backing`: a path or fd of a snapshot memory file to map
        MAP_PRIVATE instead of anonymous memory (restore: pages load on
        demand, the file is never written, many VMs may share it)."""
        if size < MIN_MEM or size > MAX_MEM:
            raise ValueError(f"memory size {size} out of range ({MIN_MEM // MiB} MiB .. 1 TiB)")
        if size % (4 * KiB):
            raise ValueError("memory size must be a multiple of 4 KiB")
        self.size = size
        self.backing = backing
        if backing is None:
            ptr = lib.pv_alloc_ram(size, HUGE_ALIGN, 1)
            if ptr == ffi.NULL:
                raise MemoryError(f"cannot map {size} bytes of guest memory")
        else:
            ptr = _map_file(backing, size)
        self._ptr = ptr
        self.host_base = int(ffi.cast("uintptr_t", ptr))
        self._mv = memoryview(ffi.buffer(ptr, size))
        self.device_dirty = None     # numpy uint8 per page while tracking device writes
        low = min(size, MMIO_HOLE_START)
        self.regions = [(0, low, 0)]
        if size > low:
            self.regions.append((MMIO_HOLE_END, size - low, low))

    def track_device_writes(self, on=True):
        """Keep a byte per page that devices set when they may write it
        (native/src/virtq.c mark_dirty): KVM's dirty log only sees guest
        writes, a diff snapshot needs both.  Rings made after this call see it."""
        import numpy as np
        self.device_dirty = np.zeros(self.size // 4096, dtype=np.uint8) if on else None

    def take_device_dirty(self):
        """Pages devices wrote since the last call (bool per page), cleared."""
        import numpy as np
        if self.device_dirty is None:
            return np.zeros(self.size // 4096, dtype=bool)
        out = self.device_dirty.astype(bool)
        self.device_dirty[:] = 0
        return out

    def mark_dirty(self, offset, length):
        """Python-side device writes (PyRing): as mark_dirty in virtq.c."""
        if self.device_dirty is not None and length > 0:
            self.device_dirty[offset // 4096:(offset + length - 1) // 4096 + 1] = 1

    def pages_in_use(self):
        """One byte per 4 KiB page, 1 where the page holds anything but
        zeros: what a memory file must store.  Plain Python (no numpy
        import: it may run on a seccomp-confined API thread)."""
        mv, zero = self._mv, bytes(4096)
        return bytearray(mv[off:off + 4096] != zero for off in range(0, self.size, 4096))

    @functools.cached_property
    def array(self):
        import numpy as np
        return np.frombuffer(self._mv, dtype=np.uint8)

    def close(self):
        if self._ptr is not None:
            self.__dict__.pop("array", None)
            self._mv.release()
            lib.pv_free_ram(self._ptr, self.size)
            self._ptr = None

    @property
    def end(self):
        """One past the highest guest-physical RAM address."""
        gpa, size, _ = self.regions[-1]
        return gpa + size

    def offset(self, gpa, length=1):
        """Host offset of [gpa, gpa+length), which must lie in one slot."""
        for base, size, off in self.regions:
            if base <= gpa and gpa + length <= base + size and length >= 0:
                return off + gpa - base
        raise GuestMemoryError(f"guest range 0x{gpa:x}+0x{length:x} is not RAM")

    def host_addr(self, gpa, length=1):
        return self.host_base + self.offset(gpa, length)

    def view(self, gpa, length):
        """A writable numpy view of guest memory (no copy)."""
        off = self.offset(gpa, length)
        return self.array[off:off + length]

    def read(self, gpa, length):
        off = self.offset(gpa, length)
        return bytes(self._mv[off:off + length])

    def write(self, gpa, data):
        data = memoryview(data).cast("B")
        off = self.offset(gpa, len(data))
        self._mv[off:off + len(data)] = data

    def fill(self, gpa, length, byte=0):
        off = self.offset(gpa, length)
        self._mv[off:off + length] = bytes([byte]) * length

    def read_int(self, gpa, size):
        return int.from_bytes(self.read(gpa, size), "little")

    def write_int(self, gpa, value, size):
        self.write(gpa, int(value).to_bytes(size, "little"))


def _map_file(backing, size):
    import os
    fd = backing if isinstance(backing, int) else None
    try:
        if fd is None:
            fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
        have = os.fstat(fd).st_size
        if have != size:
            raise GuestMemoryError(f"memory file {backing}: {have} bytes, the snapshot's guest "
                                   f"has {size}")
        err = ffi.new("int *")
        ptr = lib.pv_map_file(fd, size, err)
        if ptr == ffi.NULL:
            raise OSError(err[0], f"cannot map memory file {backing}: {os.strerror(err[0])}")
        return ptr
    finally:
        if fd is not None and not isinstance(backing, int):
            os.close(fd)
