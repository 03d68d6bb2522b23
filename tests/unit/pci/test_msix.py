"""MSI-X (PCI 3.0 §6.8.2, vmm/pci/msix.py) and the GSI routing table the Vm
owns (KVM API doc 4.52): capability layout, table and PBA registers,
function and per-vector masks, pending bits delivered on unmask, and the
whole routing table as sent after every change (FakeVm records it)."""
import os

import pytest

from vmm.kvm.vm import default_routes
from vmm.pci import device as pd
from vmm.pci import msix as mx
from vmm.testing.fakevm import FakeVm

ADDR = 0xFEE00000


def drain(fd):
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


class Fn:
    """A PCI function with 4 MSI-X vectors: table at BAR2+0x1000, PBA at +0x1800."""

    def __init__(self, vm=None, vectors=4):
        self.pci = pd.PciDevice(0x1AF4, 0x1042, 0x010000, name="t")
        self.vm = vm if vm is not None else FakeVm()
        self.m = mx.Msix(self.pci, vectors, 2, 0x1000, 0x1800, vm=self.vm)
        self.ctrl = self.m.cap + 2

    def control(self, value):
        self.pci.write_config(self.ctrl, 2, value)

    def entry(self, v, address=ADDR, data=None, masked=False):
        base = 16 * v
        self.m.table_write(base, 4, address & 0xFFFFFFFF)
        self.m.table_write(base + 4, 4, address >> 32)
        self.m.table_write(base + 8, 4, 0x40 + v if data is None else data)
        self.m.table_write(base + 12, 4, int(masked))

    def fired(self, v):
        return drain(self.vm.irqfds[self.m.gsi(v)])


@pytest.fixture
def fn():
    f = Fn()
    yield f
    f.m.close()


def test_capability_layout(fn):
    c = fn.pci
    assert c.get(pd.STATUS, 2) & pd.STATUS_CAP_LIST
    cap = c.get(pd.CAPABILITY_LIST, 1)
    assert cap == fn.m.cap and c.get(cap, 1) == 0x11
    assert c.get(cap + 2, 2) == 3                      # table size - 1, disabled, not masked
    assert c.get(cap + 4, 4) == 0x1000 | 2             # table offset | BIR
    assert c.get(cap + 8, 4) == 0x1800 | 2
    # only Enable and Function Mask are writable
    c.write_config(cap + 2, 2, 0xFFFF)
    assert c.read_config(cap + 2, 2) == 0xC003
    c.write_config(cap + 4, 4, 0)
    assert c.read_config(cap + 4, 4) == 0x1002


def test_table_reset_state_and_registers(fn):
    m = fn.m
    for v in range(4):                                 # §6.8.2.9: every vector starts masked
        assert m.table_read(16 * v + 12, 4) == 1
    fn.entry(1, address=0x1_FEE0_1000, data=0x1234, masked=True)
    assert m.table_read(16, 4) == 0xFEE01000 and m.table_read(20, 4) == 1
    assert m.table_read(24, 4) == 0x1234
    assert m.table_read(16, 8) == 0x1_FEE0_1000        # qword access
    m.table_write(28, 4, 0xFFFFFFFE)                   # reserved control bits stay 0
    assert m.table_read(28, 4) == 0
    m.table_write(32, 8, 0xAAAA_BBBB_FEE0_2000)
    assert m.address[2] == 0xAAAABBBBFEE02000


def test_garbage_table_accesses_are_ignored(fn):
    m = fn.m
    before = (list(m.address), list(m.data), list(m.masked))
    for off, size in ((1, 4), (2, 2), (0, 1), (6, 4), (4, 8), (64, 4), (4096, 4), (-4, 4)):
        m.table_write(off, size, 0xFFFFFFFF)
        assert m.table_read(off, size) == 0
    assert (m.address, m.data, m.masked) == before
    m.pba_write(0, 8, ~0)                             # PBA is read-only
    assert m.pba_read(0, 8) == 0
    assert m.pba_read(3, 4) == 0 and m.pba_read(64, 8) == 0
    assert not fn.vm.tables                           # nothing reached KVM


def test_masked_vector_sets_pending_and_fires_on_unmask(fn):
    m = fn.m
    fn.entry(0, masked=True)
    fn.control(mx.CTRL_ENABLE)
    assert not m.notify(0) and m.pending[0]
    assert m.pba_read(0, 8) == 1 and m.pba_read(0, 4) == 1
    assert fn.fired(0) == 0
    m.table_write(12, 4, 0)                            # unmask: delivered now, once
    assert fn.fired(0) == 1 and not m.pending[0] and m.pba_read(0, 8) == 0
    assert m.notify(0) and fn.fired(0) == 1
    assert m.delivered[0] == 2


def test_function_mask_holds_every_vector(fn):
    m = fn.m
    fn.entry(0)
    fn.entry(3)
    fn.control(mx.CTRL_ENABLE | mx.CTRL_MASKALL)
    m.notify(0)
    m.notify(3)
    assert m.pba_read(0, 8) == 0b1001 and fn.fired(0) == fn.fired(3) == 0
    fn.control(mx.CTRL_ENABLE)
    assert fn.fired(0) == 1 and fn.fired(3) == 1 and m.pba_read(0, 8) == 0


def test_state_round_trip_into_a_new_vm(fn):
    """Snapshots (Msix.state/restore): table, pending bits and the Function
    Mask (in config space) carry over; the new VM gets routes only for live
    vectors, and a vector pending under the Function Mask fires when the
    driver clears it there."""
    m = fn.m
    fn.entry(0)
    fn.entry(1, address=0x1_FEE0_1000, data=0x77)
    fn.entry(2, masked=True)
    fn.control(mx.CTRL_ENABLE | mx.CTRL_MASKALL)
    m.notify(1)
    st = m.state()
    assert st["pending"] == [False, True, False, False]
    g = Fn()
    g.pci.config[:] = fn.pci.config                   # what pci_persist restores first
    g.m.restore(st)
    assert (g.m.enabled, g.m.function_masked) == (True, True)
    assert g.m.state() == st and g.m.pba_read(0, 8) == 0b10
    assert not g.vm.tables                            # masked: nothing routed yet
    g.control(mx.CTRL_ENABLE)
    assert g.fired(1) == 1 and g.fired(0) == 0 and g.m.pba_read(0, 8) == 0
    assert g.vm._msi_routes == {g.m.gsi(0): (ADDR, 0x40), g.m.gsi(1): (0x1_FEE0_1000, 0x77)}
    small = Fn(vectors=2)
    with pytest.raises(ValueError, match="vectors"):
        small.m.restore(st)
    small.m.close()
    g.m.close()


def test_vector_out_of_range_and_disabled(fn):
    assert not fn.m.notify(4) and not fn.m.notify(-1)
    fn.entry(0)
    assert not fn.m.notify(0) and not fn.m.pending[0]  # MSI-X off: not used at all


def test_routing_table_after_each_change():
    vm = FakeVm()
    f = Fn(vm)
    base = default_routes()
    assert len(base) == 40 and (0, "irqchip", 2, 0) in base and (23, "irqchip", 2, 23) in base
    assert (9, "irqchip", 1, 1) in base                # GSI 9 also on the slave PIC
    gsis = [f.m.gsi(v) for v in range(4)]
    assert gsis == [24, 25, 26, 27] and vm.irqfds.keys() == set(gsis)
    assert vm.tables == []                             # nothing routed before the guest asks
    f.entry(1)                                         # unmasked while MSI-X is off
    f.control(mx.CTRL_ENABLE)                          # enable: vector 1 goes live
    assert vm.tables[-1] == base + [(25, "msi", ADDR, 0x41)]
    f.entry(0, masked=True)
    assert len(vm.tables) == 1                         # masked: not sent yet
    f.m.table_write(12, 4, 0)
    assert vm.tables[-1] == base + [(24, "msi", ADDR, 0x40), (25, "msi", ADDR, 0x41)]
    f.m.table_write(16 + 12, 4, 1)                     # Linux masks around a change ...
    f.m.table_write(16 + 8, 4, 0x55)
    assert len(vm.tables) == 2
    f.m.table_write(16 + 12, 4, 0)                     # ... and the new message is sent on unmask
    assert vm.tables[-1] == base + [(24, "msi", ADDR, 0x40), (25, "msi", ADDR, 0x55)]
    f.control(0)
    f.control(mx.CTRL_ENABLE)                          # same messages: no new table
    assert len(vm.tables) == 3
    f.m.close()
    assert vm.tables[-1] == base and vm.irqfds == {}   # routes and irqfds gone


def test_refused_message_leaves_vector_unrouted():
    vm = FakeVm()
    vm.refuse(0xDEAD0000)
    f = Fn(vm)
    f.control(mx.CTRL_ENABLE)
    f.entry(0)
    f.entry(1, address=0xDEAD0000)                     # KVM says EINVAL: logged, no crash
    assert vm.routing_table()[-1] == (24, "msi", ADDR, 0x40)
    assert not f.m.notify(1) and f.fired(1) == 0
    assert f.m.notify(0) and f.fired(0) == 1
    f.entry(1)                                         # a good message routes it again
    assert f.m.notify(1) and f.fired(1) == 1
    f.m.close()


def test_vm_routing_owner_keeps_other_routes():
    """Two functions share one table: each update carries both."""
    vm = FakeVm()
    a, b = Fn(vm), Fn(vm)
    for f in (a, b):
        f.control(mx.CTRL_ENABLE)
        f.entry(0)
    assert [r for r in vm.tables[-1] if r[1] == "msi"] == [
        (a.m.gsi(0), "msi", ADDR, 0x40), (b.m.gsi(0), "msi", ADDR, 0x40)]
    a.m.close()
    assert [r for r in vm.tables[-1] if r[1] == "msi"] == [(b.m.gsi(0), "msi", ADDR, 0x40)]
    b.m.close()


@pytest.mark.usefixtures("needs_kvm")
def test_real_kvm_routes_and_irqfds():
    """The same vectors on a real VM: KVM takes the whole table each time
    (defaults + MSI routes), the irqfds bind, and a vector fires without error."""
    from vmm.kvm.system import Kvm
    from vmm.kvm.vcpu import Vcpu
    from vmm.kvm.vm import Vm
    kvm = Kvm()
    vm = Vm(kvm)
    vm.setup_platform()
    vcpu = Vcpu(vm, 0)
    try:
        f = Fn(vm)
        f.control(mx.CTRL_ENABLE)
        for v in range(4):
            f.entry(v)
        assert vm.routing_updates == 4
        assert vm.routing_table()[-4:] == [(24 + v, "msi", ADDR, 0x40 + v) for v in range(4)]
        assert all(f.m.notify(v) for v in range(4))
        vm.set_irq_line(5, 1)                           # the PIC/IOAPIC routes still work
        vm.set_irq_line(5, 0)
        f.m.close()
        assert vm.routing_table() == default_routes()
    finally:
        vcpu.close()
        vm.close()
        kvm.close()
