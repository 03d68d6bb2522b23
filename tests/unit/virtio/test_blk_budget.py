"""Issue #14: virtio-blk does a bounded amount of work per call (as
virtio-net does) and re-queues the rest, so a guest cannot keep the device's
I/O thread busy for as long as it likes; no request is lost or done twice."""
import threading
import time

import pytest

from vmm.virtio import blk as b
from vmm.virtio.ioloop import IoLoop, signal_eventfd
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.blk import BlkDevice
from vmm.testing.mockdriver import BlkDriver, T_IN, T_OUT
from vmm.testing.waiting import SLOW, barrier, until


def test_one_call_does_at_most_budget_requests(rig):
    r = rig()
    r.dev.budget = 8
    disk = r.disk()
    reqs = [r.d.submit(T_IN, i, read_len=512) for i in range(20)]
    q = r.d.queues[0]
    assert r.dev.queue_notify(0) is True            # 8 done, more left
    assert len(q.get_used()) == 8
    assert r.dev.queue_notify(0) is True            # 16
    assert r.dev.queue_notify(0) is False           # 20: drained, notifications re-armed
    used = q.get_used()
    assert len(used) == 12
    assert q.avail_event == q.avail_idx == 20       # §2.6.7.1: kick me at the next one
    for i, req in enumerate(reqs):
        status, data = r.d.result(req)
        assert status == b.S_OK and data == disk[512 * i:512 * (i + 1)]
    assert r.dev.stats["requests"] == 20


def test_vcpu_notify_still_drains_everything(rig):
    """A QueueNotify written on a vCPU thread (no ioeventfd) loops until done."""
    r = rig()
    r.dev.budget = 4
    for i in range(30):
        r.d.submit(T_IN, i, read_len=512)
    r.d.kick()
    assert len(r.d.queues[0].get_used()) == 30
    assert r.dev.stats["kicks"] == 8                 # ceil(30 / 4) calls


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_ioeventfd_path_requeues_without_loss_or_repeat(mem, image, native):
    """Through the I/O thread: the handler re-signals the notify eventfd when
    the budget runs out; every request completes exactly once."""
    with IoLoop() as loop:
        dev = BlkDevice(image, native=native)
        dev.budget = 5
        t = VirtioMmio(dev, mem, ioloop=loop, register_ioeventfd=lambda *a: None)
        d = BlkDriver(t, mem)
        try:
            assert d.init()
            q = d.queues[0]
            payloads = {}
            reqs = []
            for i in range(37):
                data = bytes([i]) * 512
                payloads[i] = data
                reqs.append(d.submit(T_OUT, i, data=data))
            signal_eventfd(t.notify_fds[0])
            used, deadline = [], time.monotonic() + SLOW
            while len(used) < 37 and time.monotonic() < deadline:
                used += q.get_used()
                time.sleep(0.01)
            barrier(loop)            # the handler counts requests after pushing them
            used += q.get_used()     # (and nothing more may come: none is done twice)
            heads = [h for h, _ in used]
            assert sorted(heads) == sorted(req.head for req in reqs)   # each exactly once
            assert dev.stats["requests"] == 37 and dev.stats["kicks"] >= 8
            with open(image, "rb") as f:
                disk = f.read()
            for i, data in payloads.items():
                assert disk[512 * i:512 * (i + 1)] == data
        finally:
            t.close()


def test_loop_stops_between_batches_of_a_busy_guest(mem, image):
    """A guest that keeps its ring full cannot keep stop() waiting: the loop
    checks for a stop between device calls (one batch each)."""
    loop = IoLoop()
    loop.start()
    dev = BlkDevice(image)
    dev.budget = 2
    t = VirtioMmio(dev, mem, ioloop=loop, register_ioeventfd=lambda *a: None)
    d = BlkDriver(t, mem)
    stop = threading.Event()
    try:
        assert d.init()
        q = d.queues[0]

        def guest():                     # refill as fast as requests complete
            while not stop.is_set():
                q.get_used()
                while len(q.free) >= 2:
                    d.submit(T_IN, 0, read_len=512)
                signal_eventfd(t.notify_fds[0])
                time.sleep(0.001)
        g = threading.Thread(target=guest, daemon=True)
        g.start()
        assert until(lambda: dev.stats["requests"] > 100)      # the guest keeps it busy
        t0 = time.monotonic()
        assert loop.stop(timeout=SLOW)
        assert time.monotonic() - t0 < 10      # promptly (not a timing figure: a busy host)
    finally:
        stop.set()
        g.join(SLOW)
        loop.close()
        t.close()
