"""Legacy virtio-pci with its INTx on a resample irqfd (vmm/virtio/pci_intx.py,
vmm/pci/intx_irqfd.py): kicks served by the C fast path raise the line
through the trigger eventfd; the driver's ISR read clears the bits and the
line drops at the EOI; a resample with bits left re-asserts it; Interrupt
Disable keeps it low and the queues in Python; reset lowers it; snapshots
carry it.  KVM's part is played by vmm/testing/kvmintx.py."""
import os

import pytest

from vmm.pci import device as pd
from vmm.pci.intx_irqfd import IrqfdIntx
from vmm.testing.kvmintx import KvmIntx
from vmm.testing.mockdriver import BlkDriver, T_IN
from vmm.testing.waiting import SLOW, barrier
from vmm.virtio import device as vd
from vmm.virtio import pci_legacy as pl
from vmm.virtio.blk import BlkDevice, S_OK
from vmm.virtio.ioloop import IoLoop, signal_eventfd
from vmm.virtio.pci_legacy import VirtioPciLegacy
from test_fastpath import handled_in_c


class IntxRig:
    def __init__(self, mem, image, register=None):
        self.mem, self.image = mem, image
        self.loop = IoLoop()
        self.loop.start()
        self.dev = BlkDevice(image)
        self.intx = IrqfdIntx(register)
        self.t = VirtioPciLegacy(self.dev, mem, ioloop=self.loop,
                                 ioeventfd=lambda *a, **k: None, intx=self.intx)
        self.line = KvmIntx(self.intx)
        self.d = BlkDriver(self.t, mem)
        assert self.d.init()
        self.kick_fd = self.t.notify_fds[0]
        self.disk = open(image, "rb").read()

    def submit_kick(self, sector):
        req = self.d.submit(T_IN, sector, read_len=4096)
        signal_eventfd(self.kick_fd)            # what KVM's ioeventfd does
        return req

    def done(self, req):
        """The request's status; the driver harvests the used ring (with
        EVENT_IDX the next interrupt waits for that)."""
        status, _data = self.d.result(req)
        self.d.queues[0].get_used()
        return status

    def read(self, sector):
        """One request through the whole path, as a guest: kick, interrupt,
        the handler's ISR read, EOI."""
        req = self.submit_kick(sector)
        assert self.line.wait(SLOW), "no INTx from the I/O thread"
        assert self.d.ack_interrupt() & vd.INT_USED
        self.line.eoi()
        status, data = self.d.result(req)
        self.d.queues[0].get_used()
        return status, data

    def quiet(self):
        """No assertion pending once the I/O thread is idle (its resample
        handler has run): the line stayed low."""
        barrier(self.loop)
        return not self.line.pending()

    def close(self):
        self.t.close()
        self.loop.close()


def settle(r, tries=5):
    """Read until a read's kick and its EOI's resample are both seen served
    in C (test_fastpath.settle's reasoning: the first may meet the thread
    in Python's poll); returns the C count then."""
    for _ in range(tries):
        before = r.loop.fast_counts[1]
        assert r.read(0)[0] == S_OK
        if handled_in_c(r.loop) == before + 2:
            return before + 2
    raise AssertionError("no kick and resample were served in C")


@pytest.fixture
def ir(mem, image):
    r = IntxRig(mem, image)
    r.t._fast.set_poll_us(0)            # one kick per read
    yield r
    r.close()


def test_kicks_and_resamples_run_in_c_and_raise_intx(ir):
    assert ir.t._fast is not None and ir.t._fast.enabled(0)
    handled0 = settle(ir)
    py_resamples, c_resamples = ir.intx.resamples, ir.t._intx_rq.kicks
    for i in range(5):
        status, data = ir.read(8 * i)
        assert status == S_OK and data == ir.disk[4096 * i:4096 * (i + 1)]
        # the thread back asleep with kicks re-armed: a read submitted while
        # it finishes a pass has its kick coalesced with the next (one count)
        barrier(ir.loop)
    # five kicks and five EOIs' resamples, no Python handler
    assert handled_in_c(ir.loop) - handled0 == 10
    assert ir.intx.resamples == py_resamples and ir.t._intx_rq.kicks == c_resamples + 5
    assert ir.quiet()
    assert ir.t.interrupt_status == 0


def test_isr_read_clears_and_the_line_drops_at_eoi(ir):
    settle(ir)
    assert ir.quiet()
    triggers = ir.intx.triggers
    req = ir.submit_kick(8)
    assert ir.line.wait(SLOW)
    # PCI status bit 3 shows the request the C side raised
    assert ir.t.pci.read_config(pd.STATUS, 2) & pd.STATUS_INTERRUPT
    assert ir.t.read(pl.ISR, 1) == vd.INT_USED          # the read acknowledges
    assert ir.t.read(pl.ISR, 1) == 0
    assert not ir.t.pci.read_config(pd.STATUS, 2) & pd.STATUS_INTERRUPT
    ir.line.eoi()
    assert ir.quiet()                                  # not raised again
    assert ir.intx.triggers == triggers               # (the C side wrote the fd itself)
    assert ir.done(req) == S_OK


def test_resample_reasserts_while_bits_remain(ir):
    settle(ir)
    req = ir.submit_kick(16)
    assert ir.line.wait(SLOW)
    resamples, in_c = ir.t.intx_resamples, ir.t._intx_rq.kicks
    for k in range(3):              # handler without an ISR read: EOI, line back up
        if k == 1:
            # Python takes the bit out of the C side's word (as a raise on
            # the Python path does): the C resample must see it held there
            assert ir.t.interrupt_status == vd.INT_USED and ir.t._fast.irq.isr == 0
        ir.line.eoi()
        assert ir.line.wait(SLOW), "resample with ISR bits left did not re-assert"
    assert ir.t.intx_resamples == resamples + 3
    assert ir.t._intx_rq.kicks == in_c + 3              # all three in C
    assert ir.d.ack_interrupt() == vd.INT_USED
    ir.line.eoi()
    assert ir.quiet()
    assert ir.done(req) == S_OK


def test_interrupt_disable_keeps_the_line_low(ir):
    settle(ir)
    lowered = ir.intx.lowered
    cmd = ir.t.pci.get(pd.COMMAND, 2)
    # the line is up (not acknowledged) when the driver disables INTx
    req = ir.submit_kick(24)
    assert ir.line.wait(SLOW)
    ir.t.pci.write_config(pd.COMMAND, 2, cmd | pd.CMD_INTX_DISABLE)
    assert ir.intx.lowered == lowered + 1              # forced low at once
    assert not ir.t._fast.enabled(0)                   # the C side may not raise it
    assert ir.d.ack_interrupt() == vd.INT_USED
    assert ir.done(req) == S_OK
    ir.line.eoi()
    # a request completes (in Python), its ISR bit is set, the line stays low
    req = ir.submit_kick(32)
    barrier(ir.loop)
    assert ir.done(req) == S_OK
    assert not ir.line.pending()
    assert ir.t.interrupt_status & vd.INT_USED
    ir.line.eoi()                                      # a stray resample: still low
    assert ir.quiet()
    # enabled again: the pending ISR raises the line, queues back in C
    ir.t.pci.write_config(pd.COMMAND, 2, cmd)
    assert ir.line.wait(SLOW)
    assert ir.t._fast.enabled(0)
    assert ir.d.ack_interrupt() == vd.INT_USED
    ir.line.eoi()
    assert ir.quiet()
    assert ir.read(40)[0] == S_OK


def test_reset_lowers_a_raised_line(ir):
    settle(ir)
    ir.submit_kick(8)
    assert ir.line.wait(SLOW)                          # up, not acknowledged
    lowered = ir.intx.lowered
    ir.t.write(pl.STATUS, 1, 0)
    assert ir.intx.lowered == lowered + 1
    assert ir.t.interrupt_status == 0 and not ir.t.activated
    ir.line.eoi()
    assert ir.quiet()
    # a reset with the line known low (resampled since) does not re-bind
    assert ir.d.init()
    ir.t.write(pl.STATUS, 1, 0)
    assert ir.intx.lowered == lowered + 1


def test_resample_irqfd_registered_and_rebound_on_lower(mem, image):
    calls = []
    r = IntxRig(mem, image, register=lambda t, s, deassign=False: calls.append((t, s, deassign)))
    try:
        fds = (r.intx.trigger_fd, r.intx.resample_fd)
        assert calls == [fds + (False,)]
        r.t.pci.write_config(pd.COMMAND, 2, r.t.pci.get(pd.COMMAND, 2) | pd.CMD_INTX_DISABLE)
        assert calls == [fds + (False,), fds + (True,), fds + (False,)]
    finally:
        r.close()


def test_snapshot_round_trip_of_the_line(mem, image):
    a = IntxRig(mem, image)
    try:
        a.t._fast.set_poll_us(0)
        settle(a)
        req = a.submit_kick(8)
        assert a.line.wait(SLOW)                       # raised by C, not yet read
        assert a.done(req) == S_OK
        a.loop.pause()
        st = a.t.state()
        assert st["intx"] == 1 and st["interrupt_status"] == vd.INT_USED
        a.loop.resume()
        assert a.d.ack_interrupt() == vd.INT_USED
        a.line.eoi()
        assert a.quiet()
        assert a.t.state()["intx"] == 0
    finally:
        a.close()
    # restored into a fresh transport (as `pyvmm restore` builds it): line up again
    b = IntxRig.__new__(IntxRig)
    b.loop = IoLoop()
    b.loop.start()
    b.intx = IrqfdIntx()
    b.t = VirtioPciLegacy(BlkDevice(image), mem, ioloop=b.loop,
                          ioeventfd=lambda *a, **k: None, intx=b.intx)
    b.line = KvmIntx(b.intx)
    try:
        b.t.restore(st)
        b.t.restart()
        assert b.line.wait(SLOW)
        assert b.t._fast.enabled(0)
        assert b.t.read(pl.ISR, 1) == vd.INT_USED
        b.line.eoi()
        assert b.quiet()
    finally:
        b.t.close()
        b.loop.close()


def test_machine_wiring_follows_kvm_resample_support(tmp_path):
    """pci_attach: a resample irqfd on the device's GSI when KVM has it;
    KVM_IRQ_LINE (no fast path) when not."""
    from types import SimpleNamespace

    from vmm.bus import Bus
    from vmm.memory import GuestMemory
    from vmm.testing.fakevm import FakeVm
    from vmm.virtio.pci_attach import VirtioPciAttachment

    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    for resample in (True, False):
        vm = FakeVm()
        vm.resample = resample
        loop = IoLoop()
        mem = GuestMemory(16 << 20)
        m = SimpleNamespace(vm=vm, memory=mem, ioloop=lambda: loop, pci_irqs=[],
                            slots=SimpleNamespace(take_irq=lambda: 10), pci_bus=None,
                            pio_bus=Bus("pio"), mmio_bus=Bus("mmio"))
        att = VirtioPciAttachment(lambda: BlkDevice(str(img)))
        try:
            att.attach(m, "")
            t = att.transport
            irqfds = [c for c in vm.calls if c[0] == "irqfd"]
            if resample:
                assert irqfds == [("irqfd", t._intx_irqfd.trigger_fd, 10, False,
                                   t._intx_irqfd.resample_fd)]
                assert t._fast is not None
            else:
                assert irqfds == [] and t._intx_irqfd is None and t._fast is None
                t.used(0)
                assert ("irq_line", 10, 1) in vm.calls
        finally:
            att.close()
            loop.close()
            mem.close()
    os.remove(img)
