"""virtio-blk (virtio 1.1 §5.2) over a raw image file.

    dev = BlkDevice("disk.img", readonly=False, serial="abc")   # raises BlkError
    ...
    dev.close()      # fdatasync + close, idempotent

Each queue is drained by the C engine (native/src/blk.c: one call per kick
for the whole batch); with `num_queues` > 1 the device offers
VIRTIO_BLK_F_MQ (§5.2.3) and num_queues in its configuration, each queue
with its own ring and interrupt; `native=False` runs the same algorithm in Python
(`PyRing` + `_request_py`), for the benchmark and as a cross-check.
`io_engine="io_uring"` submits reads, writes and flushes to an io_uring (one
per queue) instead and completes them when they finish
(vmm/virtio/blk_uring.py); the default "sync" engine performs each request
during the kick.
"""
import ctypes
import errno
import fcntl
import os
import stat
import struct
import threading

from vmm.native import ffi, lib
from vmm.virtio import device as vd
from vmm.virtio import intercept_persist
from vmm.virtio.queue import E_REQ, NativeRing, PyRing, QueueError

VIRTIO_ID_BLOCK = 2
SECTOR = 512

# §5.2.3 feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.6 request types and status values
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WZ_F_UNMAP = 1
ID_BYTES = 20

QUEUE_SIZE = 256
IO_ENGINES = ("sync", "io_uring")
SIZE_MAX = 1 << 20                # largest single segment we advertise
MAX_DISCARD_SECTORS = 0x3FFFFF    # per segment (2 GiB - 512)
MAX_DISCARD_SEG = 32
DISCARD_ALIGNMENT = 8             # sectors (4 KiB)

# §5.2.4 struct virtio_blk_config: capacity, size_max, seg_max, geometry
# (cylinders, heads, sectors), blk_size, topology (exp, offset, min_io,
# opt_io), writeback, 3 unused, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# writeback, unused, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, 3 unused: 60 bytes.
CONFIG_FORMAT = "<QIIHBBIBBHIBxHIIIIIB3x"
MAX_QUEUES = 64

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10


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
            completed, irq, err, ioerr, more = self._process_py(ring)
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

    # --- the same engine in Python ---
    def _process_py(self, ring):
        completed = ioerr = err = more = 0
        budget = self.budget
        try:
            while True:
                chain = ring.pop() if completed < budget else None
                while chain is not None:
                    status, used_len = self._request_py(chain)
                    ioerr += status == S_IOERR
                    ring.push(chain.head, used_len)
                    completed += 1
                    chain = ring.pop() if completed < budget else None
                if completed >= budget:
                    more = 1
                    break
                if not ring.enable_notify():
                    break
        except QueueError as e:
            ring.fail(e.code)
            err = e.code
        irq = bool(completed) and ring.need_interrupt()
        return completed, irq, err, ioerr, more

    def _request_py(self, chain):
        rd, wr = chain.readable, chain.writable
        read_len, write_len = chain.read_len, chain.write_len
        if read_len < 16 or write_len < 1:
            raise QueueError(E_REQ, 0)
        in_len, out_len = read_len - 16, write_len - 1
        typ, _, sector = struct.unpack("<IIQ", b"".join(v.tobytes() for v in _slice(rd, 0, 16)))
        status_view = _slice(wr, out_len, 1)[0]
        used_len, s = 1, S_UNSUPP
        if typ in (T_IN, T_GET_ID) and in_len:
            raise QueueError(E_REQ, 0)
        if typ in (T_OUT, T_DISCARD, T_WRITE_ZEROES, T_FLUSH) and out_len:
            raise QueueError(E_REQ, 0)
        if typ == T_FLUSH and in_len:
            raise QueueError(E_REQ, 0)
        if typ == T_IN:
            s = S_IOERR
            if out_len % SECTOR == 0 and self._in_range(sector, out_len // SECTOR):
                if _rw_all(self.fd, _slice(wr, 0, out_len), sector * SECTOR, False):
                    s, used_len = S_OK, out_len + 1
        elif typ == T_OUT:
            s = S_IOERR
            if (not self.readonly and in_len % SECTOR == 0
                    and self._in_range(sector, in_len // SECTOR)
                    and _rw_all(self.fd, _slice(rd, 16, in_len), sector * SECTOR, True)):
                s = S_OK
        elif typ == T_FLUSH:
            try:
                os.fdatasync(self.fd)
                s = S_OK
            except OSError:
                s = S_IOERR
        elif typ == T_GET_ID:
            n = min(out_len, ID_BYTES)
            ident = self.serial.ljust(ID_BYTES, b"\0")[:n]
            pos = 0
            for v in _slice(wr, 0, n):
                v[:] = memoryview(ident)[pos:pos + len(v)]
                pos += len(v)
            s, used_len = S_OK, n + 1
        elif typ in (T_DISCARD, T_WRITE_ZEROES):
            payload = b"".join(v.tobytes() for v in _slice(rd, 16, in_len))
            s = self._discard_wz_py(payload, typ)
        status_view[0] = s
        return s, used_len

    def _in_range(self, sector, nsectors):
        return sector <= self.capacity and nsectors <= self.capacity - sector

    def _discard_wz_py(self, payload, typ):
        if self.readonly or len(payload) % 16 or len(payload) // 16 > MAX_DISCARD_SEG:
            return S_IOERR
        segs = [struct.unpack_from("<QII", payload, i) for i in range(0, len(payload), 16)]
        for sector, num, flags in segs:
            if flags & ~WZ_F_UNMAP or (typ == T_DISCARD and flags & WZ_F_UNMAP):
                return S_UNSUPP
            if num > MAX_DISCARD_SECTORS or not self._in_range(sector, num):
                return S_IOERR
        for sector, num, flags in segs:
            off, length = sector * SECTOR, num * SECTOR
            if not length:
                continue
            if typ == T_DISCARD:
                e = _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length)
                if e not in (0, errno.EOPNOTSUPP, errno.ENOSYS):
                    return S_IOERR
                continue
            if flags & WZ_F_UNMAP and not _fallocate(
                    self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, length):
                continue
            if not _fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, length):
                continue
            try:
                for pos in range(0, length, 1 << 16):
                    os.pwrite(self.fd, bytes(min(1 << 16, length - pos)), off + pos)
            except OSError:
                return S_IOERR
        return S_OK


def _slice(views, skip, length):
    """Views covering bytes [skip, skip+length) of a list of buffers."""
    out = []
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        if take:
            out.append(v[skip:skip + take])
        length -= take
        skip = 0
        if not length:
            break
    return out


def _rw_all(fd, bufs, off, write):
    """preadv/pwritev until done; a read past the end of file reads zeros."""
    bufs = [memoryview(b) for b in bufs]
    try:
        while bufs:
            n = os.pwritev(fd, bufs, off) if write else os.preadv(fd, bufs, off)
            if n == 0:
                if write:
                    return False
                for b in bufs:
                    b[:] = bytes(len(b))
                return True
            off += n
            while bufs and n >= len(bufs[0]):
                n -= len(bufs.pop(0))
            if bufs and n:
                bufs[0] = bufs[0][n:]
    except OSError:
        return False
    return True


# dlopen(NULL): libc is already mapped in every Python process; find_library("c")
# would run /sbin/ldconfig -p in a child process at import (milliseconds of start-up).
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _fallocate(fd, mode, off, length):
    """fallocate(2) with a mode (os has none); returns 0 or the errno."""
    return 0 if _libc.fallocate(fd, mode, off, length) == 0 else ctypes.get_errno()
