"""The per-request slow path of virtio-blk and virtio-net: rate limiters,
injected faults, traces and Python hooks.

The C engines (native/src/blk.c, net.c) drain a whole batch per call and stay
exactly as they are while nothing here is configured: `dev.intercept` is None
and blk.py/net.py take their usual single C call.  Once anything is set
(`configure(dev, ...)`, from the CLI at attach or from the API while
running), each request goes through Python here: popped by the C ring walker
(pv_vq_pop), looked at, then performed by the C request code
(pv_blk_request) or written/delivered here (net), and pushed.

- Rate limit: a request the buckets cannot pay is given back to the ring
  (last_avail - 1: popped again later, so never lost and never done twice),
  the queue pauses and a timerfd on the device's I/O loop resumes it.
- Faults (faults.py): an injected error answers the request before any I/O
  (a failed write never touches the image); a delay completes it later from
  the timer (requests may complete out of order, as virtio allows).
- Hooks: `hook.blk_request(req)` / `hook.net_frame(direction, frame)` see every
  request (see examples/hooks.py); their return value may decide its fate.

This file holds the shared parts and the virtio-blk path; intercept_net.py
the virtio-net one.
"""
import struct
import threading
import time

from vmm.native import ffi, lib
from vmm.virtio.queue import QueueError
from vmm.virtio.timer import Timers
from vmm.virtio.trace import BLK_TYPES     # at load: I/O threads may not import (seccomp)

T_IN, T_OUT, T_FLUSH, T_GET_ID = 0, 1, 4, 8
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
HOOK_STATUS = {"ioerr": S_IOERR, "error": S_IOERR, "unsupp": S_UNSUPP}


class BlkRequest:
    """What a hook sees of one disk request (read-only)."""
    __slots__ = ("type", "sector", "nbytes", "data")

    def __init__(self, typ, sector, nbytes, data):
        self.type, self.sector, self.nbytes, self.data = typ, sector, nbytes, data

    @property
    def kind(self):
        return BLK_TYPES.get(self.type, str(self.type))

    def __repr__(self):
        return f"BlkRequest({self.kind}, sector={self.sector}, nbytes={self.nbytes})"


def _chain_bytes(c, first, last, limit=None):
    parts, total = [], 0
    for i in range(first, last):
        n = c.iov[i].iov_len
        if limit is not None:
            n = min(n, limit - total)
        if n:
            parts.append(bytes(ffi.buffer(c.iov[i].iov_base, n)))
            total += n
        if limit is not None and total >= limit:
            break
    return b"".join(parts)


def _hook_decision(result):
    """A hook's return value -> (status or None, delay seconds)."""
    if result is None:
        return None, 0.0
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return None, max(0.0, float(result))
    if result in HOOK_STATUS:
        return HOOK_STATUS[result], 0.0
    raise ValueError(f"hook returned {result!r} (None, 'ioerr', 'unsupp' or a delay in s)")


class _Base:
    def __init__(self, ioloop):
        self.ioloop = ioloop
        self._timers = None
        self.lock = threading.RLock()
        self.closed = False

    @property
    def timers(self):
        if self._timers is None:
            self._timers = Timers(self.ioloop)
        return self._timers

    def close(self):
        self.closed = True
        if self._timers is not None:
            self._timers.close()
            self._timers = None
        for name in ("tracer", "pcap"):
            _close_writer(getattr(self, name, None))


class BlkIntercept(_Base):
    def __init__(self, ioloop=None, limiter=None, faults=None, tracer=None, hook=None):
        super().__init__(ioloop)
        self.limiter, self.faults, self.tracer, self.hook = limiter, faults, tracer, hook
        self.paused = False
        self.delayed = 0               # requests waiting on an injected delay
        self._used_len = ffi.new("uint32_t *")

    @property
    def active(self):
        return any(x is not None for x in (self.limiter, self.faults, self.tracer, self.hook))

    def _parse(self, c):
        """(type, sector, nbytes, well_formed) from a popped chain."""
        if c.read_len < 16 or c.write_len < 1:
            return 0, 0, 0, False
        typ, _, sector = struct.unpack("<IIQ", _chain_bytes(c, 0, c.nread, 16))
        in_len, out_len = c.read_len - 16, c.write_len - 1
        if typ in (T_IN, T_GET_ID):
            ok, n = in_len == 0, out_len
        else:
            ok, n = out_len == 0, in_len
        if typ == T_FLUSH:
            ok, n = in_len == 0 and out_len == 0, 0
        return typ, sector, n if typ in (T_IN, T_OUT) else 0, ok

    def process(self, dev, ring, index=0):
        """Drain a queue as pv_blk_process does, at most dev.budget requests;
        (completed, irq, err, ioerr, more)."""
        with self.lock:
            vq, c = ring.vq, ring.chain
            completed = ioerr = err = taken = more = 0
            budget = dev.budget
            while not self.paused:
                while not self.paused and taken < budget:
                    r = lib.pv_vq_pop(vq, c)
                    if r <= 0:
                        err = -r if r < 0 else 0
                        break
                    s = self._one(dev, ring, index, c)
                    if s is None:                   # deferred (delay) or given back
                        taken += not self.paused
                        continue
                    taken += 1
                    if s < 0:
                        vq.broken = -s
                        err = -s
                        break
                    ioerr += s == S_IOERR
                    completed += 1
                if err or self.paused:
                    break
                if taken >= budget:
                    more = 1
                    break
                if not lib.pv_vq_enable_notify(vq):
                    break
            irq = bool(completed) and bool(lib.pv_vq_need_interrupt(vq))
            return completed, irq, err, ioerr, more

    def _one(self, dev, ring, index, c):
        start = time.monotonic()
        typ, sector, nbytes, ok = self._parse(c)
        if not ok:                                   # let the C engine judge the framing
            return self._perform(dev, ring, c, None, start, typ, sector, nbytes, None)
        lim = self.limiter
        if lim is not None:
            wait = lim.consume(nbytes, 1)
            if wait:
                ring.vq.last_avail = (ring.vq.last_avail - 1) & 0xFFFF
                self._pause(dev, wait)
                return None
        status, delay, fault = None, 0.0, None
        if self.faults is not None:
            status, delay, fault = self.faults.decide(typ, sector, nbytes // 512)
        if self.hook is not None and hasattr(self.hook, "blk_request"):
            data = _chain_bytes(c, 0, c.nread)[16:] if typ == T_OUT else None
            hs, hd = _hook_decision(self.hook.blk_request(BlkRequest(typ, sector, nbytes, data)))
            if hs is not None and status is None:
                status, fault = hs, "hook"
            delay += hd
        if delay > 0:
            saved = ffi.new("struct pv_chain *")
            ffi.memmove(saved, c, ffi.sizeof("struct pv_chain"))
            self.delayed += 1
            self.timers.call_later(delay, self._complete_later, dev, ring, index, saved,
                                   status, start, typ, sector, nbytes, fault)
            return None
        return self._perform(dev, ring, c, status, start, typ, sector, nbytes, fault)

    def _perform(self, dev, ring, c, status, start, typ, sector, nbytes, fault):
        if status is None:
            s = lib.pv_blk_request(dev._blk, c, self._used_len)
            if s < 0:
                return s
            used = self._used_len[0]
        else:
            s, used = status, 1
            _set_status_byte(c, s)
        lib.pv_vq_push(ring.vq, c.head, used)
        if self.tracer is not None:
            self.tracer.request(start, typ, sector, nbytes, s, fault)
        hook = self.hook
        if hook is not None and hasattr(hook, "blk_done"):
            hook.blk_done(BlkRequest(typ, sector, nbytes, None), s)
        return s

    def _complete_later(self, dev, ring, index, c, status, start, typ, sector, nbytes, fault):
        with self.lock:
            self.delayed -= 1
            irq = dev._interrupt
            if self.closed or ring not in dev._rings or ring.vq.broken or irq is None:
                return                                   # reset meanwhile: dropped with the ring
            s = self._perform(dev, ring, c, status, start, typ, sector, nbytes, fault)
            if s < 0:
                ring.vq.broken = -s
                irq.needs_reset(_queue_error(-s, index))
                return
            dev._count(1, int(s == S_IOERR))
            if lib.pv_vq_need_interrupt(ring.vq):
                irq.used(index)

    def _pause(self, dev, wait):
        self.paused = True
        self.timers.call_later(wait, self.resume, dev)

    def resume(self, dev):
        """Timer (or an update): run the queues again (the limiter is the
        device's, shared by its queues)."""
        self.paused = False
        for i, ring in enumerate(list(dev._rings)):
            if ring is not None:
                _notify(dev, i)


def _set_status_byte(c, s):
    """The last device-writable byte of a virtio-blk chain is its status (§5.2.6)."""
    for i in range(c.nseg - 1, c.nread - 1, -1):
        n = c.iov[i].iov_len
        if n:
            ffi.cast("uint8_t *", c.iov[i].iov_base)[n - 1] = s
            return


def _queue_error(code, index):
    return QueueError(code, index)


def _notify(dev, index):
    """Process queue `index` as a driver notification would (through the
    transport: its lock, its activation check, and again while the device
    reports work left)."""
    t = dev._interrupt
    if t is not None and hasattr(t, "notify"):
        t.notify(index)


def _result(res, vq, completed, error, state):
    res.completed, res.error, res.state = completed, error, state
    res.interrupt = int(bool(completed) and bool(lib.pv_vq_need_interrupt(vq)))


_UNSET = object()


def _close_writer(w):
    if w is not None and hasattr(w, "close"):
        w.close()


def _apply(dev, icpt, changes, keys):
    for k, v in changes.items():
        if k not in keys:
            raise TypeError(f"unknown setting {k!r}")
        old = getattr(icpt, k)
        if old is not v and k in ("tracer", "pcap"):
            _close_writer(old)
        setattr(icpt, k, v)


def configure_blk(dev, **changes):
    """Set any of limiter, faults, tracer, hook on a BlkDevice (None removes
    one).  With all removed, the C fast path is back."""
    if not dev.native:
        raise ValueError("the request slow path needs the C ring walker (native=True)")
    if getattr(dev, "_engine", None) is not None:
        raise ValueError("io_engine=io_uring has no slow path (faults, tracing, hooks, "
                         "rate limits): use the sync engine")
    icpt = dev.intercept
    if icpt is None:
        icpt = BlkIntercept(dev.ioloop)
    with icpt.lock:
        _apply(dev, icpt, changes, ("limiter", "faults", "tracer", "hook"))
        was_paused = icpt.paused
        if icpt.active or icpt.delayed:
            dev.intercept = icpt
        else:
            dev.intercept = None
    if not icpt.active and not icpt.delayed and icpt is not dev.intercept:
        icpt.close()
    if was_paused:                  # an update takes effect now, not at the old deadline
        _kick(dev, icpt, 0)


def _kick(dev, icpt, queue):
    """Run the device's queues again, on the I/O thread when there is one."""
    def go():
        if queue is None:                # every queue pair of a NIC
            for i in range(dev.active_pairs):
                _notify(dev, 2 * i + 1)
            dev.poll_rx()
        else:
            icpt.resume(dev)
    if dev.ioloop is not None and not icpt.closed:
        icpt.timers.call_later(0, go)
    else:
        go()
