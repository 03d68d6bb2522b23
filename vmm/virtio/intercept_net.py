"""The virtio-net side of the slow path (see intercept.py): frames read,
altered and written by Python, per queue pair, when a limiter, fault spec,
pcap or hook is set on a NIC.  Delivery into receive buffers stays in C
(pv_net_rx_held: MRG_RXBUF spreading and held frames as on the fast path)."""
import collections
import errno
import os

from vmm.native import ffi, lib
from vmm.virtio.intercept import _Base, _apply, _chain_bytes, _kick, _notify, _result


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
