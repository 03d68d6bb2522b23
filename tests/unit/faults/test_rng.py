"""virtio-rng (virtio 1.1 §5.4) through the mock driver."""
import time

from vmm.testing.mockdriver import MockDriver
from vmm.testing.waiting import SLOW, HeldClock, until
from vmm.virtio import device as vd
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.ratelimit import RateLimiter, TokenBucket
from vmm.virtio.rng import RngDevice


def make(gmem, **kw):
    dev = RngDevice(**kw)
    t = VirtioMmio(dev, gmem)
    d = MockDriver(t, gmem)
    assert d.init()
    return dev, t, d


def offer(d, n, split=1):
    q = d.queues[0]
    bufs = []
    step = n // split
    for k in range(split):
        size = step if k < split - 1 else n - step * (split - 1)
        bufs.append((d.alloc(size, 16, 16, fill=0), size))
    head = q.add([(g, s, True) for g, s in bufs])
    return head, bufs


def test_identity(gmem):
    dev, t, d = make(gmem)
    assert t.read(0x8, 4) == 4                       # DeviceID: entropy source
    assert d.device_features() >> vd.VIRTIO_F_VERSION_1 & 1
    t.close()


def test_fills_every_buffer(gmem):
    dev, t, d = make(gmem)
    reqs = [offer(d, n, split) for n, split in ((16, 1), (4096, 3), (100, 2))]
    d.kick(0)
    used = dict(d.queues[0].get_used())
    for head, bufs in reqs:
        n = sum(s for _, s in bufs)
        assert used[head] == n
        data = b"".join(gmem.read(g, s) for g, s in bufs)
        assert data.count(0) < len(data) // 8          # random, not the zero fill
    assert d.check_guards() == []
    assert dev.stats["bytes"] == 4212
    t.close()


def test_rejects_readable_buffer(gmem):
    dev, t, d = make(gmem)
    g = d.alloc(64)
    d.queues[0].add([(g, 64, False)])
    d.kick(0)
    assert d.status() & vd.DEVICE_NEEDS_RESET
    t.close()


def test_rate_limited_ops_resume_by_timer(gmem, loop):
    # 10 ops per 100 ms, no burst: 30 requests take ~0.2 s after the first 10
    # (the bucket's clock holds still until clk.start(): no token comes
    # back while this thread is descheduled between the kick and the check)
    clk = HeldClock()
    lim = RateLimiter(ops=TokenBucket(10, 100, clock=clk))
    dev, t, d = make(gmem, rate_limiter=lim, ioloop=loop)
    for _ in range(30):
        offer(d, 32)
    d.kick(0)
    assert len(d.queues[0].get_used()) == 10        # the rest wait for tokens
    got = 10
    t0 = clk.start()
    while got < 30 and time.monotonic() - t0 < SLOW:
        time.sleep(0.01)
        got += len(d.queues[0].get_used())
    elapsed = time.monotonic() - t0
    assert got == 30
    # the I/O thread counts requests after it pushed them: wait for the count
    assert until(lambda: dev.stats["requests"] >= 30)
    assert dev.stats["requests"] == 30                 # each served exactly once
    # 20 tokens at 100/s: >= 0.2 s; the upper bound (10x) only catches a
    # limiter far too slow, not a busy host
    assert 0.19 < elapsed < 2.0
    assert dev.stats["throttled"] >= 2
    t.close()


def test_on_legacy_pci(gmem):
    from vmm.virtio.pci_legacy import TRANSITIONAL_IDS, VirtioPciLegacy
    dev = RngDevice()
    t = VirtioPciLegacy(dev, gmem)
    d = MockDriver(t, gmem)
    assert d.init()
    assert TRANSITIONAL_IDS[4] == 0x1005
    head, bufs = offer(d, 256)
    d.kick(0)
    assert dict(d.queues[0].get_used())[head] == 256
    t.close()
