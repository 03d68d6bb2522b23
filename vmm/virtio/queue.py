"""Split virtqueues (virtio 1.1 §2.6), device side.

`Virtqueue` is what the transport programs (size, ready, the three area
addresses); it knows nothing about devices.  When the device is activated it
turns a Virtqueue into a ring walker:

- `NativeRing`: the C walker (native/src/virtq.c) over a `struct pv_vq`;
  device engines in C (virtio-blk) take `ring.vq` directly.
- `PyRing`: the same algorithm in pure Python (a cross-check, and the slow
  path the benchmark compares against).

Both have pop() -> Chain | None, push(head, length), need_interrupt(),
enable_notify(); a malformed ring raises QueueError (and stays broken).
"""
import struct

from vmm.memory import GuestMemoryError
from vmm.native import ffi, lib

# §2.6.5 / §2.6.6 flags
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1

E_RING, E_AVAIL_IDX, E_HEAD, E_NEXT, E_RANGE, E_LOOP, E_INDIRECT, E_ORDER, E_REQ = (
    lib.PV_VQ_E_RING, lib.PV_VQ_E_AVAIL_IDX, lib.PV_VQ_E_HEAD, lib.PV_VQ_E_NEXT,
    lib.PV_VQ_E_RANGE, lib.PV_VQ_E_LOOP, lib.PV_VQ_E_INDIRECT, lib.PV_VQ_E_ORDER,
    lib.PV_VQ_E_REQ)
E_TOO_BIG = lib.PV_VQ_E_TOO_BIG
MAX_CHAIN_BYTES = lib.PV_VQ_MAX_CHAIN_BYTES     # the used ring's len is 32 bits

ERRORS = {
    E_RING: "ring size or addresses invalid (not RAM, misaligned, size not a power of 2)",
    E_AVAIL_IDX: "available index moved by more than the queue size",
    E_HEAD: "head descriptor index out of the table",
    E_NEXT: "next descriptor index out of the table",
    E_RANGE: "buffer outside guest RAM",
    E_LOOP: "descriptor chain longer than the queue (loop)",
    E_INDIRECT: "bad indirect descriptor (not negotiated, nested, with NEXT, or bad length)",
    E_ORDER: "device-readable descriptor after a device-writable one",
    E_REQ: "chain does not frame a request (too short or payload in the wrong direction)",
    E_TOO_BIG: "descriptor chain's buffers total 4 GiB or more",
}


class QueueError(Exception):
    """The driver put something malformed in a queue; `.code` is a PV_VQ_E_*."""

    def __init__(self, code, index=None):
        self.code = code
        where = "" if index is None else f"queue {index}: "
        super().__init__(where + ERRORS.get(code, f"error {code}"))


class Virtqueue:
    """Transport-visible state of one queue (§4.2.2 QueueNum/Ready/Desc/...)."""

    def __init__(self, index, max_size):
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self):
        self.size = self.max_size
        self.ready = False
        self.desc = self.driver = self.device = 0

    def __repr__(self):
        return (f"Virtqueue({self.index}, size={self.size}, ready={self.ready}, "
                f"desc=0x{self.desc:x}, driver=0x{self.driver:x}, device=0x{self.device:x})")


def native_mem(mem):
    """A `struct pv_mem` describing the RAM regions of a GuestMemory."""
    m = ffi.new("struct pv_mem *")
    if len(mem.regions) > lib.PV_MEM_MAX_REGIONS:
        raise ValueError("too many guest memory regions for the native virtqueue")
    m.nregions = len(mem.regions)
    for i, (gpa, size, off) in enumerate(mem.regions):
        m.r[i].gpa = gpa
        m.r[i].size = size
        m.r[i].host = ffi.cast("uint8_t *", mem.host_base + off)
    return m


class Chain:
    """A resolved descriptor chain: numpy views of the readable buffers, then
    of the writable ones (§2.6.4.2 order)."""
    __slots__ = ("head", "readable", "writable")

    def __init__(self, head, readable, writable):
        self.head = head
        self.readable = readable
        self.writable = writable

    @property
    def read_len(self):
        return sum(len(v) for v in self.readable)

    @property
    def write_len(self):
        return sum(len(v) for v in self.writable)


class NativeRing:
    def __init__(self, mem, queue, event_idx=False, indirect=False):
        self.mem = mem
        self.index = queue.index
        self._pvmem = native_mem(mem)
        self.vq = ffi.new("struct pv_vq *")
        self.chain = ffi.new("struct pv_chain *")  # scratch for pop / C engines
        flags = (lib.PV_VQ_F_EVENT_IDX if event_idx else 0) | (lib.PV_VQ_F_INDIRECT if indirect else 0)
        r = lib.pv_vq_init(self.vq, self._pvmem, queue.size, queue.desc, queue.driver,
                           queue.device, flags)
        if r < 0:
            raise QueueError(-r, self.index)

    @property
    def last_avail(self):
        return self.vq.last_avail

    @property
    def used_idx(self):
        return self.vq.used_idx

    @property
    def broken(self):
        return self.vq.broken

    def pop(self):
        r = lib.pv_vq_pop(self.vq, self.chain)
        if r < 0:
            raise QueueError(-r, self.index)
        if r == 0:
            return None
        c, base, arr = self.chain, self.mem.host_base, self.mem.array
        views = []
        for i in range(c.nseg):
            off = int(ffi.cast("uintptr_t", c.iov[i].iov_base)) - base
            views.append(arr[off:off + c.iov[i].iov_len])
        return Chain(c.head, views[:c.nread], views[c.nread:])

    def push(self, head, length):
        lib.pv_vq_push(self.vq, head, length)

    def need_interrupt(self):
        return bool(lib.pv_vq_need_interrupt(self.vq))

    def enable_notify(self):
        return bool(lib.pv_vq_enable_notify(self.vq))

    def fail(self, code):
        self.vq.broken = code


class PyRing:
    """virtq.c in Python, decision for decision."""

    def __init__(self, mem, queue, event_idx=False, indirect=False):
        self.mem = mem
        self.index = queue.index
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail = self.used_idx = self.signalled_used = 0
        self.signalled_valid = False
        self.broken = E_RING
        size = queue.size
        if size == 0 or size > lib.PV_VQ_MAX_SIZE or size & (size - 1):
            raise QueueError(E_RING, self.index)
        if queue.desc & 15 or queue.driver & 1 or queue.device & 3:
            raise QueueError(E_RING, self.index)
        try:
            self._desc = mem.offset(queue.desc, 16 * size)
            self._avail = mem.offset(queue.driver, 6 + 2 * size)
            self._used = mem.offset(queue.device, 6 + 8 * size)
        except GuestMemoryError:
            raise QueueError(E_RING, self.index) from None
        self.size = size
        self._mv = memoryview(mem.array)
        self.broken = 0

    def _u16(self, off):
        return struct.unpack_from("<H", self._mv, off)[0]

    def _fail(self, code):
        self.broken = code
        raise QueueError(code, self.index)

    def fail(self, code):
        self.broken = code

    def _host(self, gpa, length):
        try:
            return self.mem.offset(gpa, length)
        except GuestMemoryError:
            self._fail(E_RANGE)

    def pop(self):
        if self.broken:
            raise QueueError(self.broken, self.index)
        pending = (self._u16(self._avail + 2) - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            self._fail(E_AVAIL_IDX)
        head = self._u16(self._avail + 4 + 2 * (self.last_avail % self.size))
        if head >= self.size:
            self._fail(E_HEAD)
        table, tsize, i, total, indirect, nbytes = self._desc, self.size, head, 0, False, 0
        readable, writable, arr = [], [], self.mem.array
        while True:
            addr, length, flags, nxt = struct.unpack_from("<QIHH", self._mv, table + 16 * i)
            if flags & VRING_DESC_F_INDIRECT:
                if not self.indirect or indirect or flags & VRING_DESC_F_NEXT:
                    self._fail(E_INDIRECT)
                if length == 0 or length % 16 or length // 16 > self.size:
                    self._fail(E_INDIRECT)
                table, tsize, i, indirect = self._host(addr, length), length // 16, 0, True
                continue
            total += 1
            if total > self.size:
                self._fail(E_LOOP)
            nbytes += length
            if nbytes > MAX_CHAIN_BYTES:
                self._fail(E_TOO_BIG)
            off = self._host(addr, length)
            if flags & VRING_DESC_F_WRITE:
                writable.append(arr[off:off + length])
            else:
                if writable:
                    self._fail(E_ORDER)
                readable.append(arr[off:off + length])
            if not flags & VRING_DESC_F_NEXT:
                break
            if nxt >= tsize:
                self._fail(E_NEXT)
            i = nxt
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return Chain(head, readable, writable)

    def push(self, head, length):
        struct.pack_into("<II", self._mv, self._used + 4 + 8 * (self.used_idx % self.size), head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        struct.pack_into("<H", self._mv, self._used + 2, self.used_idx)

    def need_interrupt(self):
        if not self.event_idx:
            return not self._u16(self._avail) & VRING_AVAIL_F_NO_INTERRUPT
        old, new, valid = self.signalled_used, self.used_idx, self.signalled_valid
        self.signalled_used, self.signalled_valid = new, True
        if not valid:
            return True
        event = self._u16(self._avail + 4 + 2 * self.size)
        return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)

    def enable_notify(self):
        if self.event_idx:
            struct.pack_into("<H", self._mv, self._used + 4 + 8 * self.size, self.last_avail)
        return self._u16(self._avail + 2) != self.last_avail
