"""MSI-X for one PCI function (PCI Local Bus Specification 3.0 §6.8.2).

The capability (ID 0x11, 12 bytes) sits in configuration space:

    +2 Message Control  bits 10:0 table size - 1 (RO), 14 Function Mask, 15 MSI-X Enable
    +4 Table Offset/BIR (RO)     +8 PBA Offset/BIR (RO)

The table (16 bytes per vector: address low, address high, data, vector
control with bit 0 = mask; every vector starts masked, §6.8.2.9) and the
Pending Bit Array (one bit per vector, read-only) live in a memory BAR that
the owner decodes: it forwards accesses to `table_read/table_write` and
`pba_read/pba_write`.  Only aligned dword and qword accesses reach the
table (§6.8.2: other sizes are undefined; here reads give 0 and writes are
dropped); reserved vector-control bits read 0.

Delivery: every vector has an eventfd bound with KVM_IRQFD to a GSI of its
own, and that GSI is routed to the vector's message (KVM_SET_GSI_ROUTING
through the Vm, the one owner of the routing table).  `notify(vector)`
writes the eventfd, so KVM injects the message without a VM exit or any
more Python.  A vector that is masked (its own mask bit or the Function
Mask) instead gets its pending bit set, and is delivered when unmasked
(§6.8.2.9).  The route is (re)sent when a vector becomes unmasked with a
message different from the one KVM has, or when its message changes while
unmasked (which §6.8.2.9 leaves undefined; we follow the guest).  A message
KVM refuses leaves the vector unrouted: it then never fires, and the VMM
goes on.

`vm` is a vmm.kvm.vm.Vm or anything with alloc_gsi(), set_msi_route(gsi,
address, data), remove_msi_route(gsi) and irqfd(fd, gsi, deassign=False)
(the tests use a recording fake); with vm=None vectors count deliveries only.

Another thread may write a live vector's irqfd itself (the I/O loop's C
fast path, vmm/virtio/fastpath.py, asks `live_fd(vector)`): the owner sets
`guard` to a context manager factory that stops those writers; every change
to masks, messages or Message Control happens inside it, so nothing goes
out on a vector once the write that masked it has returned.  `delivered`
counts only the messages sent from here.
"""
import contextlib
import logging
import os
import struct
import threading

log = logging.getLogger("pyvmm.pci.msix")

CAP_ID = 0x11
CTRL_ENABLE, CTRL_MASKALL = 0x8000, 0x4000
ENTRY_SIZE = 16
VECTOR_MASKED = 1
MAX_VECTORS = 2048
_ONE = (1).to_bytes(8, "little")


class Msix:
    def __init__(self, pci, vectors, bar, table_offset, pba_offset, vm=None):
        if not 1 <= vectors <= MAX_VECTORS:
            raise ValueError(f"MSI-X: 1 to {MAX_VECTORS} vectors, not {vectors}")
        if table_offset & 7 or pba_offset & 7:
            raise ValueError("MSI-X table and PBA offsets are 8-byte aligned")
        self.pci, self.vectors, self.vm = pci, vectors, vm
        self.table_offset, self.pba_offset = table_offset, pba_offset
        self.table_size = vectors * ENTRY_SIZE
        self.pba_size = (vectors + 63) // 64 * 8
        body = struct.pack("<HII", vectors - 1, table_offset | bar, pba_offset | bar)
        self.cap = pci.add_capability(CAP_ID, body, wmask=struct.pack("<H", CTRL_ENABLE | CTRL_MASKALL))
        pci.watch_config(self.cap + 2, 2, self._control_written)
        self._lock = threading.Lock()
        self.address = [0] * vectors
        self.data = [0] * vectors
        self.masked = [True] * vectors
        self.pending = [False] * vectors
        self.delivered = [0] * vectors          # messages sent (tests and stats)
        self._routed = [None] * vectors         # (address, data) KVM has for the vector's GSI
        self._gsi = [None] * vectors
        self._fds = [None] * vectors
        self._was_enabled = self._was_maskall = False
        self.guard = contextlib.nullcontext     # see the module docstring
        if vm is not None:
            try:
                for v in range(vectors):
                    self._gsi[v] = vm.alloc_gsi()
                    self._fds[v] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                    vm.irqfd(self._fds[v], self._gsi[v])
            except BaseException:
                self.close()
                raise

    # --- state seen by the device ---
    @property
    def control(self):
        return self.pci.get(self.cap + 2, 2)

    @property
    def enabled(self):
        """MSI-X Enable as of the last Message Control write (kept in a
        field: this is read for every interrupt)."""
        return self._was_enabled

    @property
    def function_masked(self):
        return self._was_maskall

    def notify(self, vector):
        """Send `vector`'s message, or set its pending bit while masked.
        Returns True if the message went out.  With MSI-X disabled the
        function does not use it (the owner signals INTx instead)."""
        if not 0 <= vector < self.vectors or not self._was_enabled:
            return False
        with self._lock:
            if self._was_maskall or self.masked[vector]:
                self.pending[vector] = True
                return False
            return self._send(vector)

    def live_fd(self, vector):
        """The irqfd a message on `vector` goes to as things stand (enabled,
        not masked, routed), or None; valid until the next change, which
        happens inside `guard`."""
        if not 0 <= vector < self.vectors:
            return None
        with self._lock:
            if not self._live(vector) or (self._routed[vector] is None and self.vm is not None):
                return None
            return self._fds[vector]

    def _send(self, v):
        """(lock held) the vector is live: write its irqfd."""
        if self._routed[v] is None and self.vm is not None:
            return False                # KVM refused its message: nothing to deliver to
        self.delivered[v] += 1
        if self._fds[v] is not None:
            os.write(self._fds[v], _ONE)
        return True

    # --- table and PBA (BAR accesses, vCPU threads) ---
    def table_read(self, offset, size):
        if size not in (4, 8) or offset % size or not 0 <= offset < self.table_size:
            return 0
        if size == 8:
            return self.table_read(offset, 4) | self.table_read(offset + 4, 4) << 32
        v, field = divmod(offset, ENTRY_SIZE)
        with self._lock:
            return (self.address[v] & 0xFFFFFFFF, self.address[v] >> 32, self.data[v],
                    int(self.masked[v]))[field // 4]

    def table_write(self, offset, size, value):
        if size not in (4, 8) or offset % size or not 0 <= offset < self.table_size:
            log.debug("MSI-X: %d-byte table write at 0x%x ignored", size, offset)
            return
        if size == 8:
            self.table_write(offset, 4, value & 0xFFFFFFFF)
            self.table_write(offset + 4, 4, value >> 32)
            return
        v, field = divmod(offset, ENTRY_SIZE)
        value &= 0xFFFFFFFF
        with self.guard(), self._lock:
            if field == 0:
                self.address[v] = (self.address[v] & ~0xFFFFFFFF) | (value & ~3)  # dword aligned
            elif field == 4:
                self.address[v] = (self.address[v] & 0xFFFFFFFF) | value << 32
            elif field == 8:
                self.data[v] = value
            else:
                self.masked[v] = bool(value & VECTOR_MASKED)
            if self._live(v):
                self._route(v)
                if self.pending[v]:
                    self.pending[v] = False
                    self._send(v)

    def pba_read(self, offset, size):
        if size not in (4, 8) or offset % size or not 0 <= offset < self.pba_size:
            return 0
        with self._lock:
            bits = sum(1 << v for v in range(self.vectors) if self.pending[v])
        return (bits >> (8 * offset)) & ((1 << (8 * size)) - 1)

    def pba_write(self, offset, size, value):
        """The PBA is read-only (§6.8.2.10)."""

    # --- Message Control written (configuration space) ---
    def _control_written(self):
        with self.guard(), self._lock:
            ctrl = self.control
            enabled, maskall = bool(ctrl & CTRL_ENABLE), bool(ctrl & CTRL_MASKALL)
            if (enabled, maskall) == (self._was_enabled, self._was_maskall):
                return
            self._was_enabled, self._was_maskall = enabled, maskall
            for v in range(self.vectors):
                if self._live(v):
                    self._route(v)
                    if self.pending[v]:
                        self.pending[v] = False
                        self._send(v)

    def _live(self, v):
        return self.enabled and not self.function_masked and not self.masked[v]

    def _route(self, v):
        """(lock held) give KVM the vector's current message."""
        msg = (self.address[v], self.data[v])
        if self._routed[v] == msg:
            return
        if self.vm is None:
            self._routed[v] = msg
            return
        try:
            self.vm.set_msi_route(self._gsi[v], *msg)
            self._routed[v] = msg
        except ValueError as e:         # RoutingError: KVM refused the message
            log.warning("%s: MSI-X vector %d (address 0x%x data 0x%x) not routed: %s",
                        self.pci.name, v, msg[0], msg[1], e)
            self._routed[v] = None

    def gsi(self, vector):
        return self._gsi[vector]

    # --- snapshots (vmm/virtio/pci_persist.py) ---
    def state(self):
        """The table (address, data, mask per vector) and the PBA; Message
        Control (Enable, Function Mask) is in the function's config space,
        saved with it."""
        with self._lock:
            return {"vectors": self.vectors, "address": list(self.address),
                    "data": list(self.data), "masked": list(self.masked),
                    "pending": list(self.pending)}

    def restore(self, st):
        """Load state() after the config space (Message Control) was put
        back: give KVM the message of every live vector again (this
        process's GSIs and irqfds are new, the guest's messages are not)
        and send what was pending on a vector that is live (it cannot be,
        unless the state was taken between an unmask and its delivery)."""
        if int(st["vectors"]) != self.vectors:
            raise ValueError(f"MSI-X: snapshot has {st['vectors']} vectors, the function "
                             f"{self.vectors}")
        n = self.vectors
        vals = [[int(x) for x in st["address"]], [int(x) for x in st["data"]],
                [bool(x) for x in st["masked"]], [bool(x) for x in st["pending"]]]
        if any(len(v) != n for v in vals):
            raise ValueError("MSI-X: snapshot table of the wrong length")
        ctrl = self.control
        with self._lock:
            self.address = [a & 0xFFFFFFFFFFFFFFFC for a in vals[0]]
            self.data = [d & 0xFFFFFFFF for d in vals[1]]
            self.masked, self.pending = vals[2], vals[3]
            self._was_enabled, self._was_maskall = bool(ctrl & CTRL_ENABLE), bool(ctrl & CTRL_MASKALL)
            for v in range(n):
                if self._live(v):
                    self._route(v)
                    if self.pending[v]:
                        self.pending[v] = False
                        self._send(v)

    def close(self):
        for v in range(self.vectors):
            fd, self._fds[v] = self._fds[v], None
            if fd is None:
                continue
            try:
                if self.vm is not None and self._gsi[v] is not None:
                    self.vm.irqfd(fd, self._gsi[v], deassign=True)
                    if self._routed[v] is not None:
                        self.vm.remove_msi_route(self._gsi[v])
            except OSError:
                pass                    # the VM is going away anyway
            finally:
                os.close(fd)
