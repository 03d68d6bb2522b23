"""Port I/O and MMIO address dispatch.

A device on a bus implements `read(offset, size) -> int` and
`write(offset, size, value)`; values are little-endian integers of `size`
bytes (1, 2, 4 or 8).  Accesses that hit no device are counted and ignored:
reads return all ones, as on real hardware with nothing decoding the address.
"""
import bisect
import logging

log = logging.getLogger("pyvmm.bus")


class BusError(Exception):
    """A registration that overlaps another device."""


class Bus:
    def __init__(self, name):
        self.name = name
        self._starts = []      # sorted base addresses
        self._ranges = []      # (base, end, device) in the same order
        self.unhandled = 0     # accesses that hit no device

    def register(self, base, size, device):
        end = base + size
        i = bisect.bisect_left(self._starts, base)
        if (i > 0 and self._ranges[i - 1][1] > base) or (i < len(self._starts) and self._starts[i] < end):
            raise BusError(f"{self.name}: 0x{base:x}+0x{size:x} overlaps another device")
        self._starts.insert(i, base)
        self._ranges.insert(i, (base, end, device))

    def unregister(self, base):
        i = bisect.bisect_left(self._starts, base)
        if i < len(self._starts) and self._starts[i] == base:
            del self._starts[i]
            del self._ranges[i]

    def find(self, addr):
        """(device, offset) for `addr`, or (None, 0)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            base, end, dev = self._ranges[i]
            if addr < end:
                return dev, addr - base
        return None, 0

    def read(self, addr, size):
        dev, off = self.find(addr)
        if dev is None:
            self._unhandled("read", addr, size)
            return (1 << (8 * size)) - 1
        return dev.read(off, size)

    def write(self, addr, size, value):
        dev, off = self.find(addr)
        if dev is None:
            self._unhandled("write", addr, size, value)
            return
        dev.write(off, size, value)

    def _unhandled(self, op, addr, size, value=None):
        self.unhandled += 1
        if log.isEnabledFor(logging.DEBUG):
            extra = "" if value is None else f" value=0x{value:x}"
            log.debug("%s: unhandled %s at 0x%x size %d%s", self.name, op, addr, size, extra)
