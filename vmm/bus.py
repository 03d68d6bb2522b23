"""Port I/O and MMIO address dispatch.

A device on a bus implements `read(offset, size) -> int` and
`write(offset, size, value)`; values are little-endian integers of `size`
bytes (1, 2, 4 or 8).  Accesses that hit no device are counted and ignored:
reads return all ones, as on real hardware with nothing decoding the address.
"""
import bisect
import threading

from vmm.log import DEBUG, getLogger

log = getLogger("pyvmm.bus")   # vmm/log.py: logging loads only if a record is written


class BusError(Exception):
    """A registration that overlaps another device."""


class Bus:
    def __init__(self, name):
        self.name = name
        # (sorted base addresses, [(base, end, device)] in the same order):
        # replaced as a whole on every change, so a vCPU thread looking up an
        # address while another one moves a PCI BAR sees one version or the
        # other, never half of each.
        self._table = ([], [])
        self._lock = threading.Lock()   # serializes writers
        self.unhandled = 0     # accesses that hit no device

    def register(self, base, size, device):
        end = base + size
        with self._lock:
            starts, ranges = self._table
            i = bisect.bisect_left(starts, base)
            if (i > 0 and ranges[i - 1][1] > base) or (i < len(starts) and starts[i] < end):
                raise BusError(f"{self.name}: 0x{base:x}+0x{size:x} overlaps another device")
            self._table = (starts[:i] + [base] + starts[i:],
                           ranges[:i] + [(base, end, device)] + ranges[i:])

    def unregister(self, base):
        with self._lock:
            starts, ranges = self._table
            i = bisect.bisect_left(starts, base)
            if i < len(starts) and starts[i] == base:
                self._table = (starts[:i] + starts[i + 1:], ranges[:i] + ranges[i + 1:])

    def find(self, addr):
        """(device, offset) for `addr`, or (None, 0)."""
        starts, ranges = self._table
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0:
            base, end, dev = ranges[i]
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
        if log.isEnabledFor(DEBUG):
            extra = "" if value is None else f" value=0x{value:x}"
            log.debug("%s: unhandled %s at 0x%x size %d%s", self.name, op, addr, size, extra)
