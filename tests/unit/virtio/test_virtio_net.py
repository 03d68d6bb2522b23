"""virtio-net (virtio 1.1 §5.1) through the mock driver, a datagram
socketpair standing in for the tap: configuration, both directions at every
frame size class up to 65550 bytes with the header, chains split across many
buffers, MRG_RXBUF, the no-buffer case, counters and malformed chains."""
import os
import random
import struct

import pytest

from vmm.memory import GuestMemory, MiB
from vmm.native import lib
from vmm.virtio import device as vd
from vmm.virtio import mmio as m
from vmm.virtio.ioloop import IoLoop
from vmm.testing.mocknet import HDR_LEN, RX, TX, net_hdr
from vmm.virtio.net import F_MAC, F_MRG_RXBUF, F_STATUS, NetDevice, NetError, default_mac
from vmm.virtio.queue import VRING_DESC_F_NEXT as NXT, VRING_DESC_F_WRITE as W

from net_rig import NetRig, SockBackend

MAX_TOTAL = 65550                    # header + frame, the largest we test
BIG_BUF = 65562                      # Linux's "big packets" receive buffer
NO_MRG = ~vd.bit(F_MRG_RXBUF)


def sizes():
    """Every total size from the header to 1600, then a stride with the
    page/segment edges and the maximum."""
    s = set(range(HDR_LEN, 1601)) | set(range(1601, MAX_TOTAL + 1, 97))
    for edge in (2048, 4096, 8192, 16384, 32768, 65536):
        s |= {edge - 1, edge, edge + 1}
    s |= {MAX_TOTAL - 1, MAX_TOTAL}
    return sorted(x for x in s if HDR_LEN <= x <= MAX_TOTAL)


def frame(n, seed=0):
    return random.Random(n * 7919 + seed).randbytes(n)


@pytest.fixture
def mem():
    g = GuestMemory(32 * MiB)
    yield g
    g.close()


@pytest.fixture
def rig(mem):
    made = []

    def make(**kw):
        r = NetRig(mem, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def test_config_and_features(rig):
    r = rig()
    assert r.ok and r.t.read(m.DEVICE_ID, 4) == 1
    mac = bytes(r.d.config(i, 1) for i in range(6))
    assert mac == default_mac("sockpair") and not mac[0] & 1
    assert r.d.config(6, 2) == 1                       # VIRTIO_NET_S_LINK_UP
    f = r.d.features
    for b in (vd.VIRTIO_F_VERSION_1, vd.VIRTIO_F_RING_EVENT_IDX,
              vd.VIRTIO_F_RING_INDIRECT_DESC, F_MAC, F_STATUS, F_MRG_RXBUF):
        assert f >> b & 1
    assert r.backend.hdr_len == 12 and r.backend.offload == 0


def test_explicit_mac(rig):
    r = rig(mac=bytes.fromhex("020000abcdef"))
    assert bytes(r.d.config(i, 1) for i in range(6)).hex() == "020000abcdef"
    with pytest.raises(NetError):
        NetDevice(SockBackend(), mac=b"\1\2")


def test_tx_every_size(rig):
    r = rig()
    mark = r.d.mark()
    for n in sizes():
        data = frame(n - HDR_LEN)
        split = 1 + n % 7 if n < 4096 else 1 + n % 31
        r.d.send(data, split=split, indirect=n % 2 == 0)
        assert r.d.sent()
        got = r.backend.peer_frames()
        assert got == [net_hdr() + data], n
        r.d.release(mark)                          # checks the guards
    st = r.dev.stats
    assert st["tx_packets"] == len(sizes()) and st["tx_drops"] == st["tx_errors"] == 0
    assert st["tx_bytes"] == sum(n - HDR_LEN for n in sizes())
    assert r.t.status & vd.DEVICE_NEEDS_RESET == 0 and r.d.check_guards() == []


def test_tx_batch_one_kick(rig):
    r = rig()
    frames = [frame(n) for n in range(60, 60 + 100)]
    for f in frames:
        r.d.send(f, split=2, kick=False)
    r.d.kick(TX)
    assert len(r.d.sent()) == 100
    assert r.backend.peer_frames() == [net_hdr() + f for f in frames]
    assert r.dev.kicks[TX] == 1


@pytest.mark.parametrize("mrg", [False, True], ids=["big-buffers", "mrg"])
def test_rx_every_size(rig, mrg):
    r = rig(features=None if mrg else NO_MRG)
    mark = r.d.mark()
    for n in sizes():
        data = frame(n - HDR_LEN, 1)
        r.d.add_rx(BIG_BUF, split=1 + n % 19, indirect=n % 3 == 0)
        r.backend.peer.send(net_hdr() + data)
        r.dev.poll_rx()
        got = r.d.received(mrg=True)
        assert len(got) == 1, n
        hdr, payload = got[0]
        assert payload == data and hdr == net_hdr(num_buffers=1), n
        r.d.release(mark)
    st = r.dev.stats
    assert st["rx_packets"] == len(sizes()) and st["rx_drops"] == 0
    assert st["rx_bytes"] == sum(n - HDR_LEN for n in sizes())
    assert r.d.check_guards() == []


def test_rx_mergeable_buffers(rig):
    r = rig()
    assert r.d.features >> F_MRG_RXBUF & 1
    for _ in range(60):
        r.d.add_rx(1526, split=2)
    frames = [frame(n, 2) for n in (60, 1514, 1515, 9000, MAX_TOTAL - HDR_LEN)]
    for f in frames:
        r.backend.peer.send(net_hdr() + f)
    r.dev.poll_rx()
    got = r.d.received(mrg=True)
    assert [p for _, p in got] == frames
    nbufs = [struct.unpack_from("<H", h, 10)[0] for h, _ in got]
    assert nbufs == [-(-(len(f) + HDR_LEN) // 1526) for f in frames]
    assert r.d.check_guards() == []


def test_rx_mergeable_waits_for_buffers(rig):
    """A 64 KiB frame and only 3 small buffers: held (not dropped), the tap
    left alone, delivered once the driver adds buffers and kicks."""
    r = rig()
    for _ in range(3):
        r.d.add_rx(1526)
    big = frame(65000, 3)
    r.backend.peer.send(net_hdr() + big)
    r.dev.poll_rx()
    assert r.d.received(mrg=True) == [] and not r.dev.polling
    assert r.dev.stats["rx_drops"] == 0
    # §2.6.7.1: with EVENT_IDX the device must ask for a kick at the driver's
    # next addition, or the buffers added below would never be announced.
    q = r.d.queues[RX]
    assert q.event_idx and q.avail_event == q.avail_idx
    for _ in range(50):
        r.d.add_rx(1526)
    r.d.kick(RX)
    got = r.d.received(mrg=True)
    assert [p for _, p in got] == [big] and r.dev.polling


def test_rx_oversize_without_mrg_is_counted(rig):
    r = rig(features=NO_MRG)
    r.d.add_rx(1526)
    r.backend.peer.send(net_hdr() + frame(3000))
    r.backend.peer.send(net_hdr() + frame(100))
    r.dev.poll_rx()
    got = r.d.received()
    assert [len(p) for _, p in got] == [100]       # the chain was reused
    assert r.dev.stats["rx_drops"] == 1 and r.dev.stats["rx_packets"] == 1


def test_no_buffers_stops_polling_then_resumes(rig):
    r = rig()
    frames = [frame(n, 4) for n in range(60, 70)]
    for f in frames:
        r.backend.peer.send(net_hdr() + f)
    r.dev.poll_rx()                                # no buffers: nothing read
    assert not r.dev.polling and r.dev.stats["rx_packets"] == 0
    assert r.dev.stats["rx_drops"] == 0
    q = r.d.queues[RX]
    assert q.avail_event == q.avail_idx            # asks for a kick at the next buffer
    for _ in range(4):
        r.d.add_rx(2048)
    r.d.kick(RX)
    assert [p for _, p in r.d.received(mrg=True)] == frames[:4]
    assert not r.dev.polling                       # ran out again
    for _ in range(10):
        r.d.add_rx(2048)
    r.d.kick(RX)
    assert [p for _, p in r.d.received(mrg=True)] == frames[4:]
    assert r.dev.polling                           # drained: watching the tap again


def test_budget_and_interrupts(rig):
    irqs = []
    r = rig(irq=lambda: irqs.append(1))
    r.dev._net.budget = 16                         # frames per C call
    for _ in range(50):
        r.d.add_rx(256, publish=False)
    r.d.queues[RX].publish()
    for i in range(40):
        r.backend.peer.send(net_hdr() + frame(64, i))
        r.d.send(frame(64, i), kick=False)
    r.d.kick(TX)                                   # 40 TX in 3 batches, RX in between
    assert len(r.d.sent()) == 40 and len(r.backend.peer_frames()) == 40
    r.dev.poll_rx()
    assert [p for _, p in r.d.received(mrg=True)] == [frame(64, i) for i in range(40)]
    assert irqs and r.dev.polling
    assert lib.PV_NET_BUDGET >= 64


def test_ioloop_wakes_device(mem):
    import threading
    import time
    got = threading.Event()
    with IoLoop() as loop:
        r = NetRig(mem, ioloop=loop, irq=got.set)
        try:
            for _ in range(8):
                r.d.add_rx(2048)
            assert r.dev.polling
            r.backend.peer.send(net_hdr() + b"hello" * 20)
            assert got.wait(30)
            deadline = time.monotonic() + 30
            while r.dev.stats["rx_packets"] < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [p for _, p in r.d.received(mrg=True)] == [b"hello" * 20]
        finally:
            r.close()
        assert loop.errors == 0


def test_tx_backend_error_counted(rig):
    r = rig()
    r.backend.peer.close()                         # writes now fail (ECONNREFUSED)
    r.d.send(frame(100))
    assert r.d.sent() == [(0, 0)]                  # completed anyway
    assert r.dev.stats["tx_errors"] + r.dev.stats["tx_drops"] == 1


def test_reset_and_reuse(rig):
    r = rig()
    r.d.add_rx(2048)
    r.t.write(m.STATUS, 4, 0)
    assert not r.dev.polling
    r.d.reset_arena()
    assert r.d.init()
    r.d.add_rx(2048)
    r.backend.peer.send(net_hdr() + b"x" * 64)
    r.dev.poll_rx()
    assert [p for _, p in r.d.received(mrg=True)] == [b"x" * 64]


# --- malformed chains: NEEDS_RESET, no crash, nothing outside the buffers ---

def _raw_chain(d, q, descs, head=0):
    for i, (addr, length, flags, nxt) in descs.items():
        q.write_desc(i, addr, length, flags, nxt)
    q.free = [i for i in q.free if i not in descs]
    q.put_avail(head)


@pytest.mark.parametrize("case", ["rx_readable", "rx_short", "rx_past_ram", "rx_loop",
                                  "tx_writable", "tx_short", "tx_past_ram", "tx_head"])
def test_malformed(rig, mem, case):
    r = rig()
    d = r.d
    buf = d.alloc(2048, 16, 16, fill=0x3C)
    qi = RX if case.startswith("rx") else TX
    q = d.queues[qi]
    hdr = d.alloc(HDR_LEN, 16, 16)
    mem.write(hdr, net_hdr())
    descs, head = {
        "rx_readable": ({0: (buf, 2048, 0, 0)}, 0),
        "rx_short": ({0: (buf, 8, W, 0)}, 0),
        "rx_past_ram": ({0: (mem.end - 100, 2048, W, 0)}, 0),
        "rx_loop": ({0: (buf, 100, W | NXT, 1), 1: (buf + 100, 100, W | NXT, 0)}, 0),
        "tx_writable": ({0: (hdr, HDR_LEN, NXT, 1), 1: (buf, 64, W, 0)}, 0),
        "tx_short": ({0: (hdr, 6, 0, 0)}, 0),
        "tx_past_ram": ({0: (hdr, HDR_LEN, NXT, 1), 1: (mem.end - 10, 64, 0, 0)}, 0),
        "tx_head": ({}, q.size + 3),
    }[case]
    _raw_chain(d, q, descs, head)
    if qi == RX:
        r.backend.peer.send(net_hdr() + frame(500))
        r.dev.poll_rx()
    else:
        d.kick(TX)
    assert r.t.status & vd.DEVICE_NEEDS_RESET
    assert r.t.interrupt_status & vd.INT_CONFIG
    assert q.used_idx == 0 and r.backend.peer_frames() == []
    if case != "rx_readable":
        assert mem.read(buf, 2048) == bytes([0x3C]) * 2048
    assert d.check_guards() == []
    assert not r.dev.polling
    # the VMM goes on: a reset brings the device back
    r.t.write(m.STATUS, 4, 0)
    d.reset_arena()
    assert d.init()
    d.send(b"after reset")
    assert r.backend.peer_frames() == [net_hdr() + b"after reset"]


def test_default_mac_is_stable_and_unicast():
    a, b = default_mac("tap0"), default_mac("tap1")
    assert a == default_mac("tap0") and a != b
    assert a[:3] == bytes([0x52, 0x54, 0]) and not a[0] & 1
