"""virtio-rng, the entropy device (virtio 1.1 §5.4; device type 4).

    dev = RngDevice(rate_limiter=None, ioloop=loop)

One queue (requestq); every buffer the driver offers is device-writable
and the device fills it with bytes from getrandom(2) (§5.4.6: it may fill
less; we fill it all, as kvmtool does).  No feature bits, no configuration
space.  Entropy is small and rare, so requests are handled in Python.

With a rate limiter (ratelimit.py: bytes and requests), a request the
buckets cannot pay stays in the ring and a timer on the I/O loop resumes
the queue (no busy loop; the request is served exactly once).
"""
import os
import threading

from vmm.native import ffi, lib
from vmm.virtio import device as vd
from vmm.virtio import intercept_persist
from vmm.virtio.queue import E_REQ, NativeRing, QueueError
from vmm.virtio.timer import Timers

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 256
MAX_REQUEST = 1 << 16             # bytes filled per buffer (getrandom returns at most 32 MiB)


class RngDevice(vd.VirtioDevice):
    device_type = VIRTIO_ID_RNG

    def __init__(self, rate_limiter=None, ioloop=None, queue_size=QUEUE_SIZE,
                 source=os.getrandom):
        super().__init__()
        self.queue_max_sizes = (queue_size,)
        self.features = (vd.bit(vd.VIRTIO_F_VERSION_1) | vd.bit(vd.VIRTIO_F_RING_EVENT_IDX)
                         | vd.bit(vd.VIRTIO_F_RING_INDIRECT_DESC))
        self.rate_limiter = rate_limiter
        self.ioloop = ioloop
        self._source = source
        self._ring = None
        self._interrupt = None
        self._lock = threading.Lock()     # kicks (vCPU/I-O thread) vs. timer vs. reset
        self._timers = None
        self._paused = False
        self.stats = {"requests": 0, "bytes": 0, "throttled": 0}

    def activate(self, mem, queues, interrupt):
        q = queues[0]
        if not q.ready or q.size > q.max_size:
            raise vd.VirtioError("virtio-rng: queue 0 not ready or too large at DRIVER_OK")
        with self._lock:
            self._ring = NativeRing(mem, q, event_idx=self.has(vd.VIRTIO_F_RING_EVENT_IDX),
                                    indirect=self.has(vd.VIRTIO_F_RING_INDIRECT_DESC))
            self._interrupt = interrupt
            self._paused = False

    # --- snapshots (vmm/virtio/device.py; the limiter: intercept_persist.py) ---
    def state(self):
        st = super().state()
        st["limiter"] = intercept_persist.limiter_state(self.rate_limiter)
        return st

    def restore(self, state):
        super().restore(state)
        intercept_persist.restore_limiter(self.rate_limiter, state.get("limiter"))

    def rings(self):
        """The one queue (a request the limiter held back is still on it)."""
        return {0: self._ring} if self._ring is not None else {}

    def reset(self):
        super().reset()
        with self._lock:
            self._ring = None
            self._interrupt = None
            self._paused = False

    def set_rate_limiter(self, limiter):
        """Install, replace or (None) remove the limiter while running."""
        self.rate_limiter = limiter
        self._resume()

    def queue_notify(self, index):
        if index == 0:
            self._process()

    def _resume(self):
        self._paused = False
        self._process()

    def _process(self):
        with self._lock:
            ring = self._ring
            if ring is None or ring.broken or self._paused:
                return
            done = 0
            vq, c = ring.vq, ring.chain
            try:
                while True:
                    r = lib.pv_vq_pop(vq, c)
                    while r > 0:
                        n = min(c.write_len, MAX_REQUEST)
                        lim = self.rate_limiter
                        wait = lim.consume(n) if lim is not None else 0.0
                        if wait:
                            vq.last_avail = (vq.last_avail - 1) & 0xFFFF   # stays queued
                            self._pause(wait)
                            break
                        if c.nread:                # §5.4.6.1: device-writable only
                            raise QueueError(E_REQ, 0)
                        self._fill(c, n)
                        lib.pv_vq_push(vq, c.head, n)
                        done += 1
                        self.stats["bytes"] += n
                        r = lib.pv_vq_pop(vq, c)
                    if r < 0:
                        raise QueueError(-r, 0)
                    if self._paused or not lib.pv_vq_enable_notify(vq):
                        break
            except QueueError as e:
                vq.broken = e.code
                self._interrupt.needs_reset(e)
            self.stats["requests"] += done
            if done and lib.pv_vq_need_interrupt(vq):
                self._interrupt.used(0)

    def _fill(self, c, n):
        """`n` random bytes into the chain's buffers, straight through cffi
        (no numpy: this runs on a confined I/O thread, which may not import).
        SAFETY: the segments were checked to lie in guest RAM by pv_vq_pop."""
        data = self._source(n) if n else b""
        pos = 0
        for i in range(c.nseg):
            take = min(c.iov[i].iov_len, n - pos)
            if take <= 0:
                break
            ffi.memmove(c.iov[i].iov_base, data[pos:pos + take], take)
            pos += take

    def _pause(self, wait):
        self._paused = True
        self.stats["throttled"] += 1
        if self._timers is None:
            self._timers = Timers(self.ioloop)
        self._timers.call_later(wait, self._resume)

    def close(self):
        with self._lock:
            self._ring = None
        if self._timers is not None:
            self._timers.close()
            self._timers = None

