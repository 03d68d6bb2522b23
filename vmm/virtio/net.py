"""virtio-net (virtio 1.1 §5.1) over a tap.

    dev = NetDevice(Tap("tap0"), mac=None, ioloop=loop)
    ...
    dev.stats       # rx/tx packets, bytes, drops, errors
    dev.close()     # closes the tap (a tap we created goes away)

Queue 2n receives and 2n+1 transmits for pair n (§5.1.2).  With
`queue_pairs` > 1 the device offers VIRTIO_NET_F_MQ and a control queue
(last, index 2N; vmm/virtio/net_ctrl.py); each pair has its own tap queue
fd (IFF_MULTI_QUEUE), and only the pairs the driver turned on
(VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET; one after negotiation, §5.1.6.5.5) keep
their tap queue attached, so the kernel never steers frames to a queue
nobody reads.  Frames move in C (native/src/net.c): one call per kick or per tap wake-up
drains a batch, no Python per packet.  The tap fd is polled by the I/O loop
only while the guest has receive buffers: when they run out, polling stops
until the driver kicks the receive queue (it does, since the device asks
for that notification, §2.6.7.1).

On a transport that hands its queues' kicks to the I/O loop's C fast path
(virtio-mmio with an irqfd, modern virtio-pci with MSI-X: vmm/virtio/
fastpath.py), the common case runs entirely in C with the GIL released
(native/src/fastnet.c): a transmit kick, a readable tap, a receive kick, the
tap leaving epoll when buffers run out, the interrupts.  Python takes the
pair back (every queue of the device stopped first) for anything else: the
slow path (limiters, faults, pcap, hooks), the control queue, another
thread's notify, resets, pause and snapshots.

`backend` is a vmm.tap.Tap, or any object with `fd`, `offload_ok`,
`set_vnet_hdr_len(n)`, `set_offload(flags)` and `close()` (the tests use a
datagram socketpair); with several pairs also `fds` (one per pair) and
`set_queue_enabled(index, on)`.  Without an `ioloop`, the owner calls `poll_rx()` when
the backend is readable.
"""
import contextlib
import hashlib
import struct
import threading

from vmm.native import ffi, lib
from vmm.virtio import device as vd
from vmm.virtio import intercept_persist
from vmm.virtio.net_ctrl import ControlQueue
from vmm.virtio.queue import NativeRing, QueueError

VIRTIO_ID_NET = 1
RX, TX = 0, 1

# §5.1.3 feature bits
F_CSUM, F_GUEST_CSUM = 0, 1
F_MAC = 5
F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN = 7, 8, 9
F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN = 11, 12, 13
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ, F_CTRL_RX, F_MQ, F_CTRL_MAC_ADDR = 17, 18, 22, 23
MAX_PAIRS = 64
CTRL_QUEUE_SIZE = 64

# early interrupts on the fast path once a quarter of a pass's backlog is
# left (native/src/fastnet.c; 0: only at the end of a pass)
EARLY_DIV = 4

S_LINK_UP = 1                     # §5.1.4 status
QUEUE_SIZE = 256
HDR_LEN, LEGACY_HDR_LEN = 12, 10  # §5.1.6: num_buffers is there with VERSION_1 or MRG_RXBUF

OFFLOAD_FEATURES = (F_CSUM, F_GUEST_CSUM, F_GUEST_TSO4, F_GUEST_TSO6, F_GUEST_ECN,
                    F_HOST_TSO4, F_HOST_TSO6, F_HOST_ECN)
STAT_FIELDS = ("rx_packets", "rx_bytes", "rx_drops", "rx_errors",
               "tx_packets", "tx_bytes", "tx_drops", "tx_errors")


class NetError(vd.VirtioError):
    """A virtio-net configuration or backend problem (one line)."""


def default_mac(seed):
    """A stable locally administered unicast MAC derived from `seed`
    (52:54:00 as QEMU, then 3 bytes of a hash)."""
    h = hashlib.sha256(seed.encode()).digest()
    return bytes([0x52, 0x54, 0x00]) + h[:3]


class _Pair:
    """One receive/transmit queue pair over one backend fd (the C state)."""

    def __init__(self, index, fd):
        self.index = index
        self.fd = fd
        self.sink = ffi.new("uint8_t[]", lib.PV_NET_SINK_SIZE)
        self.net = ffi.new("struct pv_net *")
        self.net.fd = fd
        self.net.sink = self.sink
        self.rx = self.tx = None
        self.polling = False
        self.fnet = None                  # struct pv_fast_net (fast path bound)
        self.tap_index = None             # its tap's queue in the FastPath


class NetDevice(vd.VirtioDevice):
    device_type = VIRTIO_ID_NET

    def __init__(self, backend, mac=None, ioloop=None, queue_size=QUEUE_SIZE,
                 mrg_rxbuf=True, offload=True, queue_pairs=1):
        super().__init__()
        if queue_size > 512:              # chain + sink must fit one readv (IOV_MAX)
            raise NetError("virtio-net: queue size at most 512")
        if not 1 <= queue_pairs <= MAX_PAIRS:
            raise NetError(f"virtio-net: 1 to {MAX_PAIRS} queue pairs")
        fds = list(getattr(backend, "fds", None) or [backend.fd])
        if len(fds) < queue_pairs:
            raise NetError(f"virtio-net: {queue_pairs} queue pairs need as many backend queues")
        self.backend = backend
        self.mac = bytes(mac) if mac is not None else default_mac(getattr(backend, "name", "net"))
        if len(self.mac) != 6:
            raise NetError("virtio-net: a MAC address is 6 bytes")
        self.ioloop = ioloop
        self.max_pairs = queue_pairs
        self.ctrl_index = 2 * queue_pairs if queue_pairs > 1 else None
        if self.ctrl_index is not None:
            # The control queue's ring is walked in Python (PyRing), through
            # numpy views of guest memory: import numpy now, at set-up, not
            # on the vCPU thread at DRIVER_OK, where the thread's seccomp
            # filter forbids the file-system calls an import makes.
            import numpy  # noqa: F401
        self.queue_max_sizes = (queue_size,) * (2 * queue_pairs) + (
            (CTRL_QUEUE_SIZE,) if self.ctrl_index is not None else ())
        f = (vd.bit(vd.VIRTIO_F_VERSION_1) | vd.bit(vd.VIRTIO_F_RING_EVENT_IDX)
             | vd.bit(vd.VIRTIO_F_RING_INDIRECT_DESC) | vd.bit(F_MAC) | vd.bit(F_STATUS))
        if self.ctrl_index is not None:
            f |= vd.bit(F_CTRL_VQ) | vd.bit(F_CTRL_RX) | vd.bit(F_MQ) | vd.bit(F_CTRL_MAC_ADDR)
        if mrg_rxbuf:
            f |= vd.bit(F_MRG_RXBUF)
        if offload and getattr(backend, "offload_ok", False):
            for b in OFFLOAD_FEATURES:
                f |= vd.bit(b)
        self.features = f
        self._pairs = [_Pair(i, fds[i]) for i in range(queue_pairs)]
        self._net = self._pairs[0].net    # pair 0's C state (tests tune its budget)
        self._res = ffi.new("struct pv_net_result *")
        self._lock = threading.Lock()     # rings vs. reset; tap wake-ups vs. kicks
        self._fastpath = None             # the transport's C fast path (vmm/virtio/fastpath.py)
        self._count_lock = threading.Lock()   # kicks: Python's and C's folded in
        self._interrupt = None
        self._ctrl = None
        self.intercept = None             # limiters/faults/pcap/hook: vmm/virtio/intercept.py
        self.active_pairs = 1
        self._restore_pairs = None        # active pairs a snapshot had, for activate()
        self.rx_mode = {}                 # VIRTIO_NET_CTRL_RX state the driver set
        self.mac_tables = ([], [])        # VIRTIO_NET_CTRL_MAC_TABLE_SET: unicast, multicast
        self.polling_changes = 0          # times a tap queue left/rejoined the poll set
        self._kicks = [0] * len(self.queue_max_sizes)

    # --- configuration (§5.1.4: mac, status, max_virtqueue_pairs, mtu) ---
    def config_bytes(self):
        link = S_LINK_UP if self.intercept is None or self.intercept.link_up else 0
        return struct.pack("<6sHHH", self.mac, link, self.max_pairs, 0)

    @property
    def kicks(self):
        """Driver notifications per queue (Python's and the C fast path's)."""
        with self._count_lock:
            if self._fastpath is not None:
                counts = self._fastpath.take_counts_by_queue()
                for i, (k, _, _) in enumerate(counts[:len(self._kicks)]):
                    self._kicks[i] += k
            return list(self._kicks)

    @property
    def stats(self):
        return {k: sum(int(getattr(p.net, k)) for p in self._pairs) for k in STAT_FIELDS}

    @property
    def hdr_len(self):
        return int(self._net.hdr_len)

    # --- device contract ---
    def activate(self, mem, queues, interrupt):
        if self.backend is None:
            raise NetError("virtio-net: backend is closed")
        mq = self.has(F_MQ)
        npairs = self.max_pairs if mq else 1
        for q in queues[:2 * npairs]:
            if q.ready and q.size > q.max_size:
                raise NetError(f"virtio-net: queue {q.index} too large at DRIVER_OK")
        if not (queues[0].ready and queues[1].ready):
            raise NetError("virtio-net: queue pair 0 not ready at DRIVER_OK")
        mrg = self.has(F_MRG_RXBUF)
        hdr = HDR_LEN if self.has(vd.VIRTIO_F_VERSION_1) or mrg else LEGACY_HDR_LEN
        self.backend.set_vnet_hdr_len(hdr)
        # §5.1.6.4: the tap may hand us what the driver said it can take
        tun = 0
        if self.has(F_GUEST_CSUM):
            tun |= lib.TUN_F_CSUM
            if self.has(F_GUEST_TSO4):
                tun |= lib.TUN_F_TSO4
            if self.has(F_GUEST_TSO6):
                tun |= lib.TUN_F_TSO6
            if self.has(F_GUEST_ECN) and tun & (lib.TUN_F_TSO4 | lib.TUN_F_TSO6):
                tun |= lib.TUN_F_TSO_ECN
        self.backend.set_offload(tun)
        kw = dict(event_idx=self.has(vd.VIRTIO_F_RING_EVENT_IDX),
                  indirect=self.has(vd.VIRTIO_F_RING_INDIRECT_DESC))
        with self._lock:
            self._interrupt = interrupt
            for p in self._pairs[:npairs]:
                rxq, txq = queues[2 * p.index], queues[2 * p.index + 1]
                p.net.hdr_len = hdr
                p.net.mrg_rxbuf = int(mrg)
                p.net.pending = 0
                if rxq.ready and txq.ready:
                    p.rx, p.tx = NativeRing(mem, rxq, **kw), NativeRing(mem, txq, **kw)
            if self.has(F_CTRL_VQ) and self.ctrl_index is not None and queues[self.ctrl_index].ready:
                self._ctrl = ControlQueue(self, mem, queues[self.ctrl_index], **kw)
            # §5.1.6.5.5: one pair until VQ_PAIRS_SET (a restore: as the snapshot had it)
            n, self._restore_pairs = self._restore_pairs or 1, None
            self._set_active_pairs(n)

    def reset(self):
        super().reset()
        with self._lock:
            for p in self._pairs:
                self._set_polling(p, False)
                if p.net.pending:         # a frame held for buffers that never came
                    p.net.rx_drops += 1
                    p.net.pending = 0
                p.rx = p.tx = None
            self._ctrl = None
            self._interrupt = None
            self._restore_pairs = None
            self.rx_mode = {}
            self.mac_tables = ([], [])
            if self.intercept is not None:
                self.intercept.reset()

    def configure(self, **changes):
        """rx_limiter=, tx_limiter=, faults=, pcap=, hook= (None removes), also
        while running (a link change raises a config interrupt): intercept.py."""
        from vmm.virtio.intercept_net import configure_net
        hold = getattr(self._interrupt, "fast_hold", None)
        if hold is None or self._fastpath is None:
            configure_net(self, **changes)
            return
        with hold():            # the C fast path stops, then re-decides (slow path set?)
            configure_net(self, **changes)

    def queue_notify(self, index):
        if not 0 <= index < len(self._kicks):
            return
        with self._count_lock:
            self._kicks[index] += 1
        if index == self.ctrl_index:
            with self._lock:
                if self._ctrl is not None:
                    self._ctrl.process()
            return
        pair, is_tx = divmod(index, 2)
        p = self._pairs[pair]
        if not is_tx:
            self.poll_rx(pair)      # buffers came: deliver what waits, poll again
            return
        with self._lock:
            while p.tx is not None and self._process_tx(p):
                self._process_rx(p)  # a long burst: let receive in between

    def poll_rx(self, pair=None):
        """The backend is readable (I/O loop), or receive buffers came.  With
        an I/O loop one batch per call (epoll is level-triggered and calls
        again); without, until the backend is drained or buffers run out.
        `pair` None: every active pair."""
        with self._fast_held(), self._lock:
            pairs = self._pairs[:self.active_pairs] if pair is None else [self._pairs[pair]]
            for p in pairs:
                while (self._process_rx(p) == lib.PV_NET_RX_MORE and self.ioloop is None
                       and p.rx is not None):
                    pass

    @property
    def polling(self):
        """Whether pair 0's backend queue is watched (False while the guest
        has no buffers)."""
        p = self._pairs[0]
        return p.polling and not (p.fnet is not None and p.fnet.tap_off)

    # --- the C fast path (vmm/virtio/fastpath.py, native/src/fastnet.c) ---
    fast_grouped = True           # a pair's queues share rings: held as a whole

    @property
    def fast_capable(self):
        """The fast path needs the I/O loop (it polls the tap there)."""
        return self.ioloop is not None

    def fast_bind(self, fastpath):
        """First sync: a pv_fast_net per pair and a fast queue for its tap."""
        if self._fastpath is fastpath:
            return
        with self._lock:
            self._fastpath = fastpath
            for p in self._pairs:
                f = p.fnet = ffi.new("struct pv_fast_net *")
                f.net = p.net
                f.rxq = fastpath.queue_struct(2 * p.index + RX)
                f.txq = fastpath.queue_struct(2 * p.index + TX)
                f.epfd = self.ioloop.epoll_fd
                f.tap_fd = p.fd
                f.early_div = EARLY_DIV
                p.tap_index = fastpath.add_queue(p.fd, irq_of=2 * p.index + RX)
                if p.polling:                 # watched already: again, as a fast fd
                    self._set_polling(p, False)
                    self._set_polling(p, True)

    def _fast_held(self):
        fp = self._fastpath
        return fp.hold_all() if fp is not None else contextlib.nullcontext()

    def fast_engine(self, index):
        """(kind, pv_fast_net) for queue `index` (or a pair's tap) when the
        pair needs nothing but C: active, rings intact, no slow path."""
        if (self._fastpath is None or self.intercept is not None or self.backend is None
                or index == self.ctrl_index):
            return None
        taps = {p.tap_index: p for p in self._pairs}
        if index in taps:
            p, kind = taps[index], lib.PV_FAST_NET_TAP
        elif 0 <= index < 2 * len(self._pairs):
            p = self._pairs[index // 2]
            kind = lib.PV_FAST_NET_TX if index % 2 else lib.PV_FAST_NET_RX
        else:
            return None
        with self._lock:
            if (p.rx is None or p.tx is None or p.index >= self.active_pairs
                    or p.rx.broken or p.tx.broken or p.fnet is None):
                return None
            f = p.fnet
            f.rx, f.rx_chain = p.rx.vq, p.rx.chain
            f.tx, f.tx_chain = p.tx.vq, p.tx.chain
            f.tap_off = 0
            if kind == lib.PV_FAST_NET_TAP:
                self._set_polling(p, True)    # in epoll; C takes it out when buffers run out
        return kind, f

    def fast_stopped(self):
        """Every fast queue is stopped: where C took a tap out of epoll (no
        buffers), Python's view follows (not polling until a receive kick).
        Takes no lock: it also runs under the device's own (needs_reset from
        a Python pass), and touches only the pairs' polling state."""
        for p in self._pairs:
            f = p.fnet
            if f is not None and f.tap_off:
                f.tap_off = 0
                self._set_polling(p, False)

    def set_queue_pairs(self, n):
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (lock held by the control queue).
        Returns False for a count the device cannot take (§5.1.6.5.5)."""
        if not self.has(F_MQ) or not 1 <= n <= self.max_pairs:
            return False
        if any(p.rx is None for p in self._pairs[:n]):
            return False                  # a pair the driver never set up
        self._set_active_pairs(n)
        return True

    # --- snapshots (vmm/virtio/device.py) ---
    def state(self):
        """A frame held for receive buffers (`pending`) is not kept: it
        counts as a drop, as when the link loses a packet."""
        st = super().state()
        st.update(mac=self.mac.hex(), tap=getattr(self.backend, "name", None),
                  stats=self.stats, kicks=self.kicks,
                  max_pairs=self.max_pairs, active_pairs=self.active_pairs,
                  # control queue state (net_ctrl.py): §5.1.6.5.2 rx mode and MAC tables
                  rx_mode=sorted([int(k), bool(v)] for k, v in self.rx_mode.items()),
                  mac_tables=[[m.hex() for m in t] for t in self.mac_tables],
                  intercept=intercept_persist.state(self.intercept))   # limiter budgets, faults
        return st

    def restore(self, state):
        if bytes.fromhex(state["mac"]) != self.mac:
            raise NetError(f"virtio-net: MAC {self.mac.hex(':')} differs from the snapshot's "
                           f"{bytes.fromhex(state['mac']).hex(':')}")
        if int(state.get("max_pairs", 1)) != self.max_pairs:
            raise NetError(f"virtio-net: the snapshot's device has {state.get('max_pairs')} "
                           f"queue pairs, this one {self.max_pairs}")
        active = int(state.get("active_pairs", 1))
        if not 1 <= active <= self.max_pairs:
            raise NetError(f"virtio-net: snapshot has {active} active queue pairs")
        super().restore(state)
        self.rx_mode = {int(k): bool(v) for k, v in state.get("rx_mode", [])}
        self.mac_tables = tuple([bytes.fromhex(m) for m in t]
                                for t in state.get("mac_tables", ([], [])))
        self._restore_pairs = active      # activate() turns them on (it runs next)
        intercept_persist.restore(self.intercept, state.get("intercept"))

    def rings(self):
        intercept_persist.check(self.intercept)     # a hook: refused
        out = {}
        for p in self._pairs:
            out.update({i: r for i, r in ((2 * p.index + RX, p.rx), (2 * p.index + TX, p.tx))
                        if r is not None})
        if self._ctrl is not None:
            out[self.ctrl_index] = self._ctrl.ring
        return out

    def close(self):
        with self._lock:
            for p in self._pairs:
                self._set_polling(p, False)
                p.rx = p.tx = None
            self._ctrl = None
            backend, self.backend = self.backend, None
            icpt, self.intercept = self.intercept, None
        if icpt is not None:
            icpt.close()
        if backend is not None:
            backend.close()

    # --- internals (self._lock held) ---
    def _set_active_pairs(self, n):
        self.active_pairs = n
        enable = getattr(self.backend, "set_queue_enabled", None)
        for p in self._pairs:
            on = p.index < n and p.rx is not None
            if enable is not None and len(self._pairs) > 1:
                enable(p.index, on)
            self._set_polling(p, on)

    def _set_polling(self, p, on):
        on = bool(on) and self.backend is not None
        if on == p.polling:
            return
        if self.ioloop is not None:
            if on:
                fq = (self._fastpath.queue_struct(p.tap_index)
                      if self._fastpath is not None and p.tap_index is not None else None)
                self.ioloop.add(p.fd, lambda: self.poll_rx(p.index), fast=fq)
            else:
                self.ioloop.remove(p.fd)
        p.polling = on
        self.polling_changes += 1

    def _finish(self, p, index, res):
        if res.interrupt:
            self._interrupt.used(index)
        if res.error:
            self._set_polling(p, False)
            self._interrupt.needs_reset(QueueError(-res.error, index))
            p.rx = p.tx = None
            return False
        return True

    def _process_rx(self, p):
        ring = p.rx
        if ring is None or p.index >= self.active_pairs:
            return lib.PV_NET_RX_IDLE
        res = self._res
        if self.intercept is not None:                 # the slow path, off by default
            self.intercept.rx(self, p, ring, res)
        else:
            lib.pv_net_rx(ring.vq, p.net, ring.chain, res)
        state = res.state
        if not self._finish(p, 2 * p.index, res):
            return lib.PV_NET_RX_IDLE
        # no buffers: leave the tap alone until the driver kicks the receive queue
        self._set_polling(p, state != lib.PV_NET_RX_NOBUF)
        return state

    def _process_tx(self, p):
        """Drain a transmit queue; True if the budget ran out (more to do)."""
        ring = p.tx
        res = self._res
        if self.intercept is not None:
            self.intercept.tx(self, p, ring, res)
        else:
            lib.pv_net_tx(ring.vq, p.net, ring.chain, res)
        more = bool(res.state)
        return self._finish(p, 2 * p.index + 1, res) and more
