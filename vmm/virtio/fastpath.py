"""The C fast path of a transport's queue kicks (native/src/fastpath.c).

A transport whose interrupt is an eventfd (virtio-mmio: an 8-byte 1 to a
KVM irqfd) gives each queue's notify eventfd a `struct pv_fast_queue`; the
IoLoop's thread then sleeps in C (pv_fast_wait, GIL released) and runs the
common case of a kick there: drain the eventfd, run the device's C engine
over the ring (the same budget, the same requeue), OR the ISR bit into a
shared word and write the irqfd.  Python runs everything else, as before:
a queue is enabled only while its device offers a plain C engine
(`device.fast_engine(index)`: virtio-blk with a C engine, sync or io_uring,
and no fault
rules, limiters, tracing or hooks) and the transport is live without
DEVICE_NEEDS_RESET.  Anything that changes what the C side relies on first
disables the queue (pv_fast_disable waits for a call in progress).

    fp = FastPath(irq_fd, nqueues)
    loop.add(notify_fd, handler, fast=fp.queue(i))
    fp.sync(device, live=True)      # after activation; sync(.., live=False) to stop
    with fp.held(i): ...            # Python processes queue i meanwhile
    fp.take_isr()                   # ISR bits the C side raised (folded by the transport)
    fp.set_poll_us(50)              # adaptive polling, at most 50 us (0: off; DEFAULT_POLL_US)

Legacy virtio-pci (vmm/virtio/pci_legacy.py) gives the trigger eventfd of
its INTx's KVM resample irqfd (vmm/pci/intx_irqfd.py, vmm/virtio/pci_intx.py):
the queues raise it as they raise virtio-mmio's irqfd, and its resample
eventfd has an entry of its own in the loop (`resample` set, served by
fastpath.c resample(): the line back up if ISR bits are left).

Modern virtio-pci with MSI-X (vmm/virtio/pci_modern.py) makes the FastPath
with `irq_fd=None`: each queue then has its own interrupt, the irqfd of its
MSI-X vector (no ISR bit: §4.1.4.5), handed over by sync(..., irq_fds=[fd or
None per queue]) only while the vector is live; a queue whose fd is None
(no vector, masked, MSI-X off: INTx) stays on the Python path, which sets
pending bits and drives INTx.

virtio-net (native/src/fastnet.c): `fast_engine(i)` returns (kind, struct
pv_fast_net *) instead of blk's (vq, blk, chain), and the device adds one
queue per pair for its tap fd (add_queue(tap_fd, irq_of=rx index)).  A
pair's queues share its rings, so a device with `fast_grouped` set is held
as a whole: held(i) stops every queue (nested holds counted) and, once the
last one ends, re-decides with sync's last arguments; `device.fast_stopped()`
runs whenever everything was stopped (the device folds in what C changed).
"""
import contextlib
import threading

from vmm.native import ffi, lib
from vmm.virtio import device as vd


# Adaptive polling's longest window by default (--drive poll_us=).  QEMU's
# IOThread default is 32 us; here a driver's turnaround at queue depth 1 on
# an idle host is one thread wake-up (~20 us measured: bench/blk.py "QD1
# wake-up bound", 24.5k round trips/s) plus the driver's own work, and the
# window must cover it to save the device's wake-up.  The window adapts
# (0 when kicks come further apart) and the thread does not poll while it
# is being preempted (a loaded host), so a device that is idle, or on a
# host with no core to spare, does not spin (native/src/fastpath.c).
DEFAULT_POLL_US = 50


class FastPath:
    def __init__(self, irq_fd, nqueues, poll_us=DEFAULT_POLL_US):
        """`irq_fd`: the transport's one interrupt eventfd (the ISR's used
        bit is set with it), or None: a vector per queue (sync's irq_fds)."""
        self.irq = ffi.new("struct pv_fast_irq *")
        self.irq.fd = -1 if irq_fd is None else irq_fd
        self.per_queue = irq_fd is None
        # per-queue interrupts (MSI-X): one struct each, fd set by sync()
        self._irqs = [ffi.new("struct pv_fast_irq *") if self.per_queue else self.irq
                      for _ in range(nqueues)]
        self._q = []
        for i in range(nqueues):
            q = ffi.new("struct pv_fast_queue *")
            q.notify_fd = -1
            q.irq = self._irqs[i]
            q.irq.fd = self.irq.fd
            q.isr_bit = 0 if self.per_queue else vd.INT_USED
            q.poll_us = poll_us
            self._q.append(q)
        self._engines = [None] * nqueues     # keeps the cdata the C side points at alive
        self._seen = [(0, 0, 0)] * nqueues
        self._irq_of = list(range(nqueues))  # whose interrupt each queue raises
        self._device = None
        self._last = None                    # sync()'s (live, irq_fds), for hold ends
        self._holds = 0                      # grouped devices: holds in progress
        self._resync = False                 # re-decide when the last hold ends
        self._hold_lock = threading.RLock()  # holds vs. sync (before any device lock)

    def add_queue(self, fd, irq_of):
        """One more fast fd (a NIC's tap) raising queue `irq_of`'s interrupt;
        returns its index (for fast_engine and queue_struct)."""
        q = ffi.new("struct pv_fast_queue *")
        q.notify_fd = fd
        q.irq = self._irqs[irq_of]
        q.isr_bit = self._q[irq_of].isr_bit
        self._q.append(q)
        self._engines.append(None)
        self._seen.append((0, 0, 0))
        self._irq_of.append(irq_of)
        return len(self._q) - 1

    def queue(self, index, notify_fd):
        q = self._q[index]
        q.notify_fd = notify_fd
        return q

    def queue_struct(self, index):
        """Queue `index`'s struct (another fd of the queue: IoLoop.set_fast)."""
        return self._q[index]

    def enabled(self, index):
        return bool(self._q[index].enabled)

    def set_poll_us(self, us):
        """Adaptive polling (QEMU's poll-max-ns): after a kick's work, look
        at the ring for a window of at most `us` microseconds before
        sleeping; the window adapts (native/src/fastpath.c adapt_poll).
        0: off."""
        for q in self._q:
            q.poll_us = max(0, int(us))

    def disable(self):
        """Every queue off the fast path until the next sync()."""
        # the lock: a hold ending on another thread must not re-enable
        # what this turns off (it re-decides only while _last is set)
        with self._hold_lock:
            for i, q in enumerate(self._q):
                lib.pv_fast_disable(q)
                self._engines[i] = None
            self._last = None
            self._stopped()

    def _stopped(self):
        stopped = getattr(self._device, "fast_stopped", None)
        if stopped is not None:
            stopped()

    def sync(self, device, live, irq_fds=None):
        """(Re)decide every queue: enabled iff `live` and the device offers a
        C engine for it now (and, per-queue interrupts, irq_fds[i] is not
        None: the live vector's irqfd)."""
        with self._hold_lock:
            self._device = device
            bind = getattr(device, "fast_bind", None)
            if bind is not None:
                bind(self)      # the device folds take_counts() into its counters
            self._last = (live, irq_fds)
            for q in self._q:
                lib.pv_fast_disable(q)
            self._stopped()
            if self._holds:
                self._resync = True
                return          # the last hold re-decides
            for i, q in enumerate(self._q):
                fd = self.irq.fd
                if self.per_queue:
                    j = self._irq_of[i]
                    fd = irq_fds[j] if irq_fds is not None and j < len(irq_fds) else None
                    fd = -1 if fd is None else fd
                    q.irq.fd = fd
                eng = (getattr(device, "fast_engine", lambda i: None)(i)
                       if live and q.notify_fd >= 0 and fd >= 0 else None)
                self._engines[i] = eng
                if eng is not None:
                    if len(eng) == 2:   # virtio-net: (kind, struct pv_fast_net *)
                        q.kind, q.fnet = eng
                    else:
                        q.vq, q.blk, q.chain = eng[:3]
                        q.uring = eng[3] if len(eng) > 3 else ffi.NULL    # io_uring engine
                    lib.pv_fast_enable(q)

    @contextlib.contextmanager
    def hold_all(self):
        """Every queue off the fast path for the duration (nested holds
        counted); the last one to end re-decides with sync's arguments, unless
        disable() came meanwhile (a reset, DEVICE_NEEDS_RESET: the transport
        syncs when it is live again)."""
        with self._hold_lock:
            self._holds += 1
            if self._holds == 1:
                # nothing was on the C path (the slow path is set, a vector
                # is masked...): what could put it back syncs itself
                # (configure, MSI-X changes, activation), so a Python-path
                # kick does not pay for re-deciding every queue
                self._resync = any(e is not None for e in self._engines)
                for q in self._q:
                    lib.pv_fast_disable(q)
                self._stopped()
        try:
            yield
        finally:
            with self._hold_lock:
                self._holds -= 1
                if (not self._holds and self._resync and self._last is not None
                        and self._device is not None):
                    self.sync(self._device, *self._last)

    @contextlib.contextmanager
    def held(self, index):
        """Queue `index` off the fast path for the duration (another thread
        processes it in Python); re-enabled after if it was."""
        if getattr(self._device, "fast_grouped", False):
            with self.hold_all():
                yield
            return
        q = self._q[index] if 0 <= index < len(self._q) else None
        was = q is not None and q.enabled
        if was:
            lib.pv_fast_disable(q)
        try:
            yield
        finally:
            if was and self._engines[index] is not None:
                lib.pv_fast_enable(q)

    def take_error(self, index):
        """The queue error the C engine hit (0 if none), cleared."""
        q = self._q[index]
        err, q.error = -q.error, 0
        return err

    def take_isr(self):
        # a plain read first: a cffi call drops and retakes the GIL, which
        # costs a thread switch when another thread is waiting for it
        return lib.pv_fast_isr_take(self.irq) if self.irq.isr else 0

    @property
    def interrupts(self):
        if self.per_queue:
            return sum(irq.count for irq in self._irqs)
        return self.irq.count

    def take_counts_by_queue(self):
        """Per queue, (kicks, requests, ioerr) done in C since the last call
        (of this or take_counts: one baseline)."""
        out = []
        for i, q in enumerate(self._q):
            now = (q.kicks, q.requests, q.ioerr)
            out.append(tuple(n - s for n, s in zip(now, self._seen[i])))
            self._seen[i] = now
        return out

    def take_counts(self):
        """(kicks, requests, ioerr) done in C since the last call, all queues."""
        per = self.take_counts_by_queue()
        return tuple(sum(c[k] for c in per) for k in range(3))

    @property
    def polled(self):
        return sum(q.polled for q in self._q)
