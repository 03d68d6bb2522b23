"""virtio-vsock transmit chains held by the device (native/src/vsock.c):
an RW chain whose payload the host socket cannot take yet stays out of the
used ring until EPOLLOUT, then goes out straight from guest memory.  Checked
through the mock driver: the stream arrives whole and in order, every chain
is completed exactly once, the bounds (per connection, per device) fall
back to copying, resets and snapshots complete what is held."""
import random
import socket

import pytest

from vmm.testing.mockvsock import (HDR_LEN, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, TX,
                                   GuestStream, dispatch, hdr)

from vsock_rig import VsockRig

HOLD_CONN = 32                       # PV_VSOCK_HOLD_CONN


class Ledger:
    """Every transmit chain offered and completed: a head is completed only
    while outstanding, and only once."""

    def __init__(self, d):
        self.completed = 0
        send = d.send

        def tracked_send(*a, **kw):
            head = send(*a, **kw)
            assert head not in self.outstanding, f"head {head} offered twice"
            self.outstanding.add(head)
            return head
        d.send = tracked_send
        self.attach(d)

    def attach(self, d):
        """(Again after the driver re-initialised the device: new queues.)"""
        self.outstanding = set()
        q = d.queues[TX]
        get_used = q.get_used

        def tracked_get_used():
            out = get_used()
            for head, length in out:
                assert head in self.outstanding, f"head {head} completed but not outstanding"
                assert length == 0
                self.outstanding.remove(head)
                self.completed += 1
            return out
        q.get_used = tracked_get_used


@pytest.fixture
def rig(tmp_path):
    made = []

    def make(**kw):
        r = VsockRig(tmp_path, **kw)
        r.ledger = Ledger(r.d)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def connect(r, gport=1000, port=52, sndbuf=None):
    """Guest connects to host `port`; the host's end is small (`sndbuf`) so
    the device's socket fills quickly.  Returns (stream, host socket)."""
    lst = r.listen(port)
    g = GuestStream(r.d, gport, port, buf_alloc=256 << 10)
    g.send_op(OP_REQUEST)
    rest = dispatch(r.d.received(), {gport: g})
    assert rest == [] and [p.op for p in g.ctl] == [OP_RESPONSE]
    hs, _ = lst.accept()
    if sndbuf:
        slot = r.dev.mux.by_ports[(port, gport)]
        r.dev.mux.socks[slot].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    hs.setblocking(False)
    return g, hs


def fill(r, g, streams, total=None, chunk=32 << 10, split=None):
    """Write random data until the device's credit runs out; returns it."""
    sent = bytearray()
    while total is None or len(sent) < total:
        want = chunk if total is None else min(chunk, total - len(sent))
        data = random.randbytes(want)
        n = min(len(data), max(0, g.credit))
        if n == 0:
            break
        g.send_op(OP_RW, data[:n], kick=False, split=split)
        g.tx_cnt += n
        sent += data[:n]
        r.d.kick(TX)
        dispatch(r.d.received(), streams)
    return sent


def drain(r, hs, want, streams, rounds=400):
    got = bytearray()
    for _ in range(rounds):
        try:
            got += hs.recv(1 << 20)
        except BlockingIOError:
            pass
        r.dev.poll()
        dispatch(r.d.received(), streams)
        if len(got) >= want:
            break
    return bytes(got)


def test_held_chains_resume_when_the_socket_drains(rig):
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    sent = fill(r, g, {1000: g})
    assert len(sent) >= 256 << 10 and g.credit == 0
    c = r.dev.counters()
    # the socket took a little; the rest waits in guest memory, not copied
    assert c["held_now"] > 0 and c["backlog_bytes"] == 0
    unsent = r.dev.mux.unsent()
    assert 0 < unsent <= len(sent)
    taken = hs.recv(1 << 20)                        # all the socket holds: the rest is unsent
    assert taken == bytes(sent[:len(sent) - unsent])
    r.d.queues[TX].get_used()
    assert len(r.ledger.outstanding) == c["held_now"]
    r.d.ack_interrupt()
    irqs = r.t._interrupts
    got = taken + drain(r, hs, unsent, {1000: g})
    assert got == bytes(sent)
    assert r.t._interrupts > irqs                   # completions from the poll were signalled
    r.d.queues[TX].get_used()
    assert not r.ledger.outstanding and r.dev.counters()["held_now"] == 0
    assert r.dev.mux.unsent() == 0
    assert r.ledger.completed == c["rx_pkts"] + 1        # (+ the REQUEST)


def test_one_connection_holds_at_most_its_share_and_the_rest_is_copied(rig):
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    sent = fill(r, g, {1000: g}, chunk=4096)          # 64 small packets within credit
    c = r.dev.counters()
    assert c["held_now"] == HOLD_CONN
    assert c["backlog_bytes"] >= (c["rx_pkts"] - HOLD_CONN - 2) * 4096 - 65536
    assert drain(r, hs, len(sent), {1000: g}) == bytes(sent)
    r.d.queues[TX].get_used()
    assert not r.ledger.outstanding


def test_stalled_readers_leave_the_ring_to_other_connections(rig):
    """Three host programs that never read hold at most half the ring's
    descriptors; a fourth connection still streams."""
    r = rig()
    streams, socks = {}, {}
    for i in range(3):
        g, hs = connect(r, gport=1000 + i, port=60 + i, sndbuf=4096)
        streams[1000 + i], socks[1000 + i] = g, hs
    for p, g in streams.items():
        fill(r, g, streams, chunk=4096)
    c = r.dev.counters()
    size = r.d.queues[TX].size
    assert 0 < c["held_now"] <= size // 4 + 1        # two descriptors per chain
    g4, hs4 = connect(r, gport=2000, port=70)
    streams[2000] = g4
    data = fill(r, g4, streams, total=1 << 20)
    got = bytearray()
    for _ in range(400):
        try:
            got += hs4.recv(1 << 20)
        except BlockingIOError:
            pass
        r.dev.poll()
        dispatch(r.d.received(), streams)
        if len(data) < 1 << 20:
            data += fill(r, g4, streams, total=(1 << 20) - len(data))
        if len(got) == 1 << 20:
            break
    assert bytes(got) == bytes(data) and len(got) == 1 << 20
    for p, hs in socks.items():                    # the stalled ones lost nothing either
        assert len(drain(r, hs, streams[p].tx_cnt, streams)) == streams[p].tx_cnt


def test_chain_of_many_segments_is_copied_in_order(rig):
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    a = fill(r, g, {1000: g}, total=96 << 10)        # held
    b = fill(r, g, {1000: g}, total=64 << 10, split=1024)   # 64 segments: copied after a
    c = fill(r, g, {1000: g}, total=32 << 10)        # held again, after b
    assert r.dev.counters()["backlog_bytes"] > 0
    assert drain(r, hs, len(a) + len(b) + len(c), {1000: g}) == bytes(a + b + c)
    r.d.queues[TX].get_used()
    assert not r.ledger.outstanding


def test_guest_rst_completes_held_chains(rig):
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    fill(r, g, {1000: g})
    assert r.dev.counters()["held_now"] > 0
    g.send_op(OP_RST)
    r.d.queues[TX].get_used()
    assert not r.ledger.outstanding and r.dev.counters()["held_now"] == 0
    assert r.dev.counters()["connections"] == 0


def test_vanished_host_peer_completes_held_chains_with_rst(rig):
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    fill(r, g, {1000: g})
    hs.close()                                      # EPOLLHUP/ERR: the flush fails
    for _ in range(3):
        r.dev.poll()
        dispatch(r.d.received(), {1000: g})
    assert OP_RST in [p.op for p in g.ctl]
    r.d.queues[TX].get_used()
    assert not r.ledger.outstanding and r.dev.counters()["held_now"] == 0


def test_shutdown_waits_for_held_data(rig):
    from vmm.testing.mockvsock import SHUT_RCV, SHUT_SEND
    from vmm.testing.mockvsock import OP_SHUTDOWN
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    sent = fill(r, g, {1000: g}, total=200 << 10)
    g.send_op(OP_SHUTDOWN, flags=SHUT_SEND | SHUT_RCV)
    got = bytearray()
    for _ in range(400):
        try:
            b = hs.recv(1 << 20)
        except BlockingIOError:
            b = None
        if b == b"":
            break                                   # end of stream after all the data
        got += b or b""
        r.dev.poll()
        dispatch(r.d.received(), {1000: g})
    assert bytes(got) == bytes(sent)
    dispatch(r.d.received(), {1000: g})
    assert [p.op for p in g.ctl][-1] == OP_RST      # the full close, once flushed
    r.d.queues[TX].get_used()
    assert not r.ledger.outstanding


def test_snapshot_completes_held_chains_and_the_stream_goes_on(rig):
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    sent = fill(r, g, {1000: g})
    held = r.dev.counters()["held_now"]
    assert held > 0
    unsent = r.dev.mux.unsent()
    r.d.ack_interrupt()
    st = r.t.state()                                # the rings as saved: nothing in flight
    assert r.dev.mux.unsent() == unsent             # held payload moved, none lost
    tx = st["queues"][TX]
    assert tx["next_avail"] == tx["next_used"]
    assert r.dev.counters()["held_now"] == 0
    assert r.dev.counters()["backlog_bytes"] > 0   # (the payload moved to the backlog)
    assert st["interrupt_status"] & 1              # the completions were signalled
    r.d.queues[TX].get_used()
    assert not r.ledger.outstanding
    assert drain(r, hs, len(sent), {1000: g}) == bytes(sent)   # this VM resumes


def test_device_reset_drops_held_chains_without_completing(rig):
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    fill(r, g, {1000: g})
    q = r.d.queues[TX]
    used_before = q.used_idx
    assert r.dev.counters()["held_now"] > 0
    r.d.regs.write_status(0)                        # the driver resets the device
    assert q.used_idx == used_before                # nothing written to the old ring
    assert r.dev.counters()["held_now"] == 0 and r.dev.mux.vs.nheld == 0
    assert hs.recv(1 << 20)                         # (what the socket took arrived)


def test_guest_reoffering_held_chains_is_reset_and_the_device_lives(rig):
    """A hostile guest offers again the heads the device still holds (and
    scribbles on its descriptor table): those packets exceed our credit, so
    the stream is reset and every held chain completed; the device keeps
    serving the guest's next connection."""
    r = rig()
    g, hs = connect(r, sndbuf=4096)
    fill(r, g, {1000: g})
    q = r.d.queues[TX]
    held = sorted(r.ledger.outstanding)
    assert held
    for h in held:                                  # re-offer them behind the driver's back
        r.mem.write_int(q.avail + 4 + 2 * (q.avail_idx % q.size), h, 2)
        q.avail_idx = (q.avail_idx + 1) & 0xFFFF
    q.publish()
    r.d.kick(TX)
    dispatch(r.d.received(), {1000: g})
    assert OP_RST in [p.op for p in g.ctl]
    assert r.dev.counters()["held_now"] == 0 and r.dev.counters()["malformed"] >= 1
    rng = random.Random(7)
    for _ in range(50):                            # garbage descriptors: at worst NEEDS_RESET
        k = rng.randrange(q.size)
        r.mem.write(q.desc + 16 * k, rng.randbytes(16))
    r.dev.poll()
    r.d.regs.write_status(0)
    assert r.d.init()
    r.ledger.attach(r.d)
    g2, hs2 = connect(r, gport=1001, port=53)
    data = fill(r, g2, {1001: g2}, total=100 << 10)
    assert drain(r, hs2, len(data), {1001: g2}) == bytes(data)
