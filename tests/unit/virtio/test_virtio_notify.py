"""Notifications (virtio 1.1 §2.6.7): EVENT_IDX on and off, batching, the
interrupt eventfd, and the ioeventfd path through the epoll I/O thread."""
import os
import random
import select
import shutil
import threading

import pytest

from vmm.virtio import device as vd
from vmm.virtio import mmio as m
from vmm.virtio.ioloop import IoLoop, drain_eventfd, signal_eventfd
from vmm.testing.mockdriver import BlkDriver, T_IN, T_OUT
from vmm.testing.waiting import barrier
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.blk import BlkDevice

from virtio_rig import Rig

NO_EVENT_IDX = ~(1 << vd.VIRTIO_F_RING_EVENT_IDX)


def test_event_idx_suppresses_interrupts(rig):
    r = rig()
    q = r.d.queues[0]
    assert q.event_idx
    q.auto_used_event = False
    r.d.run(T_IN, 0, read_len=512)                 # first completion always signals
    n = r.t.interrupts
    assert n == 1
    q.set_used_event(10)                           # "interrupt me when used.idx passes 10"
    for i in range(9):                             # used.idx 1 -> 10: no interrupt
        r.d.run(T_IN, i, read_len=512)
    assert r.t.interrupts == n
    r.d.run(T_IN, 0, read_len=512)                 # 10 -> 11 crosses used_event
    assert r.t.interrupts == n + 1
    # the device asks to be kicked for the next entry: avail_event == last_avail
    assert q.avail_event == q.avail_idx == 11


def test_event_idx_batch_crossing(rig):
    r = rig()
    q = r.d.queues[0]
    q.auto_used_event = False
    r.d.run(T_IN, 0, read_len=512)
    q.set_used_event(3)
    reqs = [r.d.submit(T_IN, i, read_len=512) for i in range(5)]   # used 1 -> 6 in one batch
    r.d.kick()
    assert len(q.get_used()) == len(reqs)
    assert r.t.interrupts == 2


def test_no_event_idx_interrupt_flag(rig):
    r = rig(features=NO_EVENT_IDX)
    q = r.d.queues[0]
    assert not q.event_idx and not r.dev.has(vd.VIRTIO_F_RING_EVENT_IDX)
    for _ in range(3):
        r.d.run(T_IN, 0, read_len=512)
    assert r.t.interrupts == 3
    q.set_no_interrupt(True)                       # §2.6.7.2 VIRTQ_AVAIL_F_NO_INTERRUPT
    r.d.run(T_IN, 0, read_len=512)
    assert r.t.interrupts == 3
    q.set_no_interrupt(False)
    r.d.run(T_IN, 0, read_len=512)
    assert r.t.interrupts == 4
    assert q.avail_event == 0                      # never written without EVENT_IDX


@pytest.mark.parametrize("features", [None, NO_EVENT_IDX], ids=["event_idx", "no_event_idx"])
def test_batch_one_kick_one_interrupt(rig, features):
    r = rig(features=features)
    disk = r.disk()
    reqs = [r.d.submit(T_IN, 2 * i, read_len=1024, split=1 + i % 4, indirect=bool(i % 2))
            for i in range(60)]
    r.d.kick()
    used = dict(r.d.queues[0].get_used())
    assert len(used) == 60 and r.t.interrupts == 1 and r.dev.stats["kicks"] == 1
    for i, req in enumerate(reqs):
        status, data = r.d.result(req)
        assert status == 0 and data == disk[1024 * i:1024 * (i + 1)]
        assert used[req.head] == 1025


def test_ring_wraps(mem, image, native):
    r = Rig(mem, image, native)
    r.d.wr(m.STATUS, 0)
    r.d.reset_arena()
    assert r.d.init(queue_sizes=[8])
    assert r.d.queues[0].size == 8
    for i in range(40):
        payload = bytes([i]) * 512
        assert r.d.run(T_OUT, i, data=payload)[0] == 0
        assert r.d.run(T_IN, i, read_len=512)[1] == payload
        r.d.reset_arena(0x200000)                  # reuse buffer memory
    r.close()


def test_irq_eventfd(mem, image, native):
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    r = Rig(mem, image, native, irq=efd)
    r.d.run(T_IN, 0, read_len=512)
    r.d.run(T_IN, 1, read_len=512)
    assert drain_eventfd(efd) == 2
    assert r.d.ack_interrupt() == vd.INT_USED
    assert r.t.interrupt_status == 0
    r.close()
    os.close(efd)


def test_native_and_python_agree(mem, image, tmp_path):
    """The same random request stream on two copies of an image."""
    copy = str(tmp_path / "copy.img")
    shutil.copy(image, copy)
    rnd = random.Random(7)
    ops = []
    for _ in range(80):
        sector = rnd.randrange(0, 2040)
        n = rnd.choice([512, 1024, 4096])
        if rnd.random() < 0.5:
            ops.append((T_OUT, sector, {"data": rnd.randbytes(n), "split": rnd.randint(1, 5)}))
        else:
            ops.append((T_IN, sector, {"read_len": n, "split": rnd.randint(1, 5),
                                       "indirect": rnd.random() < 0.5}))
    results = []
    for native, path in ((True, image), (False, copy)):
        r = Rig(mem, path, native)
        results.append([r.d.run(t, s, **kw) for t, s, kw in ops])
        r.close()
    assert results[0] == results[1]
    assert open(image, "rb").read() == open(copy, "rb").read()


def test_ioeventfd_through_io_thread(mem, image, native):
    registered = []
    irq = os.eventfd(0, os.EFD_NONBLOCK)
    loop = IoLoop()
    loop.start()
    dev = BlkDevice(image, native=native)
    t = VirtioMmio(dev, mem, irq=irq, ioloop=loop,
                   register_ioeventfd=lambda fd, off, ln, dm: registered.append((fd, off, ln, dm)))
    assert [(off, ln, dm) for _, off, ln, dm in registered] == [(m.QUEUE_NOTIFY, 4, 0)]
    kick_fd = registered[0][0]
    if getattr(t, "_fast", None) is not None:
        t._fast.set_poll_us(0)      # every request kicked (polling could take one without)
    d = BlkDriver(t, mem)
    assert d.init()
    disk = open(image, "rb").read()
    io_threads = []
    real = dev.queue_notify
    dev.queue_notify = lambda i: io_threads.append(threading.current_thread().name) or real(i)
    for rep in range(3):
        req = d.submit(T_IN, rep, read_len=4096)
        signal_eventfd(kick_fd)                    # what KVM does on the guest's QueueNotify write
        assert select.select([irq], [], [], 30)[0], "no interrupt from the I/O thread"
        assert drain_eventfd(irq) == 1
        assert d.result(req) == (0, disk[512 * rep:512 * rep + 4096])
        d.queues[0].get_used()
    barrier(loop)      # C counts a kick after writing its interrupt: the last one may lag
    if native:
        # the C fast path serviced the kicks on the loop's thread, no Python
        # (the first may still meet the thread in Python's poll: it only
        # re-waits in C once it has seen the loop's wake-up)
        assert set(io_threads) <= {loop.name} and loop.fast_counts[1] >= 2
        assert len(io_threads) + loop.fast_counts[1] == 3
        assert dev.stats["kicks"] == 3 and dev.stats["requests"] == 3 and t.interrupts == 3
    else:
        assert io_threads == [loop.name] * 3
    loop.stop()
    assert not loop.running
    t.close()
    loop.close()
    with pytest.raises(OSError):
        os.fstat(kick_fd)                          # the transport closed its eventfd
    os.close(irq)


def test_io_loop_survives_handler_error():
    loop = IoLoop(name="test-io")
    fd1, fd2 = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    seen = threading.Event()

    def bad():
        drain_eventfd(fd1)
        raise RuntimeError("boom")
    loop.add(fd1, bad)
    loop.add(fd2, lambda: (drain_eventfd(fd2), seen.set()))
    with pytest.raises(ValueError):
        loop.add(fd1, bad)
    with loop:
        signal_eventfd(fd1)
        signal_eventfd(fd2)
        assert seen.wait(30)
        assert loop.running
    assert loop.errors == 1 and not loop.running
    os.close(fd1)
    os.close(fd2)


def test_transport_requires_ioloop_for_ioeventfd(mem, image):
    dev = BlkDevice(image)
    with pytest.raises(ValueError, match="ioloop"):
        VirtioMmio(dev, mem, register_ioeventfd=lambda *a: None)
    dev.close()
