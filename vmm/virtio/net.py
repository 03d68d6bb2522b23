"""virtio-net (virtio 1.1 §5.1) over a tap.

    dev = NetDevice(Tap("tap0"), mac=None, ioloop=loop)
    ...
    dev.stats       # rx/tx packets, bytes, drops, errors
    dev.close()     # closes the tap (a tap we created goes away)

Queue 0 receives, queue 1 transmits (§5.1.2; no control queue, one pair).
Frames move in C (native/src/net.c): one call per kick or per tap wake-up
drains a batch, no Python per packet.  The tap fd is polled by the I/O loop
only while the guest has receive buffers: when they run out, polling stops
until the driver kicks the receive queue (it does, since the device asks
for that notification, §2.6.7.1).

`backend` is a vmm.tap.Tap, or any object with `fd`, `offload_ok`,
`set_vnet_hdr_len(n)`, `set_offload(flags)` and `close()` (the tests use a
datagram socketpair).  Without an `ioloop`, the owner calls `poll_rx()` when
the backend is readable.
"""
import hashlib
import struct
import threading

from vmm.native import ffi, lib
from vmm.virtio import device as vd
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


class NetDevice(vd.VirtioDevice):
    device_type = VIRTIO_ID_NET

    def __init__(self, backend, mac=None, ioloop=None, queue_size=QUEUE_SIZE,
                 mrg_rxbuf=True, offload=True):
        super().__init__()
        if queue_size > 512:              # chain + sink must fit one readv (IOV_MAX)
            raise NetError("virtio-net: queue size at most 512")
        self.backend = backend
        self.mac = bytes(mac) if mac is not None else default_mac(getattr(backend, "name", "net"))
        if len(self.mac) != 6:
            raise NetError("virtio-net: a MAC address is 6 bytes")
        self.ioloop = ioloop
        self.queue_max_sizes = (queue_size, queue_size)
        f = (vd.bit(vd.VIRTIO_F_VERSION_1) | vd.bit(vd.VIRTIO_F_RING_EVENT_IDX)
             | vd.bit(vd.VIRTIO_F_RING_INDIRECT_DESC) | vd.bit(F_MAC) | vd.bit(F_STATUS))
        if mrg_rxbuf:
            f |= vd.bit(F_MRG_RXBUF)
        if offload and getattr(backend, "offload_ok", False):
            for b in OFFLOAD_FEATURES:
                f |= vd.bit(b)
        self.features = f
        self._sink = ffi.new("uint8_t[]", lib.PV_NET_SINK_SIZE)
        self._net = ffi.new("struct pv_net *")
        self._net.fd = backend.fd
        self._net.sink = self._sink
        self._res = ffi.new("struct pv_net_result *")
        self._lock = threading.Lock()     # rings vs. reset; tap wake-ups vs. kicks
        self._rx = self._tx = None
        self._interrupt = None
        self._polling = False
        self.polling_changes = 0          # times the tap left/rejoined the poll set
        self.kicks = [0, 0]

    # --- configuration (§5.1.4: mac, status, max_virtqueue_pairs, mtu) ---
    def config_bytes(self):
        return struct.pack("<6sHHH", self.mac, S_LINK_UP, 1, 0)

    @property
    def stats(self):
        n = self._net
        return {k: int(getattr(n, k)) for k in STAT_FIELDS}

    @property
    def hdr_len(self):
        return int(self._net.hdr_len)

    # --- device contract ---
    def activate(self, mem, queues, interrupt):
        if self.backend is None:
            raise NetError("virtio-net: backend is closed")
        for q in queues:
            if not q.ready or q.size > q.max_size:
                raise NetError(f"virtio-net: queue {q.index} not ready or too large at DRIVER_OK")
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
            self._net.hdr_len = hdr
            self._net.mrg_rxbuf = int(mrg)
            self._net.pending = 0
            self._rx = NativeRing(mem, queues[RX], **kw)
            self._tx = NativeRing(mem, queues[TX], **kw)
            self._interrupt = interrupt
            self._set_polling(True)

    def reset(self):
        super().reset()
        with self._lock:
            self._set_polling(False)
            if self._net.pending:           # a frame held for buffers that never came
                self._net.rx_drops += 1
                self._net.pending = 0
            self._rx = self._tx = None
            self._interrupt = None

    def queue_notify(self, index):
        if index not in (RX, TX):
            return
        self.kicks[index] += 1
        if index == RX:
            self.poll_rx()          # buffers came: deliver what waits, poll again
            return
        with self._lock:
            while self._tx is not None and self._process_tx():
                self._process_rx()  # a long burst: let receive in between

    def poll_rx(self):
        """The backend is readable (I/O loop), or receive buffers came.  With
        an I/O loop one batch per call (epoll is level-triggered and calls
        again); without, until the backend is drained or buffers run out."""
        with self._lock:
            while (self._process_rx() == lib.PV_NET_RX_MORE and self.ioloop is None
                   and self._rx is not None):
                pass

    @property
    def polling(self):
        """Whether the backend is watched (False while the guest has no buffers)."""
        return self._polling

    # --- snapshots (vmm/virtio/device.py) ---
    def state(self):
        """A frame held for receive buffers (`pending`) is not kept: it
        counts as a drop, as when the link loses a packet."""
        st = super().state()
        st.update(mac=self.mac.hex(), tap=getattr(self.backend, "name", None),
                  stats=self.stats, kicks=list(self.kicks))
        return st

    def restore(self, state):
        if bytes.fromhex(state["mac"]) != self.mac:
            raise NetError(f"virtio-net: MAC {self.mac.hex(':')} differs from the snapshot's "
                           f"{bytes.fromhex(state['mac']).hex(':')}")
        super().restore(state)

    def rings(self):
        return {i: r for i, r in ((RX, self._rx), (TX, self._tx)) if r is not None}

    def close(self):
        with self._lock:
            self._set_polling(False)
            self._rx = self._tx = None
            backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()

    # --- internals (self._lock held) ---
    def _set_polling(self, on):
        on = bool(on) and self.backend is not None
        if on == self._polling:
            return
        if self.ioloop is not None:
            if on:
                self.ioloop.add(self.backend.fd, self.poll_rx)
            else:
                self.ioloop.remove(self.backend.fd)
        self._polling = on
        self.polling_changes += 1

    def _finish(self, index, res):
        if res.interrupt:
            self._interrupt.used(index)
        if res.error:
            self._set_polling(False)
            self._interrupt.needs_reset(QueueError(-res.error, index))
            self._rx = self._tx = None
            return False
        return True

    def _process_rx(self):
        ring = self._rx
        if ring is None:
            return lib.PV_NET_RX_IDLE
        res = self._res
        lib.pv_net_rx(ring.vq, self._net, ring.chain, res)
        state = res.state
        if not self._finish(RX, res):
            return lib.PV_NET_RX_IDLE
        # no buffers: leave the tap alone until the driver kicks queue 0
        self._set_polling(state != lib.PV_NET_RX_NOBUF)
        return state

    def _process_tx(self):
        """Drain the transmit queue; True if the budget ran out (more to do)."""
        ring = self._tx
        res = self._res
        lib.pv_net_tx(ring.vq, self._net, ring.chain, res)
        more = bool(res.state)
        return self._finish(TX, res) and more
