"""virtio-net on the I/O loop's C fast path (native/src/fastnet.c,
vmm/virtio/fastpath.py, NetDevice.fast_engine): transmit kicks, a readable
tap and receive kicks served in C on virtio-mmio (irqfd), modern virtio-pci
(MSI-X vector irqfds) and legacy virtio-pci (INTx on a resample irqfd), and everything that goes back to Python
(the slow path, another thread's notify, resets, a malformed ring)."""
import os
import select
import threading

import pytest

from vmm.testing.fakevm import FakeVm
from vmm.testing.mocknet import NetDriver
from vmm.testing.pcimodern_regs import PciModernRegs
from vmm.testing.sockbackend import SockBackend
from vmm.testing.waiting import SLOW, barrier, until
from vmm.virtio import device as vd
from vmm.virtio.ioloop import IoLoop, drain_eventfd, signal_eventfd
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.net import NetDevice
from vmm.virtio.pci_modern import VirtioPciModern

RX, TX = 0, 1
ETH = b"\x02" * 6 + b"\x04" * 6 + b"\x88\xb5"


def frame(i, n=60):
    body = ETH + i.to_bytes(4, "little")
    return body + bytes(n - len(body))


class NetFastRig:
    def __init__(self, mem, transport):
        self.loop = IoLoop()
        self.loop.start()
        self.backend = SockBackend()
        self.dev = NetDevice(self.backend, ioloop=self.loop)
        self.msix = transport == "pci-modern"
        self.line = None
        if transport == "pci-intx":
            from vmm.pci.intx_irqfd import IrqfdIntx
            from vmm.testing.kvmintx import KvmIntx
            from vmm.virtio.pci_legacy import VirtioPciLegacy
            intx = IrqfdIntx()
            self.t = VirtioPciLegacy(self.dev, mem, ioloop=self.loop, intx=intx,
                                     ioeventfd=lambda *a, **k: None)
            self.line = KvmIntx(intx)
            regs = None
            self.irq_fds = [intx.trigger_fd, intx.trigger_fd]
        elif self.msix:
            self.t = VirtioPciModern(self.dev, mem, vm=FakeVm(), ioloop=self.loop,
                                     ioeventfd=lambda *a, **k: None)
            regs = lambda t: PciModernRegs(t, msix=True)     # noqa: E731
            # PciModernRegs(msix=True): queue n's vector is n + 1
            self.irq_fds = [self.t.msix._fds[1 + RX], self.t.msix._fds[1 + TX]]
        else:
            self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.t = VirtioMmio(self.dev, mem, irq=self.irq, ioloop=self.loop,
                                register_ioeventfd=lambda *a: None)
            regs = None
            self.irq_fds = [self.irq, self.irq]
        self.d = NetDriver(self.t, mem, arena_size=12 << 20, regs=regs)
        assert self.d.init()
        self.kick_fds = self.t.notify_fds
        self.got_irqs = 0
        self.done = self._want = 0
        # the thread may still be in Python's poll, where it waited before
        # the fast queues existed: once it has run a call it waits in C
        barrier(self.loop)

    def kick(self, index):
        signal_eventfd(self.kick_fds[index])        # what KVM's ioeventfd does

    def wait_irq(self, index, timeout=SLOW):
        fd = self.irq_fds[index]
        ok = bool(select.select([fd], [], [], timeout)[0])
        if ok:
            self.got_irqs += drain_eventfd(fd)
            if self.line is not None:   # the handler's ISR read, then KVM's EOI
                self.d.ack_interrupt()
                self.line.eoi()
        return ok

    def fast(self, index):
        return self.t._fast.enabled(index)

    def sent_until(self, n, timeout=SLOW):
        """Until `n` more transmit chains came back used (get_used consumes)."""
        self.done += len(self.d.sent())
        ok = until(lambda: (setattr(self, "done", self.done + len(self.d.sent()))
                            or self.done >= self._want + n), timeout)
        self._want += n
        return ok

    def send(self, frames):
        for f in frames:
            self.d.send(f, kick=False)
        self.kick(TX)

    def close(self):
        self.t.close()
        self.loop.close()
        if not self.msix and self.line is None:
            os.close(self.irq)


@pytest.fixture(params=["mmio", "pci-modern", "pci-intx"])
def nr(request, mem):
    r = NetFastRig(mem, request.param)
    yield r
    r.close()


def test_queues_and_tap_go_fast(nr):
    fp = nr.t._fast
    assert fp is not None and nr.fast(RX) and nr.fast(TX)
    tap = nr.dev._pairs[0].tap_index
    assert tap is not None and fp.enabled(tap)
    assert nr.dev.polling


def test_tx_in_c_frames_counters_interrupts(nr):
    before = nr.loop.fast_counts[1]
    irqs0 = nr.t.interrupts
    sent = [frame(i) for i in range(40)]
    nr.send(sent)
    assert nr.sent_until(40)
    assert nr.wait_irq(TX)
    barrier(nr.loop)
    nr.got_irqs += drain_eventfd(nr.irq_fds[TX])     # one raised after the first look
    got = [f[12:] for f in nr.backend.peer_frames()]
    assert got == sent
    st = nr.dev.stats
    assert st["tx_packets"] == 40 and st["tx_bytes"] == 40 * 60
    assert nr.loop.fast_counts[1] > before            # served in C
    assert nr.dev.kicks[TX] >= 1
    assert nr.t.interrupts - irqs0 == nr.got_irqs      # each counted one is on the fd


def test_rx_in_c_then_out_of_buffers_then_kick(nr):
    for _ in range(3):
        nr.d.add_rx(1526)
    nr.kick(RX)
    frames = [frame(i) for i in range(8)]
    for f in frames:
        nr.backend.peer.send(bytes(12) + f)
    got = []
    assert until(lambda: got.extend(nr.d.received(mrg=True)) or len(got) >= 3)
    assert [p for _, p in got] == frames[:3]
    # out of buffers: the tap left epoll (C), frames wait in the backend
    assert until(lambda: not nr.dev.polling)
    barrier(nr.loop)
    assert nr.dev.stats["rx_packets"] == 3 and nr.dev._pairs[0].fnet.tap_off
    for _ in range(10):
        nr.d.add_rx(1526)
    nr.kick(RX)                       # buffers came: C delivers and watches the tap again
    assert until(lambda: got.extend(nr.d.received(mrg=True)) or len(got) >= 8)
    assert [p for _, p in got] == frames
    assert until(lambda: nr.dev.polling)
    nr.backend.peer.send(bytes(12) + frame(99))      # now read on the tap's wake-up
    assert until(lambda: got.extend(nr.d.received(mrg=True)) or len(got) >= 9)
    assert got[-1][1] == frame(99)
    assert nr.fast(RX) and nr.dev.stats["rx_packets"] == 9
    assert nr.wait_irq(RX)


def test_rx_mrg_rxbuf_frame_spread_in_c(nr):
    big = bytes(range(256)) * 12                    # 3072 bytes: three 1526-byte buffers
    for _ in range(2):
        nr.d.add_rx(1526)
    nr.kick(RX)
    nr.backend.peer.send(bytes(12) + big)
    assert until(lambda: not nr.dev.polling)        # held for buffers
    barrier(nr.loop)
    assert nr.dev._pairs[0].net.pending
    for _ in range(2):
        nr.d.add_rx(1526)
    nr.kick(RX)
    got = []
    assert until(lambda: got.extend(nr.d.received(mrg=True)) or got)
    assert got[0][1] == big and nr.dev.stats["rx_packets"] == 1


def test_budget_requeues_tx(nr):
    nr.dev._net.budget = 8
    sent = [frame(i) for i in range(50)]
    nr.send(sent)
    assert nr.sent_until(50)
    barrier(nr.loop)
    assert [f[12:] for f in nr.backend.peer_frames()] == sent


def test_slow_path_takes_over_and_gives_back(nr):
    from vmm.virtio.ratelimit import RateLimiter, TokenBucket
    nr.dev.configure(tx_limiter=RateLimiter(bandwidth=TokenBucket(1 << 30, 1000)))
    assert not nr.fast(TX) and not nr.fast(RX)
    sent = [frame(i) for i in range(5)]
    nr.send(sent)
    assert nr.sent_until(5)
    barrier(nr.loop)
    assert [f[12:] for f in nr.backend.peer_frames()] == sent
    nr.dev.configure(tx_limiter=None)
    assert nr.fast(TX) and nr.fast(RX)
    nr.send([frame(7)])
    assert nr.sent_until(1)
    barrier(nr.loop)
    assert [f[12:] for f in nr.backend.peer_frames()] == [frame(7)]


def test_notify_from_another_thread_is_serialized(nr):
    """A vCPU thread's notify (no ioeventfd) while C serves eventfd kicks:
    every frame goes out once, in order."""
    n = 400
    sent = [frame(i) for i in range(n)]
    stop = threading.Event()

    def vcpu():
        while not stop.is_set():
            nr.t.notify(TX)

    th = threading.Thread(target=vcpu)
    th.start()
    try:
        for i in range(0, n, 20):
            nr.send(sent[i:i + 20])
            assert nr.sent_until(20)        # (the driver's descriptors back)
    finally:
        stop.set()
        th.join()
    barrier(nr.loop)
    assert [f[12:] for f in nr.backend.peer_frames()] == sent
    assert nr.dev.stats["tx_packets"] == n
    assert nr.fast(TX)


def test_kicks_exact_while_read_from_another_thread(nr):
    """Counting C's kicks into dev.kicks is done under a lock: a reader
    thread folding them concurrently must not count any twice."""
    stop = threading.Event()

    def reader():
        while not stop.is_set():
            nr.dev.kicks
            nr.dev.stats

    th = threading.Thread(target=reader)
    th.start()
    k0 = nr.dev.kicks[TX]
    try:
        for i in range(60):
            nr.d.send(frame(i), kick=False)
            nr.kick(TX)
            assert nr.sent_until(1)    # the kick was drained before the frame went

    finally:
        stop.set()
        th.join()
    assert nr.dev.kicks[TX] - k0 == 60
    assert nr.dev.stats["tx_packets"] == 60


def test_hold_while_busy_stops_c_between_passes(nr):
    """fast_hold (what configure and MSI-X changes use) while C is
    transmitting: C stops, Python may look at the ring, and everything
    is transmitted once in the end."""
    nr.dev._net.budget = 4
    n = 200
    sent = [frame(i) for i in range(n)]
    for f in sent:
        nr.d.send(f, kick=False)
    nr.kick(TX)
    for _ in range(20):
        with nr.t.fast_hold():
            assert not nr.fast(TX)
            vq = nr.dev._pairs[0].tx.vq
            assert (vq.used_idx - 0) & 0xFFFF <= n
    assert nr.sent_until(n)
    barrier(nr.loop)
    assert [f[12:] for f in nr.backend.peer_frames()] == sent
    assert nr.fast(TX)


def test_malformed_ring_sets_needs_reset(nr):
    # a transmit chain with a device-writable descriptor (§5.1.6.2)
    q = nr.d.queues[TX]
    gpa = nr.d.alloc(64, 16)
    q.add([(gpa, 64, True)])
    nr.kick(TX)
    assert until(lambda: nr.t.status & vd.DEVICE_NEEDS_RESET)
    assert not nr.fast(TX) and not nr.fast(RX)


def test_reset_disables_until_driver_ok(nr, mem):
    nr.t.reset()
    fp = nr.t._fast
    assert not any(fp.enabled(i) for i in range(len(fp._q)))
    assert nr.d.init()
    assert nr.fast(TX) and nr.fast(RX)
    nr.send([frame(1)])
    assert nr.sent_until(1)


def test_multiqueue_pairs_go_fast_when_the_driver_turns_them_on(mem):
    """VQ_PAIRS_SET (control queue, Python) re-decides: a pair turned on is
    served in C on its own tap queue and vector; turned off, it is not."""
    import struct
    from test_virtio_net_mq import MqBackend
    from vmm.virtio import net_ctrl as nc
    loop = IoLoop()
    loop.start()
    backend = MqBackend(3)
    dev = NetDevice(backend, queue_pairs=3, ioloop=loop)
    t = VirtioPciModern(dev, mem, vm=FakeVm(), ioloop=loop, ioeventfd=lambda *a, **k: None)
    try:
        d = NetDriver(t, mem, arena_size=12 << 20, regs=lambda t: PciModernRegs(t, msix=True))
        assert d.init()
        fp = t._fast
        assert fp.enabled(0) and fp.enabled(1) and not fp.enabled(4) and not fp.enabled(5)
        assert not fp.enabled(6)                         # the control queue: Python
        assert d.control(6, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, struct.pack("<H", 3)) == nc.OK
        assert all(fp.enabled(i) for i in range(6)) and fp.enabled(dev._pairs[2].tap_index)
        barrier(loop)
        d.send(b"\x01" * 60, pair=2, kick=False)
        signal_eventfd(t.notify_fds[5])
        assert until(lambda: backend.queues[2].peer_frames() or None) == [bytes(12) + b"\x01" * 60]
        d.add_rx(2048, pair=2)
        signal_eventfd(t.notify_fds[4])
        backend.queues[2].peer.send(bytes(12) + b"\x02" * 70)
        got = []
        assert until(lambda: got.extend(d.received(pair=2)) or got)
        assert [f for _, f in got] == [b"\x02" * 70]
        assert loop.fast_counts[1] >= 2 and dev.kicks[5] >= 1
        assert d.control(6, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == nc.OK
        assert fp.enabled(0) and not any(fp.enabled(i) for i in range(2, 6))
        assert not fp.enabled(dev._pairs[2].tap_index)
    finally:
        t.close()
        loop.close()
