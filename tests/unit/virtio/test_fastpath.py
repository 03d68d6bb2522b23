"""The I/O loop's C fast path (native/src/fastpath.c, vmm/virtio/fastpath.py):
virtio-mmio kicks of a virtio-blk queue handled in C on the I/O thread, and
everything that must still go through Python (pause, errors, the slow path,
resets, another thread's notify)."""
import os
import select
import threading
import time

import pytest

from vmm.virtio import device as vd
from vmm.virtio import mmio as m
from vmm.virtio.blk import BlkDevice, S_OK
from vmm.virtio.ioloop import IoLoop, drain_eventfd, signal_eventfd
from vmm.virtio.mmio import VirtioMmio
from vmm.testing.mockdriver import BlkDriver, T_IN, T_OUT
from vmm.testing.waiting import SLOW, barrier, until


class FastRig:
    def __init__(self, mem, image, io_engine="sync"):
        self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.loop = IoLoop()
        self.loop.start()
        self.dev = BlkDevice(image, io_engine=io_engine, ioloop=self.loop)
        kicks = []
        self.t = VirtioMmio(self.dev, mem, irq=self.irq, ioloop=self.loop,
                            register_ioeventfd=lambda fd, *a: kicks.append(fd))
        self.kick_fd = kicks[0]
        self.d = BlkDriver(self.t, mem)
        assert self.d.init()
        self.disk = open(image, "rb").read()

    def kick(self):
        signal_eventfd(self.kick_fd)        # what KVM's ioeventfd does

    def wait_irq(self, timeout=SLOW):
        ok = bool(select.select([self.irq], [], [], timeout)[0])
        if ok:
            drain_eventfd(self.irq)
        return ok

    def read(self, sector, n=4096):
        """One read, waited for by its used element, not by the next
        interrupt: an interrupt left over from an earlier request (the early
        interrupt and the end-of-pass one can both be pending) must not
        pass for this one's."""
        req = self.d.submit(T_IN, sector, read_len=n)
        self.kick()
        q = self.d.queues[0]
        heads = []
        deadline = time.monotonic() + SLOW
        while req.head not in heads:
            left = deadline - time.monotonic()
            assert left > 0 and self.wait_irq(left), "no interrupt from the I/O thread"
            heads += [h for h, _ in q.get_used()]
        return self.d.result(req)

    def close(self):
        self.t.close()
        self.loop.close()
        os.close(self.irq)


def handled_in_c(loop):
    """The loop's count of kicks served in C, once everything the I/O
    thread had taken is done: C counts a kick after writing its interrupt,
    so a driver woken by it can look before the count moves."""
    barrier(loop)
    return loop.fast_counts[1]


@pytest.fixture
def fr(mem, image):
    r = FastRig(mem, image)
    yield r
    r.close()


def settle(r, tries=5):
    """Read until one kick is seen served in C, and return the C count then.
    A first kick may meet the thread still in Python's poll (it re-waits in
    C after its wake-up), so it may be served in Python: the count after
    the I/O thread is idle again (barrier) tells which path took it."""
    for _ in range(tries):
        before = r.loop.fast_counts[1]
        assert r.read(0)[0] == S_OK
        if handled_in_c(r.loop) == before + 1:
            return before + 1
    raise AssertionError("no kick was served in C")


def test_kicks_run_in_c_with_isr_counters_and_data(fr):
    fr.t._fast.set_poll_us(0)       # one kick per read (polling would take some without)
    handled0 = settle(fr)
    stats0, irqs0 = dict(fr.dev.stats), fr.t.interrupts
    for i in range(5):
        status, data = fr.read(8 * i)
        assert status == S_OK and data == fr.disk[4096 * i:4096 * (i + 1)]
        # the thread back asleep with kicks re-armed: a read submitted while
        # it finishes a pass has its kick coalesced with the next (one count)
        barrier(fr.loop)
    assert handled_in_c(fr.loop) - handled0 == 5     # no Python handler ran
    assert fr.dev.stats["kicks"] - stats0["kicks"] == 5
    assert fr.dev.stats["requests"] - stats0["requests"] == 5
    assert fr.t.interrupts - irqs0 == 5
    # the ISR bit the C side raised reads through the transport, and acks
    assert fr.t.read(m.INTERRUPT_STATUS, 4) & vd.INT_USED
    fr.t.write(m.INTERRUPT_ACK, 4, vd.INT_USED)
    assert fr.t.read(m.INTERRUPT_STATUS, 4) == 0


def test_writes_and_budget_requeue(fr, image):
    settle(fr)
    fr.dev.budget = 3
    payload = os.urandom(512)
    base = fr.d.queues[0].used_idx           # settle() may have read more than once
    reqs = [fr.d.submit(T_OUT, 100 + i, data=payload) for i in range(20)]
    fr.kick()
    deadline = time.monotonic() + SLOW
    while fr.d.queues[0].used_idx < base + 20 and time.monotonic() < deadline:
        fr.wait_irq(0.2)
    assert all(fr.d.result(q)[0] == S_OK for q in reqs)
    assert fr.dev.stats["kicks"] >= 1 + 7          # ceil(20 / 3) calls at least
    with open(image, "rb") as f:
        f.seek(512 * 100)
        assert f.read(512 * 20) == payload * 20


def test_pause_parks_the_c_wait(fr):
    settle(fr)
    fr.loop.pause()
    used = fr.d.queues[0].used_idx
    req = fr.d.submit(T_IN, 8, read_len=512)
    fr.kick()
    assert not fr.wait_irq(0.3), "a paused I/O loop completed a request"
    assert fr.d.queues[0].used_idx == used
    fr.loop.resume()
    assert fr.wait_irq()
    assert fr.d.result(req) == (S_OK, fr.disk[4096:4608])


def _thread_cpu(loop):
    tid = loop._thread.native_id
    with open(f"/proc/self/task/{tid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_device_sleeps(fr):
    settle(fr)
    cpu0 = _thread_cpu(fr.loop)
    time.sleep(1.0)
    assert _thread_cpu(fr.loop) - cpu0 < 0.1          # asleep in epoll_wait, not spinning


def test_idle_device_sleeps_with_polling(fr):
    fr.t._fast.set_poll_us(200)
    settle(fr)
    cpu0 = _thread_cpu(fr.loop)
    time.sleep(1.0)
    assert _thread_cpu(fr.loop) - cpu0 < 0.1          # polls 200 us after work, then sleeps
    assert fr.read(8)[0] == S_OK


def test_malformed_ring_sets_needs_reset(fr):
    settle(fr)
    q = fr.d.queues[0]
    q.put_avail(q.size + 3)                            # head index out of the table
    fr.kick()
    assert fr.wait_irq()                               # the configuration interrupt
    assert until(lambda: fr.t.status & vd.DEVICE_NEEDS_RESET)
    assert not fr.t._fast.enabled(0)
    # the driver resets and starts over: the fast path is back
    assert fr.d.init()
    assert fr.t._fast.enabled(0)
    assert fr.read(0)[0] == S_OK


def test_slow_path_takes_over_and_gives_back(fr):
    settle(fr)
    assert fr.t._fast.enabled(0)
    seen = []

    class Hook:
        def blk_request(self, req):
            seen.append(req)
    fr.dev.configure(hook=Hook())
    assert not fr.t._fast.enabled(0)                   # hooks need Python per request
    assert fr.read(16)[0] == S_OK and len(seen) == 1
    fr.dev.configure(hook=None)
    assert fr.t._fast.enabled(0)
    handled = fr.loop.fast_counts[1]
    assert fr.read(24)[0] == S_OK and len(seen) == 1
    assert handled_in_c(fr.loop) == handled + 1


def test_notify_from_another_thread_is_serialized(fr):
    """Transport.notify() (a vCPU without ioeventfd, the API thread, restart())
    runs the queue in Python while the C side is kept off it."""
    settle(fr)
    fr.dev.budget = 2
    base = fr.d.queues[0].used_idx
    reqs = [fr.d.submit(T_IN, i, read_len=512, indirect=True) for i in range(200)]
    ths = [threading.Thread(target=fr.t.notify, args=(0,)) for _ in range(3)]
    fr.kick()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    deadline = time.monotonic() + SLOW
    while fr.d.queues[0].used_idx < base + 200 and time.monotonic() < deadline:
        fr.wait_irq(0.1)
    used = fr.d.queues[0].get_used()
    assert len(used) == 200 and len({u[0] for u in used}) == 200     # each exactly once
    for i, req in enumerate(reqs):
        assert fr.d.result(req) == (S_OK, fr.disk[512 * i:512 * (i + 1)])
    assert fr.t._fast.enabled(0)


def test_reset_disables_until_driver_ok(fr):
    settle(fr)
    fr.t.write(m.STATUS, 4, 0)
    assert not fr.t._fast.enabled(0)
    assert fr.d.init()
    assert fr.t._fast.enabled(0) and fr.read(0)[0] == S_OK


def test_stats_read_from_other_threads_count_each_request_once(fr):
    """dev.stats folds in the C side's counts on every read; readers on
    other threads (metrics, the API) at the same time as each other used to
    fold the same counts twice (here: ~20% too many requests)."""
    import sys
    settle(fr)
    fr.t._fast.set_poll_us(0)       # one kick per read (polling would take some without)
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            fr.dev.stats
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)            # switch threads as often as possible
    ths = [threading.Thread(target=reader) for _ in range(3)]
    try:
        for th in ths:
            th.start()
        for i in range(600):
            assert fr.read(8 * (i % 64), 512)[0] == S_OK
    finally:
        stop.set()
        for th in ths:
            th.join()
        sys.setswitchinterval(old)
    barrier(fr.loop)
    done = fr.d.queues[0].used_idx              # every request completed so far
    st = fr.dev.stats
    # One kick per read at most: the device re-arms kicks (EVENT_IDX) only
    # before it sleeps, so a read submitted while it is still finishing a
    # pass is found without one (a loaded host: 579 kicks for 601 reads).
    # Counted twice, both would run past `done` (the bug: ~20 % too many).
    assert st["requests"] == done and 0 < st["kicks"] <= done
