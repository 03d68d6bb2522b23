"""The host side of Firecracker's hybrid vsock: guest streams (virtio 1.1
§5.10) multiplexed onto Unix stream sockets.

- Host-initiated: a host program connects to `uds_path` and writes
  `CONNECT <port>\\n`; we send the guest a REQUEST from a fresh local port
  and, once the guest answers RESPONSE, write `OK <local port>\\n` back and
  the socket carries the stream.  Anything else instead of that line closes
  the socket.
- Guest-initiated: a REQUEST to CID 2, port P connects to the Unix socket
  `<uds_path>_<P>`; RESPONSE if it accepts, RST if nobody listens.

Connection setup and teardown are decided here, in Python; each connection
has a slot in the C connection table (native/src/vsock.c) that moves the
data, tracks credit and emits the packets asked for with `pending` bits.
The caller (vmm/virtio/vsock.py) holds its lock around every method.
"""
import errno
import heapq
import logging
import os
import re
import select
import socket
import struct
import time

from vmm.native import ffi, lib

log = logging.getLogger("pyvmm.virtio.vsock")

HDR = struct.Struct("<QQIIIHHIII")       # struct virtio_vsock_hdr (§5.10.6), 44 bytes
HOST_CID = 2
MAX_CONNS = 1024
BUF_ALLOC = 256 << 10                    # our receive buffer per connection (as Firecracker)
LOCAL_PORT_FIRST = 1 << 30               # host-initiated connections' ports, as Firecracker
CONNECT_TIMEOUT = 2.0                    # s for the guest to answer a host CONNECT (as Firecracker)
MAX_LINE = 32                            # "CONNECT 4294967295\n" is 19 bytes
CONNECT_RE = re.compile(rb"CONNECT ([0-9]{1,10})\n")
OPS = range(lib.PV_VSOCK_OP_REQUEST, lib.PV_VSOCK_OP_CREDIT_REQUEST + 1)


class VsockSetupError(OSError):
    """The host side cannot be set up (one line)."""


def bind_listener(uds_path):
    """Listen on `uds_path`; a stale socket file left by a previous VMM is replaced."""
    parent = os.path.dirname(os.path.abspath(uds_path))
    if not os.path.isdir(parent):
        raise VsockSetupError(f"vsock: directory {parent} of uds path does not exist")
    if len(os.fsencode(uds_path)) > 107:
        raise VsockSetupError(f"vsock: uds path {uds_path} is too long for a Unix socket")
    if os.path.lexists(uds_path):
        import stat
        if not stat.S_ISSOCK(os.lstat(uds_path).st_mode):
            raise VsockSetupError(f"vsock: {uds_path} exists and is not a socket")
        os.unlink(uds_path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.bind(uds_path)
        s.listen(128)
    except OSError as e:
        s.close()
        raise VsockSetupError(f"vsock: cannot listen on {uds_path}: {e.strerror}") from None
    return s


class Muxer:
    def __init__(self, uds_path, guest_cid, buf_alloc=BUF_ALLOC, max_conns=MAX_CONNS):
        self.uds_path = uds_path
        self.buf_alloc = buf_alloc
        self.listener = bind_listener(uds_path)
        self.ep = select.epoll()
        self._conns = ffi.new("struct pv_vsock_conn[]", max_conns)
        vs = self.vs = ffi.new("struct pv_vsock *")
        vs.guest_cid = guest_cid
        vs.epfd = self.ep.fileno()
        vs.max_slots = max_conns
        vs.conns = self._conns
        vs.credit_threshold = max(1, buf_alloc // 4)
        self.res = ffi.new("struct pv_vsock_result *")
        self._free = list(range(max_conns))      # a heap: low slots first keep the scan short
        self.socks = {}                          # slot -> socket of a live connection
        self.by_ports = {}                       # (local_port, peer_port) -> slot
        self._lines = {}                         # fd -> (socket, bytearray): awaiting CONNECT
        self._next_local = LOCAL_PORT_FIRST
        self.stats = {"host_connects": 0, "guest_connects": 0, "bad_connect_lines": 0,
                      "guest_connect_refused": 0, "connect_timeouts": 0}
        self._watch(self.listener.fileno(), True)
        self._connecting = {}                    # slot -> deadline of a host CONNECT
        self._timer = lib.pv_timerfd_create()
        if self._timer < 0:
            raise VsockSetupError(f"vsock: timerfd: {os.strerror(-self._timer)}")
        self._watch(self._timer, True)

    def _watch(self, fd, on):
        r = lib.pv_vsock_watch(self.vs, fd, int(on))
        if r < 0:
            raise OSError(-r, f"vsock: epoll_ctl: {os.strerror(-r)}")

    @property
    def guest_cid(self):
        return int(self.vs.guest_cid)

    @property
    def fileno(self):
        return self.ep.fileno()

    def counters(self):
        vs = self.vs
        # rx: RW packets from the guest; tx: RW packets to the guest
        c = {k: int(getattr(vs, k)) for k in ("rx_pkts", "rx_bytes", "tx_pkts", "tx_bytes",
                                              "rst_sent", "malformed", "rst_dropped", "backlog_bytes",
                                              "held_chains")}
        c["held_now"] = int(vs.nheld)            # transmit chains waiting for their socket
        c.update(self.stats)
        c["connections"] = len(self.socks)
        return c

    def unsent(self):
        """Guest bytes accepted (counted in our credit) that no host socket
        has taken yet: held transmit chains plus copied backlogs."""
        return sum(int(self._conns[s].pend_len) + int(self._conns[s].held_bytes)
                   for s in self.socks)

    # --- host events (Python's fds in the epoll set) ---
    def poll(self):
        """Events of the epoll set: connection sockets are handled in C, the
        listener and sockets still sending their CONNECT line here."""
        n = lib.pv_vsock_poll(self.vs, self.res)
        if n < 0:
            raise OSError(-n, os.strerror(-n))
        for i in range(self.res.nevents):
            fd = self.res.event_fd[i]
            if fd == self.listener.fileno():
                self._accept()
            elif fd in self._lines:
                self._read_line(fd)
            elif fd == self._timer:
                self._expire()
        return n

    def _accept(self):
        while True:
            try:
                s, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:          # e.g. EMFILE: leave it in the backlog for now
                log.warning("vsock: accept on %s: %s", self.uds_path, e.strerror)
                return
            s.setblocking(False)
            self._lines[s.fileno()] = (s, bytearray())
            self._watch(s.fileno(), True)

    def _drop_line(self, fd):
        s, _ = self._lines.pop(fd)
        self._watch(fd, False)
        return s

    def _read_line(self, fd):
        """One byte at a time, so nothing after the newline is consumed: the
        stream's first bytes stay in the socket for the guest."""
        s, buf = self._lines[fd]
        while True:
            try:
                b = s.recv(1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                b = b""
            buf += b
            if not b or b == b"\n" or len(buf) >= MAX_LINE:
                break
        s = self._drop_line(fd)
        m = CONNECT_RE.fullmatch(bytes(buf))
        port = int(m.group(1)) if m else -1
        if not 0 <= port <= 0xFFFFFFFF:
            self.stats["bad_connect_lines"] += 1
            log.debug("vsock: host sent %r instead of CONNECT <port>", bytes(buf))
            s.close()
            return
        local = self._local_port(port)
        slot = self._open(s, local, port, lib.PV_VSOCK_ST_CONNECTING)
        if slot is not None:
            self._conns[slot].pending |= lib.PV_VSOCK_P_REQUEST
            self.stats["host_connects"] += 1
            if not self._connecting:
                lib.pv_timerfd_arm(self._timer, int(CONNECT_TIMEOUT * 1000))
            self._connecting[slot] = time.monotonic() + CONNECT_TIMEOUT

    def _expire(self):
        """Host CONNECTs the guest did not answer in time: RST (the guest
        forgets its half) and the host socket is closed."""
        try:
            os.read(self._timer, 8)
        except BlockingIOError:
            pass
        now = time.monotonic()
        for slot, deadline in list(self._connecting.items()):
            if deadline > now:
                continue
            del self._connecting[slot]
            self.stats["connect_timeouts"] += 1
            k = self._conns[slot]
            if k.pending & lib.PV_VSOCK_P_REQUEST:      # never even sent: just drop it
                self.kill(slot)
            else:
                k.pending = lib.PV_VSOCK_P_RST
        if self._connecting:
            left = min(self._connecting.values()) - now
            lib.pv_timerfd_arm(self._timer, max(1, int(left * 1000)))

    def _local_port(self, peer):
        while True:
            p = self._next_local
            self._next_local = p + 1 if p < 0xFFFFFFFF else LOCAL_PORT_FIRST
            if (p, peer) not in self.by_ports:
                return p

    def _open(self, sock, local, peer, state, peer_buf=0, peer_fwd=0):
        if not self._free:
            log.warning("vsock: %d connections open, refusing another", len(self.socks))
            sock.close()
            return None
        slot = heapq.heappop(self._free)
        r = lib.pv_vsock_conn_open(self.vs, slot, sock.fileno(), local, peer, state,
                                   self.buf_alloc)
        if r < 0:
            heapq.heappush(self._free, slot)
            sock.close()
            return None
        k = self._conns[slot]
        k.peer_buf_alloc, k.peer_fwd_cnt = peer_buf, peer_fwd
        self.socks[slot] = sock
        self.by_ports[(local, peer)] = slot
        return slot

    def _start(self, slot):
        r = lib.pv_vsock_conn_start(self.vs, slot)
        if r < 0:
            self._conns[slot].pending = lib.PV_VSOCK_P_RST

    def kill(self, slot):
        """Forget a connection without telling the guest; the host end sees EOF."""
        k = self._conns[slot]
        self._connecting.pop(slot, None)
        self.by_ports.pop((k.local_port, k.peer_port), None)
        lib.pv_vsock_conn_free(self.vs, slot)
        heapq.heappush(self._free, slot)
        sock = self.socks.pop(slot)
        sock.close()

    def reap(self):
        """Close connections the C side finished (RST sent)."""
        if not self.vs.ndead:
            return
        self.vs.ndead = 0
        for slot in [s for s in self.socks if self._conns[s].state == lib.PV_VSOCK_ST_DEAD]:
            self.kill(slot)

    def reset_all(self):
        """Device reset or transport reset (§5.10.6.6): every connection is gone."""
        for slot in list(self.socks):
            self.kill(slot)
        self.vs.rst_len = 0

    # --- packets from the guest that the C fast path left to us ---
    def handle_packet(self, hdr, payload):
        (src_cid, dst_cid, src_port, dst_port, length, typ, op, flags, buf_alloc,
         fwd_cnt) = HDR.unpack(bytes(hdr))
        slot = self.by_ports.get((dst_port, src_port))
        if op == lib.PV_VSOCK_OP_RST:           # never answer an RST
            if slot is not None and src_cid == self.guest_cid:
                self.kill(slot)
            return
        if (src_cid != self.guest_cid or dst_cid != HOST_CID or typ != lib.PV_VSOCK_TYPE_STREAM
                or op not in OPS or (op == lib.PV_VSOCK_OP_RW and length > payload)):
            self.vs.malformed += 1
            self._refuse(slot, dst_port, src_port)
            return
        if op == lib.PV_VSOCK_OP_REQUEST:
            if slot is not None:                # a second REQUEST for a live connection
                self._refuse(slot, dst_port, src_port)
            else:
                self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return
        if slot is None:
            self._refuse(None, dst_port, src_port)
            return
        k = self._conns[slot]
        if k.state == lib.PV_VSOCK_ST_DEAD or k.pending & lib.PV_VSOCK_P_RST:
            return
        k.peer_buf_alloc, k.peer_fwd_cnt = buf_alloc, fwd_cnt
        if op == lib.PV_VSOCK_OP_RESPONSE and k.state == lib.PV_VSOCK_ST_CONNECTING:
            self._connecting.pop(slot, None)
            try:
                self.socks[slot].send(b"OK %d\n" % k.local_port)
            except OSError:
                self._refuse(slot, dst_port, src_port)
                return
            self._start(slot)
        elif k.state != lib.PV_VSOCK_ST_ESTABLISHED:
            self.vs.malformed += 1
            self._refuse(slot, dst_port, src_port)
        elif op == lib.PV_VSOCK_OP_SHUTDOWN:
            if flags & lib.PV_VSOCK_SHUT_RCV:
                k.flags |= lib.PV_VSOCK_C_PEER_SHUT_RCV
            if flags & lib.PV_VSOCK_SHUT_SEND:
                k.flags |= lib.PV_VSOCK_C_PEER_SHUT_SEND
            both = lib.PV_VSOCK_C_PEER_SHUT_RCV | lib.PV_VSOCK_C_PEER_SHUT_SEND
            if k.flags & both == both:          # the guest closed: RST once flushed
                k.flags |= lib.PV_VSOCK_C_CLOSE_AFTER_FLUSH
            lib.pv_vsock_flush(self.vs, slot)   # passes SHUT_WR on, or RSTs, when flushed
        elif op == lib.PV_VSOCK_OP_CREDIT_REQUEST:
            k.pending |= lib.PV_VSOCK_P_CREDIT_UPDATE
        else:                                   # RESPONSE when established, or RW beyond the chain
            self.vs.malformed += 1
            self._refuse(slot, dst_port, src_port)

    def _refuse(self, slot, local, peer):
        if slot is not None:
            self._conns[slot].pending = lib.PV_VSOCK_P_RST
        else:
            lib.pv_vsock_queue_rst(self.vs, local, peer)

    def _guest_connect(self, port, peer, buf_alloc, fwd_cnt):
        path = f"{self.uds_path}_{port}"
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            s.connect(path)
        except OSError as e:
            s.close()
            self.stats["guest_connect_refused"] += 1
            log.debug("vsock: guest port %d -> %s: %s", peer, path,
                      e.strerror or errno.errorcode.get(e.errno))
            lib.pv_vsock_queue_rst(self.vs, port, peer)
            return
        slot = self._open(s, port, peer, lib.PV_VSOCK_ST_CONNECTING, buf_alloc, fwd_cnt)
        if slot is None:
            lib.pv_vsock_queue_rst(self.vs, port, peer)
            return
        self._conns[slot].pending |= lib.PV_VSOCK_P_RESPONSE
        self._start(slot)
        self.stats["guest_connects"] += 1

    def close(self):
        self.reset_all()
        for fd in list(self._lines):
            self._drop_line(fd).close()
        if self.listener is not None:
            try:
                self._watch(self.listener.fileno(), False)
            except OSError:
                pass
            self.listener.close()
            self.listener = None
            try:
                os.unlink(self.uds_path)
            except OSError:
                pass
        if self._timer >= 0:
            os.close(self._timer)
            self._timer = -1
        self.ep.close()
