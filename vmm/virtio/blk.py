"""virtio-blk (virtio 1.1 §5.2) over a raw image file.

    dev = BlkDevice("disk.img", readonly=False, serial="abc")   # raises BlkError
    ...
    dev.close()      # fdatasync + close, idempotent

Each queue is drained by the C engine (native/src/blk.c: one call per kick
for the whole batch); with `num_queues` > 1 the device offers
VIRTIO_BLK_F_MQ (§5.2.3) and num_queues in its configuration, each queue
with its own ring and interrupt; `native=False` runs the same algorithm in Python
(`PyRing` + vmm/virtio/blk_py.py), for the benchmark and as a cross-check.
`io_engine="io_uring"` submits reads, writes and flushes to an io_uring (one
per queue) instead and completes them when they finish
(vmm/virtio/blk_uring.py); the default "sync" engine performs each request
during the kick.
"""
import fcntl
import os
import stat
import struct
import threading

from vmm.native import ffi, lib
from vmm.virtio import device as vd
from vmm.virtio import intercept_persist
from vmm.virtio.blk_spec import (  # noqa: F401 (re-exported: vmm.virtio.blk.S_OK, ...)
    VIRTIO_ID_BLOCK, SECTOR, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_WRITE_ZEROES, T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES, S_OK,
    S_IOERR, S_UNSUPP, WZ_F_UNMAP, ID_BYTES, QUEUE_SIZE, IO_ENGINES, SIZE_MAX,
    MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT, CONFIG_FORMAT, MAX_QUEUES,
    FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE)
from vmm.virtio.queue import NativeRing, PyRing, QueueError



class BlkError(vd.VirtioError):
    """A virtio-blk configuration or image problem (one line, names the image)."""


class BlkDevice(vd.VirtioDevice):
    device_type = VIRTIO_ID_BLOCK

    def __init__(self, path, readonly=False, serial=None, native=True, queue_size=QUEUE_SIZE,
                 num_queues=1, io_engine="sync", ioloop=None):
        super().__init__()
        if not 1 <= num_queues <= MAX_QUEUES:
            raise BlkError(f"disk image {path}: 1 to {MAX_QUEUES} queues, not {num_queues}")
        if io_engine not in IO_ENGINES:
            raise BlkError(f"disk image {path}: unknown io_engine {io_engine!r} "
                           f"(available: {', '.join(IO_ENGINES)})")
        self.path = os.fspath(path)
        self.readonly = bool(readonly)
        self.native = bool(native)
        self.queue_max_sizes = (queue_size,) * num_queues
        if isinstance(serial, str):
            serial = serial.encode()
        serial = serial or b""
        if len(serial) > ID_BYTES:
            raise BlkError(f"disk image {self.path}: serial longer than {ID_BYTES} bytes")
        self.serial = serial
        self.fd = self._open()
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        self.capacity = self.size // SECTOR
        blk = self._blk = ffi.new("struct pv_blk *")
        blk.fd = self.fd
        blk.readonly = int(self.readonly)
        blk.capacity = self.capacity
        blk.max_discard_sectors = blk.max_write_zeroes_sectors = MAX_DISCARD_SECTORS
        blk.max_discard_seg = blk.max_write_zeroes_seg = MAX_DISCARD_SEG
        ffi.memmove(blk.id, serial.ljust(ID_BYTES, b"\0"), ID_BYTES)
        self._res = ffi.new("struct pv_blk_result *")
        f = (vd.bit(vd.VIRTIO_F_VERSION_1) | vd.bit(vd.VIRTIO_F_RING_EVENT_IDX)
             | vd.bit(vd.VIRTIO_F_RING_INDIRECT_DESC) | vd.bit(VIRTIO_BLK_F_SIZE_MAX)
             | vd.bit(VIRTIO_BLK_F_SEG_MAX) | vd.bit(VIRTIO_BLK_F_BLK_SIZE) | vd.bit(VIRTIO_BLK_F_FLUSH))
        if num_queues > 1:
            f |= vd.bit(VIRTIO_BLK_F_MQ)
        if self.readonly:
            f |= vd.bit(VIRTIO_BLK_F_RO)
        else:
            f |= vd.bit(VIRTIO_BLK_F_DISCARD) | vd.bit(VIRTIO_BLK_F_WRITE_ZEROES)
        self.features = f
        self._rings = []
        self._interrupt = None
        self._stats = {"kicks": 0, "requests": 0, "ioerr": 0}
        # the I/O thread's Python paths count while others (metrics, the API,
        # tests) read, and each read folds in the C side's counts: one lock,
        # or a concurrent fold counts C's requests twice or loses an increment
        self._stats_lock = threading.Lock()
        self._fastpath = None     # the transport's C fast path (vmm/virtio/fastpath.py)
        self.ioloop = None        # for timers of the slow path (set by the owner)
        self.intercept = None     # limiter/faults/trace/hook: vmm/virtio/intercept.py
        self.io_engine = io_engine
        self._engines = []        # io_uring: one per queue, completions on `ioloop`
        if io_engine == "io_uring":
            from vmm.virtio.blk_uring import UringEngine
            try:
                for i in range(num_queues):
                    self._engines.append(UringEngine(self._blk, queue_size, ioloop, index=i))
                    self._engines[-1].on_reaped = self._count
            except OSError as e:
                for eng in self._engines:
                    eng.close()
                os.close(self.fd)
                raise BlkError(f"disk image {self.path}: io_engine=io_uring unavailable: "
                               f"{e.strerror}") from None

    @property
    def _ring(self):
        """Queue 0's ring (the only one without MQ)."""
        return self._rings[0] if self._rings else None

    def _open(self):
        flags = (os.O_RDONLY if self.readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags)
        except OSError as e:
            raise BlkError(f"cannot open disk image {self.path}: {e.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise BlkError(f"disk image {self.path} is not a regular file or block device")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BlkError(f"disk image {self.path} is in use by another process") from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def config_bytes(self):
        return struct.pack(
            CONFIG_FORMAT, self.capacity, SIZE_MAX, self.queue_max_sizes[0] - 2,
            0, 0, 0, SECTOR, 0, 0, 0, 0, 0, self.num_queues,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, DISCARD_ALIGNMENT,
            MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)

    # --- device contract ---
    def activate(self, mem, queues, interrupt):
        if self.fd < 0:
            raise BlkError(f"disk image {self.path} is closed")
        # §5.2.5: without MQ only queue 0; with it, the queues the driver enabled
        used = queues if self.has(VIRTIO_BLK_F_MQ) else queues[:1]
        q = queues[0]
        if not q.ready or any(x.ready and x.size > x.max_size for x in used):
            raise BlkError(f"disk image {self.path}: queue 0 not ready or too large at DRIVER_OK")
        ring = NativeRing if self.native else PyRing
        kw = dict(event_idx=self.has(vd.VIRTIO_F_RING_EVENT_IDX),
                  indirect=self.has(vd.VIRTIO_F_RING_INDIRECT_DESC))
        self._rings = [ring(mem, x, **kw) if x.ready else None for x in used]
        self._interrupt = interrupt

    @property
    def stats(self):
        """{kicks, requests, ioerr}: the Python paths' counts plus the C fast
        path's (read-only for callers: counting goes through _count)."""
        with self._stats_lock:
            st = self._stats
            if self._fastpath is not None:
                kicks, requests, ioerr = self._fastpath.take_counts()
                st["kicks"] += kicks
                st["requests"] += requests
                st["ioerr"] += ioerr
        return st

    @property
    def fast_capable(self):
        """Whether the C fast path may ever serve this disk (either C
        engine: sync, or io_uring with its completion eventfd on the same
        loop, native/src/fasturing.c)."""
        return self.native

    def fast_bind(self, fastpath):
        self._fastpath = fastpath
        for eng in self._engines:       # completions wake the C loop too
            eng.attach_fast(fastpath.queue_struct(eng.index))

    def fast_engine(self, index):
        """(vq, blk, chain[, uring]) for the C fast path (native/src/
        fastpath.c) when queue `index` needs nothing but a C engine: no fault
        rules, limiters, tracing or hooks (the slow path).  io_uring: the
        ring too (the engine learns the ring and interrupt first, so its
        Python handler can reap whatever C left in flight once the queue is
        disabled)."""
        rings = self._rings
        ring = rings[index] if 0 <= index < len(rings) else None
        if (ring is None or not self.native or self.intercept is not None
                or ring.broken or self.fd < 0):
            return None
        if self._engines:
            eng = self._engines[index]
            eng.bind(ring, self._interrupt)
            return ring.vq, self._blk, ring.chain, eng.handle
        return ring.vq, self._blk, ring.chain

    def _count(self, completed, ioerr, kicks=0):
        with self._stats_lock:
            st = self._stats
            st["kicks"] += kicks
            st["requests"] += completed
            st["ioerr"] += ioerr

    def reset(self):
        super().reset()
        for eng in self._engines:
            eng.drain()           # nothing may complete into the old rings
        self._rings = []
        self._interrupt = None
        if self.intercept is not None:
            self.intercept.paused = False

    def faults_counts(self):
        """{rule: times fired} of the installed fault rules ({} if none)."""
        f = self.intercept and self.intercept.faults
        return f.counts() if f else {}

    def configure(self, **changes):
        """limiter=, faults=, tracer=, hook= (None removes), also while running:
        see vmm/virtio/intercept.py."""
        from vmm.virtio.intercept import configure_blk
        hold = getattr(self._interrupt, "fast_hold", None)
        if hold is None:
            configure_blk(self, **changes)
            return
        with hold():            # the C fast path stops, then re-decides (intercept set?)
            configure_blk(self, **changes)

    @property
    def budget(self):
        """Requests done per queue_notify() call at most (issue #14: a guest
        must not keep the device's thread busy for as long as it likes)."""
        return self._blk.budget or lib.PV_BLK_BUDGET

    @budget.setter
    def budget(self, n):
        self._blk.budget = n

    def queue_notify(self, index):
        """Process up to `budget` requests; returns True if the budget ran
        out (the transport then calls again later: no request is lost, and
        none is done twice since the ring's position is kept)."""
        rings = self._rings
        ring = rings[index] if 0 <= index < len(rings) else None
        if ring is None or ring.broken:
            return False
        self._count(0, 0, kicks=1)
        if self.intercept is not None and self.native:      # the slow path, off by default
            completed, irq, err, ioerr, more = self.intercept.process(self, ring, index)
        elif self._engines and self.native:
            completed, irq, err, ioerr, more = self._engines[index].submit(ring, self._interrupt)
        elif self.native:
            res = self._res
            lib.pv_blk_process(ring.vq, self._blk, ring.chain, res)
            completed, irq, err, ioerr, more = (res.completed, res.interrupt, -res.error,
                                                res.ioerr, res.more)
        else:
            from vmm.virtio import blk_py       # native=False only: not at start-up
            completed, irq, err, ioerr, more = blk_py.process(self, ring)
        self._count(completed, ioerr)
        if irq:
            self._interrupt.used(index)
        if err:
            self._interrupt.needs_reset(QueueError(err, index))
            return False
        return bool(more)

    def replace_image(self, path):
        """Back the disk by another image (Firecracker's PATCH /drives path_on_host;
        the caller holds the device quiescent, e.g. the VM paused, and then
        raises a configuration-change interrupt, §5.2.4: capacity may change).
        On error the old image stays in use."""
        for eng in self._engines:
            eng.finish()          # requests in flight complete on the old image
        old_path, old_fd = self.path, self.fd
        self.path = os.fspath(path)
        try:
            fd = self._open()
        except BaseException:
            self.path = old_path
            raise
        self.fd = fd
        self.size = os.lseek(fd, 0, os.SEEK_END)
        self.capacity = self.size // SECTOR
        self._blk.fd = fd
        self._blk.capacity = self.capacity
        if old_fd >= 0:
            try:
                if not self.readonly:
                    os.fdatasync(old_fd)
            finally:
                os.close(old_fd)

    # --- snapshots (vmm/virtio/device.py) ---
    def state(self):
        st = super().state()
        st.update(path=self.path, readonly=self.readonly, serial=self.serial.hex(),
                  capacity=self.capacity, native=self.native,
                  intercept=intercept_persist.state(self.intercept))   # limiter budgets, faults
        return st

    def restore(self, state):
        if int(state["capacity"]) != self.capacity:
            raise BlkError(f"disk image {self.path}: {self.capacity} sectors, the snapshot's "
                           f"disk had {state['capacity']}")
        if bool(state["readonly"]) != self.readonly:
            raise BlkError(f"disk image {self.path}: read-only must be "
                           f"{'on' if state['readonly'] else 'off'} as in the snapshot")
        super().restore(state)
        intercept_persist.restore(self.intercept, state.get("intercept"))

    def rings(self):
        intercept_persist.check(self.intercept)     # a hook or a delayed request: refused
        for eng in self._engines:       # io_uring: requests in flight complete first
            for _ in range(eng.inflight):
                if not eng.inflight:
                    break
                eng.finish()
        return {i: r for i, r in enumerate(self._rings) if r is not None}

    def close(self):
        """Flush and close the image (idempotent)."""
        engines, self._engines = self._engines, []
        for eng in engines:
            eng.close()           # waits for requests in flight
        fd, self.fd = self.fd, -1
        self._rings = []
        icpt, self.intercept = self.intercept, None
        if icpt is not None:
            icpt.close()          # stops its timers, closes its trace file
        if fd >= 0:
            try:
                if not self.readonly:
                    os.fdatasync(fd)
            finally:
                os.close(fd)
