"""The C fast path on modern virtio-pci with MSI-X (vmm/virtio/pci_modern.py,
vmm/virtio/fastpath.py per-queue interrupts): a kick is served in C and the
message goes out on the queue's vector's irqfd; a masked vector (its own
mask, the Function Mask, MSI-X off) or NO_VECTOR takes the queue back to
Python, which sets the pending bit instead, and unmasking delivers it."""
import os
import select

import pytest

from vmm.testing.fakevm import FakeVm
from vmm.testing.mockdriver import BlkDriver, T_IN
from vmm.testing.pcimodern_regs import PciModernRegs
from vmm.virtio import pci_modern as pm
from vmm.virtio.blk import BlkDevice, S_OK
from vmm.virtio.ioloop import IoLoop, drain_eventfd, signal_eventfd
from vmm.virtio.pci_modern import VirtioPciModern
from vmm.testing.waiting import SLOW, barrier, until
from test_fastpath import handled_in_c, settle

VEC = 1           # PciModernRegs(msix=True): queue 0 is vector 1


class PciFastRig:
    def __init__(self, mem, image, io_engine="sync"):
        self.loop = IoLoop()
        self.loop.start()
        self.dev = BlkDevice(image, io_engine=io_engine, ioloop=self.loop)
        self.t = VirtioPciModern(self.dev, mem, vm=FakeVm(), ioloop=self.loop,
                                 ioeventfd=lambda *a, **k: None)
        self.d = BlkDriver(self.t, mem, regs=lambda t: PciModernRegs(t, msix=True))
        assert self.d.init()
        self.kick_fd = self.t.notify_fds[0]
        self.vec_fd = self.t.msix._fds[VEC]
        self.disk = open(image, "rb").read()
        self.table = self.t.pci.bars[pm.BAR_MODERN].handler

    def irq(self, timeout=SLOW):
        ok = bool(select.select([self.vec_fd], [], [], timeout)[0])
        if ok:
            drain_eventfd(self.vec_fd)
        return ok

    def submit_kick(self, sector):
        req = self.d.submit(T_IN, sector, read_len=4096)
        signal_eventfd(self.kick_fd)            # what KVM's ioeventfd does
        return req

    def done(self, req):
        status, data = self.d.result(req)
        self.d.queues[0].get_used()
        return status, data

    def wait_used(self, n, timeout=SLOW):
        """Until the device has used `n` more chains (no interrupt needed)."""
        q = self.d.queues[0]
        return bool(until(lambda: (q.used_idx - q.last_used) & 0xFFFF >= n, timeout))

    def read(self, sector):
        req = self.submit_kick(sector)
        assert self.irq(), "no MSI-X message from the I/O thread"
        return self.done(req)

    def mask(self, masked):
        self.table.write(pm.MSIX_TABLE + 16 * VEC + 12, 4, int(masked))

    def close(self):
        self.t.close()
        self.loop.close()


@pytest.fixture
def pr(mem, image):
    r = PciFastRig(mem, image)
    yield r
    r.close()


def test_kicks_run_in_c_and_signal_the_vector(pr):
    assert pr.t._fast is not None and pr.t._fast.enabled(0)
    pr.t._fast.set_poll_us(0)       # one kick per read (polling would take some without)
    handled0, irqs0 = settle(pr), pr.t.interrupts
    for i in range(5):
        status, data = pr.read(8 * i)
        assert status == S_OK and data == pr.disk[4096 * i:4096 * (i + 1)]
        # the thread back asleep with kicks re-armed: a read submitted while
        # it finishes a pass has its kick coalesced with the next (one count)
        barrier(pr.loop)
    assert handled_in_c(pr.loop) - handled0 == 5     # no Python handler ran
    assert pr.t.interrupts - irqs0 == 5
    assert pr.t.interrupt_status == 0                      # MSI-X: no ISR bit (§4.1.4.5)


def test_masked_vector_goes_pending_and_is_sent_on_unmask(pr):
    handled0 = settle(pr)
    pr.mask(True)
    assert not pr.t._fast.enabled(0)
    req = pr.submit_kick(8)
    assert pr.wait_used(1)
    barrier(pr.loop)                                       # its interrupt is decided
    assert not pr.irq(0.2), "a message went out on a masked vector"
    assert pr.t.msix.pending[VEC]
    assert pr.loop.fast_counts[1] == handled0              # Python served it
    pr.mask(False)                                         # §6.8.2.9: pending is sent
    assert pr.irq() and not pr.t.msix.pending[VEC]
    assert pr.done(req) == (S_OK, pr.disk[4096:8192])
    assert pr.t._fast.enabled(0)
    assert pr.read(16)[0] == S_OK


def test_function_mask_and_msix_off_take_the_queue_back(pr):
    pr.read(0)
    ctrl = pr.t.msix.cap + 2
    c = pr.t.pci.read_config(ctrl, 2)
    pr.t.pci.write_config(ctrl, 2, c | 0x4000)             # Function Mask
    assert not pr.t._fast.enabled(0)
    req = pr.submit_kick(8)
    assert pr.wait_used(1)
    barrier(pr.loop)                                        # its interrupt is decided
    assert not pr.irq(0.2)
    pr.t.pci.write_config(ctrl, 2, c)                       # unmasked: pending sent
    assert pr.irq() and pr.done(req)[0] == S_OK
    assert pr.t._fast.enabled(0)
    pr.t.pci.write_config(ctrl, 2, c & ~0x8000)             # MSI-X off: INTx, in Python
    assert not pr.t._fast.enabled(0)


def test_no_vector_means_no_interrupt_and_python(pr):
    pr.read(0)
    pr.d.regs.common("queue_select", 0)
    pr.d.regs.common("queue_msix_vector", pm.NO_VECTOR)
    assert not pr.t._fast.enabled(0)
    req = pr.submit_kick(8)
    assert pr.wait_used(1)
    barrier(pr.loop)                                        # its interrupt is decided
    assert not pr.irq(0.2)
    assert pr.done(req)[0] == S_OK
    pr.d.regs.common("queue_msix_vector", VEC)
    assert pr.t._fast.enabled(0)
    assert pr.read(16)[0] == S_OK


def test_reset_stays_off_and_io_uring_goes_on_the_fast_path(mem, image):
    r = PciFastRig(mem, image)
    try:
        r.read(0)
        r.d.regs.write_status(0)                            # §2.1.1 reset
        assert not r.t._fast.enabled(0)
    finally:
        r.close()
    from vmm.virtio import blk_uring
    if not blk_uring.available()[0]:
        return
    r = PciFastRig(mem, image, io_engine="io_uring")
    try:
        assert r.t._fast is not None and r.t._fast.enabled(0)   # native/src/fasturing.c
        handled0 = settle(r)
        for i in range(3):
            assert r.read(8 * i) == (S_OK, r.disk[4096 * i:4096 * (i + 1)])
        assert handled_in_c(r.loop) >= handled0 + 3
    finally:
        r.close()


def test_no_vm_no_fast_path(mem, image):
    loop = IoLoop()
    try:
        t = VirtioPciModern(BlkDevice(image), mem, ioloop=loop, ioeventfd=lambda *a, **k: None)
        assert t._fast is None
        t.close()
    finally:
        loop.close()
    assert os.path.exists(image)


def test_snapshot_restore_goes_back_on_the_fast_path(mem, image):
    """state() of a transport whose queue is served in C, restored into a
    fresh transport, loop and (fake) VM: the queue is on the C path again
    with the new vector irqfd, and requests complete with their message."""
    from vmm import snapshot as S
    r = PciFastRig(mem, image)
    try:
        assert r.read(0)[0] == S_OK
        r.loop.pause()
        st = S.unpack_state(S.pack_state({"arch": S.ARCH, "x": r.t.state()}))["x"]
        r.loop.resume()
    finally:
        r.close()
    loop = IoLoop()
    loop.start()
    t2 = VirtioPciModern(BlkDevice(image), mem, vm=FakeVm(), ioloop=loop,
                         ioeventfd=lambda *a, **k: None)
    try:
        t2.restore(st)
        t2.restart()
        assert t2._fast.enabled(0)
        r.d.t, r.d.regs = t2, PciModernRegs(t2, msix=True)
        r.t, r.loop, r.kick_fd, r.vec_fd = t2, loop, t2.notify_fds[0], t2.msix._fds[VEC]
        drain_eventfd(r.vec_fd)                 # restart() may re-send what was pending
        for i in range(3):
            status, data = r.read(8 * (i + 1))
            assert status == S_OK and data == r.disk[4096 * (i + 1):4096 * (i + 2)]
        assert handled_in_c(loop) >= 2
    finally:
        t2.close()
        loop.close()
