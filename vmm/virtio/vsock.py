"""virtio-vsock (virtio 1.1 §5.10; device type 19) with Firecracker's hybrid
host side over Unix sockets (vmm/virtio/vsock_mux.py).

    dev = VsockDevice(uds_path="/run/vm.sock", guest_cid=3, ioloop=loop)
    ...
    dev.transport_reset()   # after a snapshot restore: the guest drops its connections
    dev.close()             # closes every connection and removes uds_path

Queue 0 receives (device -> driver), 1 transmits, 2 carries events
(§5.10.2).  Stream data moves in C (native/src/vsock.c): one call per kick,
per batch of host socket events or per refill of receive buffers; Python
sees only connection setup and teardown packets.  Without an `ioloop`, the
owner calls `poll()` when `fileno` is readable.
"""
import struct
import threading

from vmm.native import ffi, lib
from vmm.virtio import device as vd
from vmm.virtio.queue import NativeRing, QueueError
from vmm.virtio.vsock_mux import BUF_ALLOC, Muxer, VsockSetupError

VIRTIO_ID_VSOCK = 19
RX, TX, EVENT = 0, 1, 2
QUEUE_SIZE = 256
EVENT_TRANSPORT_RESET = 0          # §5.10.6.6 virtio_vsock_event.id
DEFAULT_CID = 3


class VsockError(vd.VirtioError):
    """A virtio-vsock configuration problem (one line)."""


def check_cid(cid):
    """§5.10.4: CIDs 0-2 are reserved (hypervisor, local, host), as is ~0."""
    if not isinstance(cid, int) or isinstance(cid, bool) or not 3 <= cid < 0xFFFFFFFF:
        raise VsockError(f"vsock: guest CID must be an integer from 3 to {0xFFFFFFFF - 1}, "
                         f"not {cid!r}")
    return cid


class VsockDevice(vd.VirtioDevice):
    device_type = VIRTIO_ID_VSOCK

    def __init__(self, uds_path, guest_cid=DEFAULT_CID, ioloop=None, queue_size=QUEUE_SIZE,
                 buf_alloc=BUF_ALLOC):
        super().__init__()
        check_cid(guest_cid)
        self.queue_max_sizes = (queue_size, queue_size, queue_size)
        self.features = (vd.bit(vd.VIRTIO_F_VERSION_1) | vd.bit(vd.VIRTIO_F_RING_EVENT_IDX)
                         | vd.bit(vd.VIRTIO_F_RING_INDIRECT_DESC))
        try:
            self.mux = Muxer(uds_path, guest_cid, buf_alloc=buf_alloc)
        except VsockSetupError as e:
            raise VsockError(str(e)) from None
        self.ioloop = ioloop
        self._lock = threading.RLock()      # queues, connections, and reset
        self._rings = None
        self._interrupt = None
        self._events_pending = 0            # TRANSPORT_RESETs waiting for an event buffer
        self._restored = False              # restore() of a running device: reset event due
        self.kicks = [0, 0, 0]
        if ioloop is not None:
            ioloop.add(self.mux.fileno, self.poll)

    @property
    def guest_cid(self):
        return self.mux.guest_cid

    @property
    def uds_path(self):
        return self.mux.uds_path

    @property
    def fileno(self):
        """Readable when a host socket has something for us (the epoll set)."""
        return self.mux.fileno

    def counters(self):
        return self.mux.counters()

    # --- §5.10.4 configuration: le64 guest_cid ---
    def config_bytes(self):
        return struct.pack("<Q", self.guest_cid)

    # --- device contract ---
    def activate(self, mem, queues, interrupt):
        for q in queues:
            if not q.ready or q.size > q.max_size:
                raise VsockError(f"virtio-vsock: queue {q.index} not ready or too large at DRIVER_OK")
        kw = dict(event_idx=self.has(vd.VIRTIO_F_RING_EVENT_IDX),
                  indirect=self.has(vd.VIRTIO_F_RING_INDIRECT_DESC))
        with self._lock:
            self._rings = [NativeRing(mem, q, **kw) for q in queues[:3]]
            self._interrupt = interrupt
            self.mux.vs.txq = self._rings[TX].vq     # held transmit chains complete there
            if self._restored:
                # Transport.restore puts the rings where they were after this
                # returns and restart() then kicks every queue: nothing may be
                # popped before that.  The guest's sockets still think they
                # are connected to host sockets this process never had
                # (Firecracker docs/vsock.md: connections do not survive a
                # snapshot), so the driver is told to reset them (§5.10.6.6).
                self._restored = False
                self._events_pending += 1
            else:
                self._service()

    def reset(self):
        super().reset()
        with self._lock:
            self._drop_rings()
            self._interrupt = None
            self._events_pending = 0
            self._restored = False
            self.mux.reset_all()            # the driver's sockets are gone with it (§5.10.6.6)

    def queue_notify(self, index):
        if index not in (RX, TX, EVENT):
            return
        self.kicks[index] += 1
        with self._lock:
            if index == EVENT:
                self._deliver_events()
            else:
                self._service(tx=index == TX)

    def poll(self):
        """Host sockets are ready (I/O loop), or the test says so."""
        with self._lock:
            self.mux.poll()
            self._service(tx=False)

    def transport_reset(self):
        """§5.10.6.6 VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (after a snapshot
        restore): host connections are dropped, and the driver resets its
        sockets and re-reads guest_cid."""
        with self._lock:
            self.mux.reset_all()                # (held transmit chains are completed)
            self._tx_completed()
            self._events_pending += 1
            self._deliver_events()

    # --- snapshots (vmm/virtio/device.py) ---
    def state(self):
        """Host connections are not saved (as Firecracker): after a restore
        the guest gets a TRANSPORT_RESET and drops its connections."""
        with self._lock:
            return {**super().state(), "guest_cid": self.guest_cid, "uds_path": self.uds_path,
                    "running": self._rings is not None}

    def restore(self, state):
        super().restore(state)
        if int(state["guest_cid"]) != self.guest_cid:
            raise VsockError(f"virtio-vsock: the snapshot's guest CID is {state['guest_cid']}, "
                             f"this device's {self.guest_cid}")
        with self._lock:
            self._restored = bool(state.get("running"))

    def rings(self):
        """The rings as a snapshot takes them: transmit chains held until
        their host socket takes the payload are first copied to the
        connection's backlog and completed, so the saved ring has none in
        flight (the stream goes on unchanged if this VM resumes)."""
        with self._lock:
            if self._rings is None:
                return {}
            if lib.pv_vsock_unhold(self.mux.vs):
                self._tx_completed()
            return dict(enumerate(self._rings))

    def close(self):
        if self.ioloop is not None:
            self.ioloop.remove(self.mux.fileno)
            self.ioloop = None
        with self._lock:
            self._drop_rings()
            self.mux.close()

    # --- internals (self._lock held) ---
    def _drop_rings(self):
        """The queues are gone (reset, broken, closed): held transmit chains
        are never completed into them, only dropped with their connection."""
        self.mux.vs.txq = ffi.NULL
        self.mux.vs.tx_pushed = 0
        self._rings = None

    def _broken(self, index, code):
        self._interrupt.needs_reset(QueueError(-code, index))
        self._drop_rings()

    def _tx_completed(self):
        """Held transmit chains completed outside pv_vsock_tx (a host socket
        took their payload, or their stream ended): the used buffer
        notification, unless the driver suppressed it (§2.6.7.2)."""
        vs = self.mux.vs
        if vs.tx_pushed and self._rings is not None:
            vs.tx_pushed = 0
            if self._rings[TX].need_interrupt():
                self._interrupt.used(TX)

    def _finish(self, index, res):
        if res.interrupt:
            self._interrupt.used(index)
        if res.error:
            self._broken(index, res.error)
            return False
        return True

    def _service(self, tx=True):
        """Transmit queue (handing control packets to the muxer), then the
        receive pump: everything the host side has for the guest."""
        if self._rings is None:
            return
        mux, res = self.mux, self.mux.res
        if tx:
            ring = self._rings[TX]
            while True:
                lib.pv_vsock_tx(ring.vq, mux.vs, ring.chain, res)
                state = res.state
                pkt = (bytes(res.hdr), res.payload) if state == 1 else None
                if not self._finish(TX, res):
                    return
                if pkt is not None:
                    mux.handle_packet(*pkt)
                elif state != 2:
                    break
        mux.reap()
        ring = self._rings[RX]
        lib.pv_vsock_rx(ring.vq, mux.vs, ring.chain, res)
        self._finish(RX, res)
        mux.reap()
        self._tx_completed()

    def _deliver_events(self):
        if self._rings is None:
            return
        ring = self._rings[EVENT]
        sent = 0
        while self._events_pending:
            r = lib.pv_vsock_event(ring.vq, ring.chain, EVENT_TRANSPORT_RESET)
            if r < 0:
                self._broken(EVENT, r)
                return
            if r == 0:
                break                           # delivered when the driver adds a buffer
            self._events_pending -= 1
            sent += 1
        if sent and ring.need_interrupt():
            self._interrupt.used(EVENT)
