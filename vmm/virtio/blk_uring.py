"""The io_uring engine of virtio-blk (`--drive ...,io_engine=io_uring`;
Firecracker's io_engine "Async"): reads, writes and flushes are submitted to
an io_uring (native/src/uring.c) on a kick and the kick returns at once; their
completions are reaped in C when the ring's eventfd fires on the I/O loop,
and only then is the used ring updated and the driver interrupted.

    eng = UringEngine(blk, queue_size, ioloop, index=0)   # OSError if unavailable
    eng.submit(ring, interrupt) -> (completed, irq, err, ioerr, more)
    eng.bind(ring, interrupt); eng.attach_fast(q)   # served by the C fast path
    eng.finish()   # wait for requests in flight and complete them
    eng.drain()    # wait for them and drop them (reset)
    eng.close()

Without an I/O loop (unit tests driving the device on their own thread) a
kick waits for its own requests, so the device behaves synchronously.

On the I/O loop's C fast path (vmm/virtio/fastpath.py, native/src/
fasturing.c) C submits and reaps on this same ring while the queue is
enabled; the completion eventfd is then mapped to the queue in the loop's C
table, and its Python handler runs only while the queue is disabled, to reap
what C left in flight.
"""
import os
import threading

from vmm.native import ffi, lib
from vmm.virtio.ioloop import drain_eventfd


def available():
    """(True, "") if this kernel gives us an io_uring, else (False, reason)."""
    err = ffi.new("int *")
    u = lib.pv_uring_new(2, -1, err)
    if u == ffi.NULL:
        return False, os.strerror(err[0])
    lib.pv_uring_free(u)
    return True, ""


class UringEngine:
    def __init__(self, blk, entries, ioloop=None, index=0):
        self.index = index                # the queue this ring serves
        self._blk = blk                   # struct pv_blk * (fd, capacity, readonly)
        self._ioloop = ioloop
        self._efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if ioloop else -1
        err = ffi.new("int *")
        u = lib.pv_uring_new(entries, self._efd, err)
        if u == ffi.NULL:
            if self._efd >= 0:
                os.close(self._efd)
            raise OSError(err[0], f"io_uring: {os.strerror(err[0])}")
        self._u = u                       # freed by close()
        self._res = ffi.new("struct pv_blk_result *")
        self._lock = threading.Lock()     # kicks (vCPU or I/O thread) vs. reaping vs. reset
        self._ring = self._interrupt = None
        self.stats = {"reaped": 0}
        self._fast_q = None               # the C fast path's queue this eventfd wakes
        if ioloop is not None:
            ioloop.add(self._efd, self._on_completion)
            # a paused I/O thread leaves nothing in flight: the kernel must not
            # write guest RAM or the disk while the VM is paused (snapshots)
            ioloop.on_park(self.finish)

    @property
    def inflight(self):
        return lib.pv_uring_inflight(self._u)

    @property
    def handle(self):
        """The `struct pv_uring *` (for the C fast path)."""
        return self._u

    def bind(self, ring, interrupt):
        """The ring and interrupt C serves from now on (fast path): the
        eventfd's Python handler completes into them when C is off."""
        with self._lock:
            self._ring, self._interrupt = ring, interrupt

    def attach_fast(self, q):
        """Let the loop's C wait serve this ring's completions for fast
        queue `q` (once; the mapping goes with the eventfd's removal)."""
        if self._ioloop is not None and self._fast_q is None and self._efd >= 0:
            self._fast_q = q
            self._ioloop.set_fast(self._efd, q)

    def submit(self, ring, interrupt):
        """Take the queue's new requests (at most the device's budget);
        returns (completed now, irq, err, ioerr, more)."""
        with self._lock:
            self._ring, self._interrupt = ring, interrupt
            res = self._res
            lib.pv_blk_uring_submit(ring.vq, self._blk, self._u, ring.chain, res)
            out = [res.completed, res.interrupt, -res.error, res.ioerr, res.more]
            if self._ioloop is None and lib.pv_uring_inflight(self._u):
                lib.pv_blk_uring_reap(ring.vq, self._blk, self._u, 1, res)   # no loop: wait here
                out[0] += res.completed
                out[1] = out[1] or res.interrupt
                out[3] += res.ioerr
            return tuple(out)

    def _on_completion(self):
        """I/O loop: the ring's eventfd fired; push what completed, interrupt."""
        drain_eventfd(self._efd)
        with self._lock:
            ring, interrupt = self._ring, self._interrupt
            if ring is None or ring.broken:
                return
            res = self._res
            lib.pv_blk_uring_reap(ring.vq, self._blk, self._u, 0, res)
            completed, irq, ioerr = res.completed, res.interrupt, res.ioerr
        self.stats["reaped"] += completed
        self.on_reaped(completed, ioerr)
        if irq:
            interrupt.used(self.index)

    def finish(self):
        """Wait for every request in flight and complete it (used ring,
        interrupt); on a broken ring (the driver must reset: no used
        element may go out) wait for them and drop them, as a reset would,
        so nothing is left writing guest RAM (a pause, a snapshot)."""
        with self._lock:
            ring, interrupt = self._ring, self._interrupt
            if self._u is None:
                return
            if ring is None or ring.broken:
                lib.pv_uring_drain(self._u)
                return
            res = self._res
            lib.pv_blk_uring_reap(ring.vq, self._blk, self._u, 1, res)
            completed, irq, ioerr = res.completed, res.interrupt, res.ioerr
        self.on_reaped(completed, ioerr)
        if irq:
            interrupt.used(self.index)

    def on_reaped(self, completed, ioerr):
        """Hook for the device's counters."""

    def drain(self):
        """Wait for everything in flight and forget the ring (device reset)."""
        with self._lock:
            if self._u is not None:
                lib.pv_uring_drain(self._u)
            self._ring = self._interrupt = None

    def close(self):
        if self._ioloop is not None and self._efd >= 0:
            self._ioloop.remove(self._efd)
            self._ioloop.on_park(self.finish, add=False)
        self.drain()
        u, self._u = self._u, None
        if u is not None:
            lib.pv_uring_free(u)
        if self._efd >= 0:
            os.close(self._efd)
            self._efd = -1
