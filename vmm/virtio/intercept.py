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
"""
import collections
import errno
import os
import struct
import threading
import time

from vmm.native import ffi, lib
from vmm.virtio.timer import Timers

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
        from vmm.virtio.trace import BLK_TYPES
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
            dev.stats["requests"] += 1
            dev.stats["ioerr"] += s == S_IOERR
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
    from vmm.virtio.queue import QueueError
    return QueueError(code, index)


def _notify(dev, index):
    """Process queue `index` as a driver notification would (through the
    transport: its lock, its activation check, and again while the device
    reports work left)."""
    t = dev._interrupt
    if t is not None and hasattr(t, "notify"):
        t.notify(index)


class NetIntercept(_Base):
    """Frames through Python: limiters per direction, faults, pcap, hook.
    Per-pair state (frames due, pauses) is keyed by the queue pair's index;
    the limiters are per device, shared by its pairs."""

    def __init__(self, ioloop=None, rx_limiter=None, tx_limiter=None, faults=None,
                 pcap=None, hook=None):
        super().__init__(ioloop)
        self.rx_limiter, self.tx_limiter = rx_limiter, tx_limiter
        self.faults, self.pcap, self.hook = faults, pcap, hook
        self.rx_paused, self.tx_paused = set(), set()    # pair indexes
        self.rx_ready = collections.defaultdict(collections.deque)  # frames due for the guest
        self.in_flight = 0                      # frames waiting on an injected delay

    @property
    def active(self):
        return any(x is not None for x in (self.rx_limiter, self.tx_limiter, self.faults,
                                           self.pcap, self.hook))

    @property
    def link_up(self):
        f = self.faults
        return f is None or f.link_up

    @property
    def pending(self):
        return self.in_flight or any(self.rx_ready.values())

    def _frames(self, direction, frame, hdr):
        """[(delay, frame)] after the hook and the faults."""
        if self.hook is not None and hasattr(self.hook, "net_frame"):
            r = self.hook.net_frame(direction, frame[hdr:])
            if r is False or r == "drop":
                return []
            if isinstance(r, (bytes, bytearray)):
                frame = frame[:hdr] + bytes(r)
        if self.faults is None:
            return [(0.0, frame)]
        return self.faults.decide(direction, frame, hdr)

    # --- transmit (dev._lock held) ---
    def tx(self, dev, p, ring, res):
        vq, c, net = ring.vq, ring.chain, p.net
        budget = net.budget or lib.PV_NET_BUDGET
        hdr = net.hdr_len
        completed, err, more = 0, 0, False
        while p.index not in self.tx_paused:
            while completed < budget and p.index not in self.tx_paused:
                r = lib.pv_vq_pop(vq, c)
                if r <= 0:
                    err = -r if r < 0 else 0
                    break
                if c.nread != c.nseg or c.read_len < hdr or c.nseg > 1024:
                    vq.broken = err = lib.PV_VQ_E_REQ
                    break
                frame = _chain_bytes(c, 0, c.nseg)
                lim = self.tx_limiter
                if lim is not None:
                    wait = lim.consume(len(frame) - hdr, 1)
                    if wait:
                        vq.last_avail = (vq.last_avail - 1) & 0xFFFF   # popped again later
                        self.tx_paused.add(p.index)
                        self.timers.call_later(wait, self._resume_tx, dev, p)
                        break
                if self.pcap is not None:
                    self.pcap.write(frame[hdr:])
                outs = self._frames("tx", frame, hdr) if self.link_up else []
                if not outs:
                    net.tx_drops += 1
                for delay, f in outs:
                    if delay > 0:
                        self.in_flight += 1
                        self.timers.call_later(delay, self._send_later, dev, p, f)
                    else:
                        self._send(dev, p, f)
                lib.pv_vq_push(vq, c.head, 0)
                completed += 1
            if err or p.index in self.tx_paused:
                break
            if completed >= budget:
                more = True
                break
            if not lib.pv_vq_enable_notify(vq):
                break
        _result(res, vq, completed, -err if err else 0, int(more))

    def _send(self, dev, p, frame):
        net = p.net
        if dev.backend is None:
            return
        try:
            os.write(p.fd, frame)
        except OSError as e:
            net.last_errno = e.errno
            if e.errno in (errno.EAGAIN, errno.ENOBUFS, errno.EIO):
                net.tx_drops += 1
            else:
                net.tx_errors += 1
            return
        net.tx_packets += 1
        net.tx_bytes += len(frame) - net.hdr_len

    def _send_later(self, dev, p, frame):
        with dev._lock:
            self.in_flight -= 1
            if not self.closed:
                self._send(dev, p, frame)

    def _resume_tx(self, dev, p):
        self.tx_paused.discard(p.index)
        _notify(dev, 2 * p.index + 1)

    # --- receive (dev._lock held) ---
    def rx(self, dev, p, ring, res):
        vq, c, net = ring.vq, ring.chain, p.net
        hdr = net.hdr_len
        budget = net.budget or lib.PV_NET_BUDGET
        ready = self.rx_ready[p.index]
        used_before, interrupt, err = vq.used_idx, False, 0
        state = lib.PV_NET_RX_MORE
        reads = 0
        while True:
            if p.index in self.rx_paused:
                state = lib.PV_NET_RX_NOBUF      # stop polling until the timer
                break
            if net.pending:                        # a frame waits for buffers
                lib.pv_net_rx_held(vq, net, c, res)
                interrupt |= bool(res.interrupt)
                if res.error:
                    err = res.error
                    break
                if res.state == lib.PV_NET_RX_NOBUF:
                    state = lib.PV_NET_RX_NOBUF
                    break
                continue
            if ready:
                frame = ready[0]
                lim = self.rx_limiter
                if lim is not None:
                    wait = lim.consume(len(frame) - hdr, 1)
                    if wait:
                        self.rx_paused.add(p.index)
                        self.timers.call_later(wait, self._resume_rx, dev, p)
                        continue
                ready.popleft()
                if self.pcap is not None:
                    self.pcap.write(frame[hdr:])
                n = min(len(frame), lib.PV_NET_SINK_SIZE)
                ffi.memmove(net.sink, frame, n)
                net.pending = n
                continue
            if reads >= budget:
                break
            try:
                frame = os.read(p.fd, lib.PV_NET_SINK_SIZE)
            except BlockingIOError:
                state = lib.PV_NET_RX_IDLE
                break
            except OSError as e:
                net.rx_errors += 1
                net.last_errno = e.errno
                state = lib.PV_NET_RX_NOBUF        # as the C path: stop polling until a kick
                break
            reads += 1
            if len(frame) < hdr or not self.link_up:
                net.rx_drops += 1
                continue
            outs = self._frames("rx", frame, hdr)
            if not outs:
                net.rx_drops += 1
            for delay, f in outs:
                if delay > 0:
                    self.in_flight += 1
                    self.timers.call_later(delay, self._deliver_later, dev, p, f)
                else:
                    ready.append(f)
        completed = (vq.used_idx - used_before) & 0xFFFF
        if completed and not interrupt:
            interrupt = bool(lib.pv_vq_need_interrupt(vq))
        res.completed, res.interrupt, res.error, res.state = completed, int(interrupt), err, state

    def _deliver_later(self, dev, p, frame):
        self.in_flight -= 1
        if not self.closed:
            self.rx_ready[p.index].append(frame)
            dev.poll_rx(p.index)

    def _resume_rx(self, dev, p):
        self.rx_paused.discard(p.index)
        dev.poll_rx(p.index)

    def reset(self):
        self.rx_ready.clear()
        self.rx_paused.clear()
        self.tx_paused.clear()


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


def configure_net(dev, **changes):
    """Set any of rx_limiter, tx_limiter, faults, pcap, hook on a NetDevice."""
    with dev._lock:
        icpt = dev.intercept
        if icpt is None:
            icpt = NetIntercept(dev.ioloop)
        old_link = icpt.link_up
        _apply(dev, icpt, changes, ("rx_limiter", "tx_limiter", "faults", "pcap", "hook"))
        was_paused = bool(icpt.rx_paused or icpt.tx_paused)
        icpt.rx_paused.clear()
        icpt.tx_paused.clear()
        keep = icpt.active or icpt.pending
        dev.intercept = icpt if keep else None
        link_changed = icpt.link_up != old_link
    if not keep:
        icpt.close()
    if link_changed and dev._interrupt is not None:
        dev._interrupt.config()      # §5.1.4: the driver rereads status (LINK_UP)
    if was_paused or link_changed:
        _kick(dev, icpt, None)


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
