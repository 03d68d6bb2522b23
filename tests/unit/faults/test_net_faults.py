"""NIC faults, pcap and hooks through the mock driver and a socketpair
standing in for the tap (virtio-net slow path, intercept.py)."""
import struct
import time

from vmm.testing.mocknet import HDR_LEN, RX, TX, net_hdr
from vmm.testing.waiting import SLOW, HeldClock
from vmm.virtio import device as vd
from vmm.virtio.faults import NetFaults
from vmm.virtio.net import F_MRG_RXBUF, F_STATUS
from vmm.virtio.ratelimit import RateLimiter, TokenBucket
from vmm.virtio.trace import PcapWriter, read_pcap


def frame(i, n=60):
    return bytes([i & 0xFF]) * 6 + b"\x02" * 6 + b"\x08\x00" + bytes([i & 0xFF]) * (n - 14)


def send_n(d, n):
    for i in range(n):
        d.send(frame(i), kick=False)
    d.queues[TX].publish()
    d.kick(TX)


def test_tx_drop_dup_seeded_exact(net):
    spec = "tx.drop=20%;tx.dup=10%;seed=5"
    ref = NetFaults(spec)
    expect, dropped = [], 0
    for i in range(100):
        outs = ref.decide("tx", net_hdr() + frame(i), HDR_LEN)
        expect += [f for _, f in outs]
        dropped += not outs
    dev, t, d, b = net(faults=NetFaults(spec))
    send_n(d, 100)
    got = b.peer_frames()
    assert got == expect and 0 < len(got) != 100
    assert len(d.sent()) == 100                       # every chain completed
    assert dev.stats["tx_drops"] == dropped > 0
    assert dev.stats["tx_packets"] == len(got)


def test_rx_drop_corrupt(net):
    spec = "rx.drop=50%;rx.corrupt=100%;seed=3"
    ref = NetFaults(spec)
    expect = []
    for i in range(40):
        expect += [f[HDR_LEN:] for _, f in ref.decide("rx", net_hdr() + frame(i), HDR_LEN)]
    dev, t, d, b = net(faults=NetFaults(spec), features=~vd.bit(F_MRG_RXBUF))
    for _ in range(64):
        d.add_rx(1600)
    for i in range(40):
        b.peer.send(net_hdr() + frame(i))
    dev.poll_rx()
    got = [f for _, f in d.received()]
    assert got == expect and 5 < len(got) < 35
    assert dev.stats["rx_drops"] == 40 - len(got)
    for f in got:                                      # one bit flipped in each
        assert f not in [frame(i) for i in range(40)]


def test_rx_dup_with_mrg(net):
    dev, t, d, b = net(faults=NetFaults("rx.dup=100%"))
    for _ in range(16):
        d.add_rx(1000)                                 # a 3000-byte frame needs 4
    b.peer.send(net_hdr() + frame(9, 3000))
    dev.poll_rx()
    got = d.received(mrg=True)
    assert [f for _, f in got] == [frame(9, 3000)] * 2


def test_rx_waits_for_buffers(net):
    dev, t, d, b = net(faults=NetFaults(""), features=~vd.bit(F_MRG_RXBUF))
    b.peer.send(net_hdr() + frame(1))
    b.peer.send(net_hdr() + frame(2))
    dev.poll_rx()
    assert not dev.polling                              # no buffers: stop polling
    d.add_rx(1600)
    d.add_rx(1600)
    d.kick(RX)
    assert [f for _, f in d.received()] == [frame(1), frame(2)]


def test_delay_rx_and_tx(net, loop):
    dev, t, d, b = net(ioloop=loop, faults=NetFaults("delay=200ms"))
    for _ in range(4):
        d.add_rx(2000)
    d.kick(RX)
    t0 = time.monotonic()
    d.send(frame(1))
    b.peer.send(net_hdr() + frame(2))
    got_tx, got_rx = b.peer_frames(), []
    if time.monotonic() - t0 < 0.19:       # (a descheduled test thread may look too late)
        assert got_tx == []                # not sent before the delay
    while (not got_tx or not got_rx) and time.monotonic() - t0 < SLOW:
        time.sleep(0.005)
        got_tx += b.peer_frames()
        got_rx += d.received(mrg=True)
    assert time.monotonic() - t0 >= 0.19
    assert got_tx == [net_hdr() + frame(1)] and [f for _, f in got_rx] == [frame(2)]


def test_link_down_up_config_interrupt(net):
    irqs = []
    dev, t, d, b = net(irq=lambda: irqs.append(1))
    assert d.features >> F_STATUS & 1
    status = lambda: d.config(6, 2)                     # §5.1.4: status after mac
    assert status() == 1
    gen = t.read(0xFC, 4)
    dev.configure(faults=NetFaults("link=down"))
    assert status() == 0 and t.read(0xFC, 4) != gen
    assert t.read(0x60, 4) & vd.INT_CONFIG
    d.send(frame(1))
    assert b.peer_frames() == [] and dev.stats["tx_drops"] == 1
    dev.configure(faults=None)
    assert status() == 1 and dev.intercept is None
    d.send(frame(2))
    assert b.peer_frames() == [net_hdr() + frame(2)]


def test_pcap_has_both_directions(net, tmp_path):
    path = tmp_path / "cap.pcap"
    dev, t, d, b = net(pcap=PcapWriter(path))
    d.add_rx(2000)
    d.kick(RX)
    d.send(frame(1))
    b.peer.send(net_hdr() + frame(2, 100))
    dev.poll_rx()
    dev.close()
    recs = read_pcap(path)
    assert [f for _, f in recs] == [frame(1), frame(2, 100)]
    raw = path.read_bytes()
    assert struct.unpack_from("<IHHiIII", raw) == (0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)


class Mangler:
    def net_frame(self, direction, f):
        if f[0] == 3:
            return "drop"
        if direction == "tx":
            return f[:-1] + b"!"
        return None


def test_hook_drops_and_rewrites(net):
    dev, t, d, b = net(hook=Mangler())
    d.send(frame(3))
    d.send(frame(4))
    assert b.peer_frames() == [net_hdr() + frame(4)[:-1] + b"!"]


def test_tx_rate_limit_ops(net, loop):
    # the bucket's clock stands still until clk.start(): no token comes back
    # while this thread is descheduled between the send and the first check
    clk = HeldClock()
    lim = RateLimiter(ops=TokenBucket(20, 100, clock=clk))        # 200 frames/s
    dev, t, d, b = net(ioloop=loop, tx_limiter=lim)
    send_n(d, 60)                                      # 20 now, 40 over ~0.2 s
    assert len(b.peer_frames()) == 20
    t0 = clk.start()
    got = 20
    while got < 60 and time.monotonic() - t0 < SLOW:
        time.sleep(0.01)
        got += len(b.peer_frames())
    # 40 tokens at 200/s take 0.2 s; the upper bound (10x) only catches a
    # limiter far too slow, not a busy host
    assert got == 60 and 0.19 < time.monotonic() - t0 < 2.0


def test_tx_bandwidth_10MiB_s_within_10pct(net, loop):
    # 2 MiB per 200 ms: the bucket keeps 200 ms of refill while a descheduled
    # thread (this one, or the I/O thread's timer) asks for nothing; its
    # start-up 2 MiB go in a warm-up that is not measured
    MiB = 1 << 20
    lim = RateLimiter(bandwidth=TokenBucket(2 * MiB, 200))   # 10 MiB/s
    dev, t, d, b = net(ioloop=loop, tx_limiter=lim)
    data = net_hdr() + frame(5, 9000)
    free = [d.alloc(len(data)) for _ in range(64)]
    for g in free:
        d.mem.write(g, data)
    q, owner = d.queues[TX], {}

    def pump(seconds):
        got, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < seconds:
            if free:
                while free:
                    g = free.pop()
                    owner[q.add([(g, len(data), False)], publish=False)] = g
                q.publish()
                d.kick(TX)
            for h, _ in q.get_used():
                free.append(owner.pop(h))
            got += sum(len(f) - HDR_LEN for f in b.peer_frames())
            time.sleep(0.002)
        return got, time.monotonic() - t0
    pump(0.5)
    got, secs = pump(2.5)
    rate = got / secs / MiB
    assert 9.0 <= rate <= 11.0, rate
