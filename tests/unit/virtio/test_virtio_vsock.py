"""virtio-vsock (virtio 1.1 §5.10) through the mock driver with the host
side on real Unix sockets: every op in both directions, credit accounting
(§5.10.6.3) on both sides, half and full closes, Firecracker's CONNECT
protocol, malformed packets, 64 concurrent streams, TRANSPORT_RESET."""
import os
import random
import socket
import struct
import time

import pytest

from vmm.virtio import device as vd
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.vsock import VsockDevice, VsockError
from vmm.testing.mockvsock import (EVENT, HDR_LEN, HOST_CID, OP_CREDIT_REQUEST,
                                   OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST,
                                   OP_RW, OP_SHUTDOWN, SHUT_RCV, SHUT_SEND, TX, GuestStream,
                                   dispatch, hdr)

from vsock_rig import VsockRig


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(**kw):
        r = VsockRig(tmp_path, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def ops(pkts):
    return [p.op for p in pkts]


def guest_connect(r, port=52, gport=1000, buf_alloc=64 << 10):
    """Guest connects to host port `port` (a listener there); returns (stream, host socket)."""
    g = GuestStream(r.d, gport, port, buf_alloc=buf_alloc)
    g.send_op(OP_REQUEST)
    rest = dispatch(r.d.received(), {gport: g})
    assert rest == [] and ops(g.ctl) == [OP_RESPONSE]
    hs, _ = r.listeners[-1].accept()
    hs.settimeout(5)
    return g, hs


def host_connect(r, gport=80, buf_alloc=64 << 10):
    """Host connects to guest port `gport`; the guest accepts.  Returns (stream, socket)."""
    h = r.host_connect(gport)
    pk = r.pump()
    assert len(pk) == 1 and pk[0].op == OP_REQUEST and pk[0].dst_port == gport
    assert pk[0].src_port >= 1 << 30 and pk[0].src_cid == HOST_CID and pk[0].dst_cid == 3
    g = GuestStream(r.d, gport, pk[0].src_port, buf_alloc=buf_alloc)
    g.accept(pk[0])
    g.send_op(OP_RESPONSE)
    h.settimeout(5)
    assert h.recv(64) == b"OK %d\n" % pk[0].src_port
    return g, h


def recv_exact(s, n):
    out = bytearray()
    while len(out) < n:
        b = s.recv(n - len(out))
        if not b:
            break
        out += b
    return bytes(out)


# --- configuration and setup ---
def test_device_id_config_and_features(rig):
    r = rig(cid=42)
    assert r.ok and r.dev.device_type == 19
    assert r.d.config(0, 8) == 42 and r.d.cid == 42
    assert r.d.features & vd.bit(vd.VIRTIO_F_VERSION_1)
    assert [q.size for q in r.d.queues] == [256, 256, 256]


@pytest.mark.parametrize("cid", [0, 1, 2, 0xFFFFFFFF, 1 << 40, -3, "3", True])
def test_reserved_or_bad_cid_refused(tmp_path, cid):
    with pytest.raises(VsockError, match="guest CID"):
        VsockDevice(str(tmp_path / "v.sock"), guest_cid=cid)


def test_missing_uds_directory_is_one_line_error(tmp_path):
    with pytest.raises(VsockError, match="does not exist") as e:
        VsockDevice(str(tmp_path / "nope" / "v.sock"))
    assert "\n" not in str(e.value)


def test_stale_socket_replaced_and_removed_on_close(tmp_path):
    path = str(tmp_path / "v.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()                        # a stale socket file, as after a crash
    dev = VsockDevice(path)
    assert os.path.exists(path)
    dev.close()
    assert not os.path.exists(path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(VsockError, match="not a socket"):
        VsockDevice(str(tmp_path / "file"))


# --- connection setup ---
def test_guest_connect_and_data_both_ways(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    assert g.credit == 256 << 10                      # our buf_alloc
    data = random.randbytes(100_000)
    assert g.write(data) == len(data)
    assert recv_exact(hs, len(data)) == data
    back = random.randbytes(50_000)
    hs.sendall(back)
    got = b""
    for _ in range(50):
        dispatch(r.pump(1), {1000: g})
        got += g.consume()
        if len(got) == len(back):
            break
    assert got == back and g.credit_violations == 0
    c = r.dev.counters()
    assert c["rx_bytes"] == len(data) and c["tx_bytes"] == len(back)
    assert c["guest_connects"] == 1 and c["connections"] == 1


def test_guest_connect_without_listener_gets_rst(rig):
    r = rig()
    r.d.packet(7, 999, OP_REQUEST, buf_alloc=4096)
    pk = r.d.received()
    assert ops(pk) == [OP_RST] and (pk[0].src_port, pk[0].dst_port) == (999, 7)
    assert r.dev.counters()["guest_connect_refused"] == 1


def test_host_connect_ok_line_and_stream(rig):
    r = rig()
    g, h = host_connect(r)
    h.sendall(b"ping")
    dispatch(r.pump(), {80: g})
    assert g.consume() == b"ping"
    g.write(b"pong")
    assert h.recv(10) == b"pong"


def test_bytes_after_connect_line_reach_the_guest(rig):
    r = rig()
    h = socket.socket(socket.AF_UNIX)
    h.connect(r.uds)
    h.sendall(b"CONNECT 80\nearly data")
    pk = r.pump()
    g = GuestStream(r.d, 80, pk[0].src_port)
    g.accept(pk[0])
    g.send_op(OP_RESPONSE)
    dispatch(r.pump(), {80: g})
    assert g.consume() == b"early data"
    h.close()


def test_host_connect_refused_by_guest(rig):
    r = rig()
    h = r.host_connect(81)
    pk = r.pump()
    r.d.packet(81, pk[0].src_port, OP_RST)
    h.settimeout(5)
    assert h.recv(10) == b""                          # closed, no OK line
    assert r.dev.counters()["connections"] == 0


@pytest.mark.parametrize("line", [b"HELLO\n", b"CONNECT\n", b"CONNECT x\n", b"connect 5\n",
                                  b"CONNECT 99999999999\n", b"CONNECT " + b"1" * 40,
                                  b"CONNECT 5 \n", b"\n"])
def test_garbage_instead_of_connect_disconnects(rig, line):
    r = rig()
    h = socket.socket(socket.AF_UNIX)
    h.connect(r.uds)
    h.sendall(line)
    if not line.endswith(b"\n") or len(line) < 32:
        pass
    pk = r.pump()
    assert pk == []
    h.settimeout(5)
    try:
        assert h.recv(10) == b""
    except ConnectionResetError:
        pass
    assert r.dev.counters()["bad_connect_lines"] == 1


def test_host_closing_before_connect_line(rig):
    r = rig()
    h = socket.socket(socket.AF_UNIX)
    h.connect(r.uds)
    h.sendall(b"CONN")
    r.pump()
    h.close()
    assert r.pump() == [] and r.dev.counters()["bad_connect_lines"] == 1


# --- closes ---
def test_guest_half_close_then_full_close(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    g.write(b"last words")
    g.send_op(OP_SHUTDOWN, flags=SHUT_SEND)
    assert recv_exact(hs, 100) == b"last words"       # then EOF: SHUT_WR passed on
    hs.sendall(b"reply")                              # the other direction still works
    dispatch(r.pump(), {1000: g})
    assert g.consume() == b"reply"
    g.send_op(OP_SHUTDOWN, flags=SHUT_RCV | SHUT_SEND)
    dispatch(r.d.received(), {1000: g})
    assert ops(g.ctl)[-1] == OP_RST                   # what Linux's close() waits for
    assert r.dev.counters()["connections"] == 0


def test_host_close_gives_guest_shutdown_both(rig):
    r = rig()
    g, h = host_connect(r)
    h.sendall(b"bye")
    h.close()
    dispatch(r.pump(), {80: g})
    assert g.consume() == b"bye"
    assert g.ctl[-1].op == OP_SHUTDOWN and g.ctl[-1].flags == SHUT_RCV | SHUT_SEND
    g.send_op(OP_RST)                                 # the guest finishes
    r.pump()
    assert r.dev.counters()["connections"] == 0


def test_host_half_close_gives_shutdown_send(rig):
    r = rig()
    g, h = host_connect(r)
    h.shutdown(socket.SHUT_WR)
    dispatch(r.pump(), {80: g})
    assert g.ctl[-1].op == OP_SHUTDOWN and g.ctl[-1].flags == SHUT_SEND
    g.write(b"still open")
    assert h.recv(20) == b"still open"


def test_guest_rst_closes_host_socket(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    g.send_op(OP_RST)
    assert hs.recv(10) == b""
    assert r.d.received() == []                       # never an RST for an RST


def test_writing_to_vanished_host_peer_gives_rst(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    hs.close()
    dispatch(r.pump(), {1000: g})                     # SHUTDOWN both from the host side
    g.write(b"x" * 1000)
    dispatch(r.d.received(), {1000: g})
    assert ops(g.ctl)[-1] == OP_RST


# --- credit (§5.10.6.3) ---
def test_device_never_exceeds_guest_credit(rig):
    r = rig()
    g, h = host_connect(r, buf_alloc=16 << 10)
    data = random.randbytes(200_000)
    h.setblocking(False)
    sent = 0
    got = bytearray()
    for _ in range(400):
        try:
            sent += h.send(data[sent:sent + 65536])
        except BlockingIOError:
            pass
        pk = r.pump(1)
        dispatch(pk, {80: g})
        # the device may have at most buf_alloc unconsumed bytes with us
        assert g.rx_cnt - g.fwd_cnt <= g.buf_alloc
        if random.random() < 0.5:
            got += g.consume()
        if len(got) == len(data):
            break
    assert bytes(got) == data and g.credit_violations == 0


def test_credit_request_when_guest_buffer_full_and_update_resumes(rig):
    r = rig()
    g, h = host_connect(r, buf_alloc=8192)
    h.sendall(b"a" * 20000)
    dispatch(r.pump(), {80: g})
    assert len(g.inbox) == 8192                       # stopped at the credit
    assert OP_CREDIT_REQUEST in ops(g.ctl)
    g.consume()                                       # sends CREDIT_UPDATE
    dispatch(r.pump(), {80: g})
    assert len(g.inbox) == 8192
    g.consume()
    dispatch(r.pump(), {80: g})
    assert len(g.inbox) == 20000 - 16384


def test_credit_request_answered(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    g.send_op(OP_CREDIT_REQUEST)
    dispatch(r.d.received(), {1000: g})
    assert g.ctl[-1].op == OP_CREDIT_UPDATE and g.ctl[-1].buf_alloc == 256 << 10


def test_our_credit_held_while_host_does_not_read(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    sent = bytearray()
    for _ in range(100):
        chunk = random.randbytes(32 << 10)
        n = g.write(chunk)
        sent += chunk[:n]
        dispatch(r.d.received(), {1000: g})
        if n == 0:
            break
    # all credit used: fwd_cnt counts only what the socket took, the rest
    # waits in the transmit chains, which the device holds (not completed)
    assert g.credit == 0 and len(sent) >= 256 << 10
    assert g.peer_fwd_cnt < len(sent)
    c = r.dev.counters()
    assert c["held_now"] > 0 and c["backlog_bytes"] == 0
    r.d.reclaim_tx()
    assert len(r.d.tx_inflight) == c["held_now"]
    hs.setblocking(False)
    got = bytearray()
    for _ in range(200):                  # the host reads; EPOLLOUT flushes the rest
        try:
            got += hs.recv(1 << 20)
        except BlockingIOError:
            pass
        dispatch(r.pump(1), {1000: g})
        if len(got) == len(sent):
            break
    assert got == sent
    r.d.reclaim_tx()                      # every held chain was completed once
    assert r.d.tx_inflight == {} and r.dev.counters()["held_now"] == 0
    # CREDIT_UPDATEs came as the backlog drained (every buf_alloc/4 forwarded)
    assert g.peer_fwd_cnt >= len(sent) - (64 << 10) and g.credit > 192 << 10
    g.send_op(OP_CREDIT_REQUEST)
    dispatch(r.d.received(), {1000: g})
    assert g.peer_fwd_cnt == len(sent) and g.credit == 256 << 10


def test_data_beyond_credit_is_rst(rig):
    r = rig(buf_alloc=4096)
    r.listen(52)
    g, hs = guest_connect(r)
    g.send_op(OP_RW, b"x" * 4097)
    dispatch(r.d.received(), {1000: g})
    assert ops(g.ctl)[-1] == OP_RST and r.dev.counters()["malformed"] == 1


def test_data_after_shutdown_send_is_rst(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    g.send_op(OP_SHUTDOWN, flags=SHUT_SEND)
    g.send_op(OP_RW, b"late")
    dispatch(r.d.received(), {1000: g})
    assert ops(g.ctl)[-1] == OP_RST


# --- malformed packets ---
@pytest.mark.parametrize("kw", [dict(src_cid=7), dict(dst_cid=5), dict(dst_cid=3),
                                dict(op=0), dict(op=8), dict(op=0xFFFF), dict(type_=2),
                                dict(length=100), dict(length=0xFFFFFFFF)])
def test_malformed_header_gets_rst_and_device_lives(rig, kw):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    f = dict(src_cid=3, dst_cid=HOST_CID, op=OP_RW, length=None, type_=1)
    f.update(kw)
    n = 10 if f["length"] is None else f["length"]
    r.d.send(hdr(f["src_cid"], f["dst_cid"], 1000, 52, f["op"], n, 0, 4096, 0, f["type_"]),
             b"0123456789")
    pk = r.d.received()
    assert ops(pk) == [OP_RST] and r.dev.counters()["malformed"] == 1
    assert not r.t.status & vd.DEVICE_NEEDS_RESET
    # a connection-level problem resets only that connection
    r.listen(53)
    g2, hs2 = guest_connect(r, port=53, gport=1001)
    g2.write(b"alive")
    assert hs2.recv(10) == b"alive"


def test_packets_for_unknown_connection_get_rst(rig):
    r = rig()
    for op in (OP_RW, OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST, OP_RESPONSE):
        r.d.packet(5, 6, op, b"x" if op == OP_RW else b"")
        pk = r.d.received()
        assert ops(pk) == [OP_RST] and (pk[0].src_port, pk[0].dst_port) == (6, 5)
    r.d.packet(5, 6, OP_RST)
    assert r.d.received() == []


def test_short_header_or_writable_tx_chain_needs_reset(rig):
    r = rig()
    gpa = r.d.alloc(HDR_LEN)
    r.d.queues[TX].add([(gpa, HDR_LEN - 1, False)])
    r.d.kick(TX)
    assert r.t.status & vd.DEVICE_NEEDS_RESET
    r2 = rig()
    r2.d.queues[TX].add([(gpa, HDR_LEN, True)])
    r2.d.kick(TX)
    assert r2.t.status & vd.DEVICE_NEEDS_RESET


def test_rst_queue_flood_is_bounded(rig):
    r = rig(rx_buffers=4)
    for i in range(600):
        r.d.packet(i, 9, OP_RW, b"x", kick=(i % 100 == 99))
    c = r.dev.counters()
    assert c["rst_dropped"] > 0
    r.d.received()


def test_second_request_for_live_connection_resets_it(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    g.send_op(OP_REQUEST)
    dispatch(r.d.received(), {1000: g})
    assert ops(g.ctl)[-1] == OP_RST
    assert hs.recv(10) == b""


# --- many connections ---
def test_64_concurrent_streams(rig):
    r = rig(rx_buffers=128)
    r.listen(52)
    streams, hosts = {}, {}
    for i in range(32):                               # 32 guest-initiated
        g, hs = guest_connect(r, gport=2000 + i)
        streams[g.port], hosts[g.port] = g, hs
    for i in range(32):                               # 32 host-initiated
        g, h = host_connect(r, gport=3000 + i)
        streams[g.port], hosts[g.port] = g, h
    rnd = random.Random(5)
    up = {p: rnd.randbytes(rnd.randrange(1, 100_000)) for p in streams}
    down = {p: rnd.randbytes(rnd.randrange(1, 100_000)) for p in streams}
    for p, h in hosts.items():
        h.setblocking(False)
    up_off = dict.fromkeys(streams, 0)
    down_off = dict.fromkeys(streams, 0)
    host_got = {p: bytearray() for p in streams}
    guest_got = {p: bytearray() for p in streams}
    for _ in range(500):
        for p, g in streams.items():
            o = up_off[p]
            up_off[p] += g.write(up[p][o:o + 20000], kick=False)
            h = hosts[p]
            try:
                down_off[p] += h.send(down[p][down_off[p]:down_off[p] + 20000])
            except BlockingIOError:
                pass
            try:
                host_got[p] += h.recv(1 << 20)
            except BlockingIOError:
                pass
        r.d.kick(TX)
        dispatch(r.pump(1), streams)
        for p, g in streams.items():
            guest_got[p] += g.consume()
        if all(len(host_got[p]) == len(up[p]) and len(guest_got[p]) == len(down[p])
               for p in streams):
            break
    for p in streams:
        assert bytes(host_got[p]) == up[p] and bytes(guest_got[p]) == down[p], p
        assert streams[p].credit_violations == 0
    assert r.dev.counters()["connections"] == 64


# --- events and resets ---
def test_transport_reset_event_drops_connections(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    r.dev.transport_reset()
    assert r.d.events() == [0]                        # VIRTIO_VSOCK_EVENT_TRANSPORT_RESET
    assert hs.recv(10) == b""
    assert r.dev.counters()["connections"] == 0


def test_transport_reset_waits_for_an_event_buffer(rig):
    r = rig()
    for _ in range(5):
        r.dev.transport_reset()
    assert r.d.events() == [0, 0, 0, 0]               # 4 buffers
    assert r.d.events() == [0]                        # the 5th after the refill's kick


def test_device_reset_closes_connections(rig):
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    r.d.regs.write_status(0)
    assert hs.recv(10) == b""
    assert r.d.init() and r.dev.counters()["connections"] == 0


def test_with_io_loop(tmp_path):
    loop = IoLoop()
    loop.start()
    try:
        r = VsockRig(tmp_path, ioloop=loop)
        g, h = host_connect(r)
        h.sendall(b"threaded")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not g.inbox:
            dispatch(r.d.received(), {80: g})
            time.sleep(0.01)
        assert g.consume() == b"threaded"
        r.close()
    finally:
        loop.close()


def test_host_connect_times_out_when_guest_does_not_answer(rig, monkeypatch):
    from vmm.virtio import vsock_mux
    monkeypatch.setattr(vsock_mux, "CONNECT_TIMEOUT", 0.2)
    r = rig()
    h = r.host_connect(82)
    pk = r.pump()
    assert ops(pk) == [OP_REQUEST]
    monkeypatch.setattr(vsock_mux, "CONNECT_TIMEOUT", 60)   # (read at each CONNECT)
    h2 = r.host_connect(83)                           # answered in time: survives
    pk2 = r.pump()
    r.d.packet(83, pk2[0].src_port, OP_RESPONSE, buf_alloc=4096)
    deadline = time.monotonic() + 5
    got = []
    while time.monotonic() < deadline and OP_RST not in ops(got):
        import select
        select.select([r.dev.fileno], [], [], 0.5)
        got += r.pump(1)
    assert [(p.op, p.dst_port) for p in got] == [(OP_RST, 82)], got
    h.settimeout(5)
    assert h.recv(10) == b""
    h2.settimeout(5)
    assert h2.recv(64).startswith(b"OK ")
    c = r.dev.counters()
    assert c["connect_timeouts"] == 1 and c["connections"] == 1


def test_random_packets_never_break_the_device(rig):
    """Hostile guest: random headers (ops, ports, CIDs, lengths, flags,
    credit) around two live connections; the device answers with packets or
    RSTs, never raises, never writes outside its buffers."""
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    hs.setblocking(False)
    gh, h = host_connect(r)
    h.setblocking(False)
    rnd = random.Random(12)
    for i in range(3000):
        op = rnd.choice([0, 1, 2, 3, 4, 5, 5, 5, 6, 7, 8, 0xFFFF])
        sport = rnd.choice([1000, 80, 5, 0xFFFFFFFF])
        dport = rnd.choice([52, gh.peer_port, 7, 0])
        data = rnd.randbytes(rnd.choice([0, 1, 100, 5000]))
        length = rnd.choice([len(data), len(data), 0, len(data) + 1, 0xFFFFFFFF])
        cid = rnd.choice([3, 3, 3, 2, 0xFFFFFFFFFFFFFFFF])
        dcid = rnd.choice([2, 2, 2, 3, 1])
        r.d.send(hdr(cid, dcid, sport, dport, op, length, rnd.getrandbits(32),
                     rnd.getrandbits(32), rnd.getrandbits(32), rnd.choice([1, 1, 2])), data,
                 kick=i % 7 == 0, split=rnd.choice([None, 512, 1033]))
        if i % 50 == 0:
            try:
                h.send(rnd.randbytes(3000))
                hs.recv(1 << 16)
            except (BlockingIOError, OSError):
                pass
            r.pump(1)
    r.d.kick(TX)
    r.pump()
    assert not r.t.status & vd.DEVICE_NEEDS_RESET
    assert r.d.check_guards() == []
    assert r.dev.counters()["malformed"] > 0
    # still serves new connections
    r.listen(60)
    g2, hs2 = guest_connect(r, port=60, gport=4242)
    g2.write(b"fine")
    hs2.settimeout(5)
    assert hs2.recv(10) == b"fine"


def test_io_thread_under_seccomp_filter():
    """Every vsock path on an I/O thread confined like pyvmm's (vmm/seccomp.py
    "io"), in a child process: a missing system call would be SIGSYS."""
    import subprocess
    import sys
    here = os.path.dirname(os.path.abspath(__file__))
    p = subprocess.run([sys.executable, os.path.join(here, "vsock_seccomp_child.py")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.startswith("OK"), (p.returncode, p.stdout, p.stderr)


# --- snapshots (vmm/virtio/device.py contract; Firecracker docs/vsock.md) ---
def _restored(r, st, **kw):
    """The snapshot's device in a new process: a fresh device on the same
    uds path, the transport restored, the mock driver rebound to it."""
    from vmm.testing.mockdriver import MmioRegs
    from vmm.virtio.mmio import VirtioMmio
    dev = VsockDevice(r.uds, guest_cid=3)
    t = VirtioMmio(dev, r.mem, **kw)
    t.restore(st)
    r.dev, r.t = dev, t
    r.d.t, r.d.regs = t, MmioRegs(t)
    return t


def test_restore_sends_transport_reset_and_new_connections_work(rig):
    from vmm.snapshot import ARCH, pack_state, unpack_state
    r = rig()
    r.listen(52)
    g, hs = guest_connect(r)
    g.write(b"before")
    assert recv_exact(hs, 6) == b"before"
    st = r.t.state()
    assert st["device"]["guest_cid"] == 3 and st["device"]["running"]
    st = unpack_state(pack_state({"arch": ARCH, "t": st}))["t"]   # through the file encoding
    r.t.close()                                     # the old VMM is gone
    assert hs.recv(10) == b""
    raised = []
    t = _restored(r, st, irq=lambda: raised.append(1))
    assert t.activated and r.d.events() == []       # nothing before the VM runs again
    t.restart()
    assert r.d.events() == [0] and raised           # TRANSPORT_RESET, with an interrupt
    # the guest's stale socket: its packets find no connection
    g.write(b"stale")
    assert [(p.op, p.dst_port) for p in r.d.received()] == [(OP_RST, 1000)]
    # new connections both ways on the restored rings
    g2, hs2 = guest_connect(r, gport=1001)
    g2.write(b"after")
    assert recv_exact(hs2, 5) == b"after"
    hs2.sendall(b"back")
    dispatch(r.pump(), {1001: g2})
    assert g2.consume() == b"back"
    g3, h3 = host_connect(r, gport=81)
    h3.sendall(b"hello")
    dispatch(r.pump(), {81: g3})
    assert g3.consume() == b"hello" and r.dev.counters()["connections"] == 2


def test_restore_of_a_device_the_driver_never_started_sends_no_event(rig, tmp_path):
    from vmm.memory import GuestMemory, MiB
    from vmm.testing.mockvsock import VsockDriver
    from vmm.virtio.mmio import VirtioMmio
    mem = GuestMemory(16 * MiB)
    uds = str(tmp_path / "cold.sock")
    t = VirtioMmio(VsockDevice(uds), mem)
    st = t.state()
    assert not st["device"]["running"] and not st["activated"]
    t.close()
    t2 = VirtioMmio(VsockDevice(uds), mem)
    t2.restore(st)
    t2.restart()
    d = VsockDriver(t2, mem, arena_size=8 * MiB)
    assert d.init() and d.events() == []
    t2.close()
    mem.close()


def test_restore_refuses_another_guest_cid(rig, tmp_path):
    from vmm.virtio.mmio import VirtioMmio
    r = rig()
    st = r.t.state()
    other = VsockDevice(str(tmp_path / "o.sock"), guest_cid=9)
    t = VirtioMmio(other, r.mem)
    with pytest.raises(VsockError, match="guest CID is 3"):
        t.restore(st)
    t.close()


def test_snapshot_options_rebuild_the_spec(tmp_path):
    from vmm.devices import VsockSpec, spec_from_options
    uds = str(tmp_path / "v.sock")
    opts = VsockSpec(f"cid=7,uds={uds},transport=pci").snapshot_options()
    spec = spec_from_options(opts)
    assert (type(spec), spec.cid, spec.uds_path, spec.transport_name) == (VsockSpec, 7, uds, "pci")
    other = str(tmp_path / "clone.sock")                # pyvmm restore --vsock uds=PATH
    spec = spec_from_options(opts, f"uds={other}")
    assert (spec.cid, spec.uds_path, spec.transport_name) == (7, other, "pci")
    from vmm.devices import DeviceSpecError
    with pytest.raises(DeviceSpecError, match="--vsock: cid cannot change"):
        spec_from_options(opts, f"uds={other},cid=8")   # guest-visible (§5.10.4)


def test_restore_on_modern_pci_signals_the_event_queue_vector(tmp_path):
    """transport=pci: the TRANSPORT_RESET arrives through the event queue's
    MSI-X vector of the new VM (routes and irqfds are per process)."""
    import os as _os
    from vmm.memory import GuestMemory, MiB
    from vmm.pci import device as pd
    from vmm.snapshot import ARCH, pack_state, unpack_state
    from vmm.testing.fakevm import FakeVm
    from vmm.testing.mockvsock import VsockDriver
    from vmm.testing.pcimodern_regs import PciModernRegs
    from vmm.virtio import pci_modern as pm

    def fired(vm, t, vector):
        try:
            return int.from_bytes(_os.read(vm.irqfds[t.msix.gsi(vector)], 8), "little")
        except (BlockingIOError, KeyError):
            return 0

    mem = GuestMemory(32 * MiB)
    uds = str(tmp_path / "p.sock")
    t = pm.VirtioPciModern(VsockDevice(uds), mem, vm=FakeVm())
    t.pci.program_bar(pm.BAR_MODERN, 0xE000_0000)
    t.pci.write_config(pd.COMMAND, 2, pd.CMD_MEMORY | pd.CMD_IO | pd.CMD_MASTER)
    d = VsockDriver(t, mem, arena_size=24 * MiB, regs=lambda t: PciModernRegs(t, msix=True))
    assert d.init()
    st = unpack_state(pack_state({"arch": ARCH, "t": t.state()}))["t"]
    t.close()
    vm2 = FakeVm()
    t2 = pm.VirtioPciModern(VsockDevice(uds), mem, vm=vm2)
    t2.restore(st)
    d.t, d.regs = t2, PciModernRegs(t2, msix=True)
    t2.restart()
    assert fired(vm2, t2, EVENT + 1) == 1 and d.events() == [0]
    t2.close()
    mem.close()
