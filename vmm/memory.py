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

    def __init__(self, size):
        if size < MIN_MEM or size > MAX_MEM:
            raise ValueError(f"memory size {size} out of range ({MIN_MEM // MiB} MiB .. 1 TiB)")
        if size % (4 * KiB):
            raise ValueError("memory size must be a multiple of 4 KiB")
        self.size = size
        ptr = lib.pv_alloc_ram(size, HUGE_ALIGN, 1)
        if ptr == ffi.NULL:
            raise MemoryError(f"cannot map {size} bytes of guest memory")
        self._ptr = ptr
        self.host_base = int(ffi.cast("uintptr_t", ptr))
        self._mv = memoryview(ffi.buffer(ptr, size))
        low = min(size, MMIO_HOLE_START)
        self.regions = [(0, low, 0)]
        if size > low:
            self.regions.append((MMIO_HOLE_END, size - low, low))

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
