"""Modern and transitional virtio-pci (virtio 1.1 §4.1, vmm/virtio/
pci_modern.py): PCI identity, each capability's layout, the common
configuration registers, ISR/INTx fallback, the PCI-config-access window,
MSI-X vectors per queue with NO_VECTOR semantics, BAR sizing and moves with
their ioeventfds, hostile accesses, and virtio-blk (also multiqueue) driven
by the mock driver through the capabilities."""
import os

import pytest

from vmm.bus import Bus
from vmm.pci import bus as pb
from vmm.pci import device as pd
from vmm.pci import msix as mx
from vmm.virtio import device as vd
from vmm.virtio import pci_legacy as pl
from vmm.virtio import pci_modern as pm
from vmm.virtio.blk import VIRTIO_BLK_F_MQ, BlkDevice
from vmm.virtio.ioloop import IoLoop
from vmm.testing.fakevm import FakeVm
from vmm.testing.mockdriver import BlkDriver, PciLegacyRegs, T_IN, T_OUT
from vmm.testing.pcimodern_regs import PciModernRegs

V1 = 1 << vd.VIRTIO_F_VERSION_1


class Rig:
    def __init__(self, mem, image, msix=True, transitional=False, num_queues=1, **kw):
        self.levels, self.vm = [], FakeVm()
        self.dev = BlkDevice(image, num_queues=num_queues)
        self.t = pm.VirtioPciModern(self.dev, mem, vm=self.vm, irq_line=self.levels.append,
                                    transitional=transitional, **kw)
        self.d = BlkDriver(self.t, mem, regs=lambda t: PciModernRegs(t, msix=msix))
        self.image = image

    def disk(self):
        with open(self.image, "rb") as f:
            return f.read()

    def fired(self, vector):
        try:
            return int.from_bytes(os.read(self.vm.irqfds[self.t.msix.gsi(vector)], 8), "little")
        except BlockingIOError:
            return 0


@pytest.fixture
def rig(mem, image):
    made = []

    def make(**kw):
        r = Rig(mem, image, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.t.close()


def caps(c):
    """[(offset, id, raw bytes)] walking the capability list."""
    out, off = [], c.read_config(pd.CAPABILITY_LIST, 1)
    while off:
        out.append((off, c.read_config(off, 1), bytes(c.config[off:off + 20])))
        off = c.read_config(off + 1, 1)
    return out


def test_identity_modern_and_transitional(rig):
    r = rig()
    c = r.t.pci
    assert (c.get(pd.VENDOR_ID, 2), c.get(pd.DEVICE_ID, 2), c.get(pd.REVISION_ID, 1)) == (0x1AF4, 0x1042, 1)
    assert c.get(pd.SUBSYSTEM_ID, 2) >= 0x40 and c.get(pd.CLASS_PROG, 3) == 0x010000
    assert sorted(c.bars) == [4] and c.bars[4].is64 and c.bars[4].size == pm.BAR_SIZE
    r.t.close()
    t = rig(transitional=True).t.pci
    assert (t.get(pd.DEVICE_ID, 2), t.get(pd.REVISION_ID, 1), t.get(pd.SUBSYSTEM_ID, 2)) == (0x1001, 0, 2)
    assert sorted(t.bars) == [0, 4] and t.bars[0].io


def test_capability_layout(rig):
    r = rig(num_queues=3)
    found = caps(r.t.pci)
    assert all(off + 20 <= 0x100 for off, _, _ in found)       # reachable through 0xCF8/0xCFC
    vendor = {raw[3]: raw for off, cid, raw in found if cid == pm.CAP_VENDOR}
    assert set(vendor) == {pm.CAP_COMMON, pm.CAP_NOTIFY, pm.CAP_ISR, pm.CAP_DEVICE, pm.CAP_PCI}
    field = lambda raw, a, n: int.from_bytes(raw[a:a + n], "little")
    for typ, (off, length, cap_len) in {pm.CAP_COMMON: (pm.COMMON, 56, 16), pm.CAP_ISR: (pm.ISR, 1, 16),
                                        pm.CAP_DEVICE: (pm.DEVICE, 60, 16),
                                        pm.CAP_NOTIFY: (pm.NOTIFY, 4 * 3, 20)}.items():
        raw = vendor[typ]
        assert (raw[2], raw[4], field(raw, 8, 4), field(raw, 12, 4)) == (cap_len, 4, off, length), typ
    assert field(vendor[pm.CAP_NOTIFY], 16, 4) == pm.NOTIFY_MULTIPLIER
    assert vendor[pm.CAP_PCI][2] == 20
    assert [cid for _, cid, _ in found].count(0x11) == 1
    m = r.t.msix
    assert m.vectors == 4 and m.table_offset == pm.MSIX_TABLE and m.pba_offset == pm.MSIX_PBA


def test_bar_sizing_and_64bit_move(mem, image):
    vm = FakeVm()
    dev = BlkDevice(image)
    loop = IoLoop()
    t = pm.VirtioPciModern(dev, mem, vm=vm, ioeventfd=vm.ioeventfd, ioloop=loop)
    mmio = Bus("mmio")
    bus = pb.PciBus(Bus("pio"), mmio, ram=mem.regions)
    slot = bus.add(t.pci)
    c = t.pci
    first = c.bars[4].mapped
    assert first is not None and pb.MEM_BASE <= first < pb.MEM_END and t.bar_address == first
    assert mmio.find(first + pm.COMMON)[0] is t
    notify = [x for x in vm.calls if x[0] == "ioeventfd" and not x[6]]
    assert [x[2] for x in notify] == [first + pm.NOTIFY] and notify[0][3] == 2 and not notify[0][5]
    # sizing: all ones in both halves (decoding off, as Linux does)
    c.write_config(pd.COMMAND, 2, 0)
    assert mmio.find(first)[0] is None and t.bar_address is None
    c.write_config(0x20, 4, 0xFFFFFFFF)
    c.write_config(0x24, 4, 0xFFFFFFFF)
    assert c.read_config(0x20, 4) == (~(pm.BAR_SIZE - 1) & 0xFFFFFFF0) | 0x4
    assert c.read_config(0x24, 4) == 0xFFFFFFFF
    # a move within the hole: ioeventfds follow
    c.write_config(0x20, 4, 0xE8000000)
    c.write_config(0x24, 4, 0)
    c.write_config(pd.COMMAND, 2, pd.CMD_MEMORY)
    assert t.bar_address == 0xE8000000 and mmio.find(0xE8000000)[0] is t
    last = vm.calls[-2:]
    assert last[0][2] == first + pm.NOTIFY and last[0][6]          # old one deassigned
    assert last[1][2] == 0xE8000000 + pm.NOTIFY and not last[1][6]
    # over RAM, over the IOAPIC/LAPIC range: not decoded, no ioeventfd
    for bad in (0x100000, 0xFEE00000, 0xFEC00000, 0xFFFF8000):
        c.write_config(0x20, 4, bad)
        assert t.bar_address is None, hex(bad)
        assert mmio.find(bad)[0] is None
    # above 4 GiB (no RAM there in a 16 MiB guest): decoded
    c.write_config(0x20, 4, 0)
    c.write_config(0x24, 4, 0x10)
    assert t.bar_address == 0x10_0000_0000 and mmio.find(0x10_0000_0000)[0] is t
    assert slot == 1
    t.close()
    loop.close()


def test_bar_over_another_device_is_not_decoded(mem, image, tmp_path):
    other = tmp_path / "b.img"
    other.write_bytes(bytes(4096))
    mmio = Bus("mmio")
    bus = pb.PciBus(Bus("pio"), mmio, ram=mem.regions)
    a = pm.VirtioPciModern(BlkDevice(image), mem)
    b = pm.VirtioPciModern(BlkDevice(str(other)), mem)
    bus.add(a.pci)
    bus.add(b.pci)
    where = a.pci.bars[4].mapped
    b.pci.write_config(0x20, 4, where)
    assert b.pci.bars[4].mapped is None and mmio.find(where)[0] is a
    a.close()
    b.close()


def test_common_config_registers(rig):
    r = rig(num_queues=2)
    d, regs = r.d, r.d.regs
    assert regs.common("num_queues") == 2 and regs.common("config_msix_vector") == pm.NO_VECTOR
    regs.common("device_feature_select", 1)
    assert regs.common("device_feature") == 1                     # VERSION_1 is bit 32
    regs.common("device_feature_select", 2)
    assert regs.common("device_feature") == 0
    regs.common("queue_select", 1)
    assert (regs.common("queue_size"), regs.common("queue_notify_off")) == (256, 1)
    regs.common("queue_size", 64)
    assert regs.common("queue_size") == 64
    regs.common("queue_size", 512)                                 # larger than the maximum: ignored
    assert regs.common("queue_size") == 64
    regs.common("queue_desc", 0x12345678_9ABCDEF0)
    assert regs.common("queue_desc") == 0x12345678_9ABCDEF0
    regs.t.write(pm.COMMON + 32, 8, 0x1000)                        # one 64-bit access
    assert regs.common("queue_desc") == 0x1000
    # queue_select past num_queues: queue fields read 0, writes go nowhere
    regs.common("queue_select", 7)
    assert regs.common("queue_size") == 0 and regs.common("queue_msix_vector") == pm.NO_VECTOR
    regs.common("queue_enable", 1)
    regs.common("queue_desc", 0x5000)
    assert regs.common("queue_enable") == 0 and regs.common("queue_desc") == 0
    assert not any(q.ready for q in r.t.queues)
    # odd sizes and offsets: reads see bytes, writes are ignored
    regs.common("queue_select", 0)
    r.t.write(pm.COMMON + 22, 1, 1)
    r.t.write(pm.COMMON + 23, 4, 0xFFFFFFFF)
    r.t.write(pm.COMMON + 18, 2, 9)                                # num_queues is read-only
    assert regs.common("queue_select") == 0 and regs.common("num_queues") == 2
    assert r.t.read(pm.COMMON + 18, 1) == 2 and r.t.read(pm.COMMON + 57, 4) == 0
    assert r.t.read(pm.NOTIFY, 4) == 0 and r.t.read(0x7FFF, 1) == 0
    r.t.write(pm.NOTIFY + 2, 2, 0)                                 # not a queue's address
    r.t.write(pm.NOTIFY + 4 * 9, 2, 9)                             # past num_queues
    assert d.status() == 0


def test_blk_through_capabilities_with_msix(rig):
    r = rig()
    assert r.d.init() and r.d.features & V1
    assert r.t.msix.enabled and r.t.config_vector == 0 and r.t.queue_vectors == [1]
    data = os.urandom(4096)
    assert r.d.run(T_OUT, 8, data)[0] == 0
    status, out, used = r.d.run(T_IN, 8, read_len=4096)
    assert (status, out, used) == (0, data, 4097) and r.disk()[4096:8192] == data
    assert r.fired(1) == 2 and r.fired(0) == 0
    assert r.levels == [] and r.t.interrupt_status == 0            # no INTx, no ISR with MSI-X
    assert r.d.check_guards() == []


def test_no_vector_and_bad_vector(rig):
    r = rig()
    r.d.init()
    regs = r.d.regs
    regs.common("queue_select", 0)
    regs.common("queue_msix_vector", 9)                            # the table has 2: refused
    assert regs.common("queue_msix_vector") == pm.NO_VECTOR
    regs.common("config_msix_vector", 0x8000)
    assert regs.common("config_msix_vector") == pm.NO_VECTOR
    assert r.d.run(T_IN, 0, read_len=512)[0] == 0
    assert r.fired(1) == 0 and r.levels == []                      # NO_VECTOR: no interrupt at all
    regs.common("queue_msix_vector", 1)
    assert r.d.run(T_IN, 0, read_len=512)[0] == 0 and r.fired(1) == 1
    # reset unmaps every vector (§4.1.5.1.2)
    regs.write_status(0)
    assert regs.common("config_msix_vector") == pm.NO_VECTOR
    assert r.t.queue_vectors == [pm.NO_VECTOR]


def test_masked_vector_pending_until_unmasked(rig):
    r = rig()
    r.d.init()
    m = r.t.msix
    m.table_write(16 + 12, 4, 1)                                    # mask queue 0's vector
    r.d.run(T_IN, 0, read_len=512)
    assert r.fired(1) == 0 and m.pba_read(0, 8) == 0b10
    m.table_write(16 + 12, 4, 0)
    assert r.fired(1) == 1 and m.pba_read(0, 8) == 0


def test_intx_fallback_without_msix(rig):
    r = rig(msix=False)
    assert r.d.init()
    r.d.run(T_IN, 0, read_len=512)
    assert r.levels == [1] and r.t.pci.get(pd.STATUS, 2) & pd.STATUS_INTERRUPT
    assert r.d.ack_interrupt() == vd.INT_USED and r.levels == [1, 0]
    assert r.d.ack_interrupt() == 0
    r.t.read(pm.ISR + 1, 1)                                         # only offset 0 is ISR
    r.t.config()                                                    # line up, then MSI-X on: down
    assert r.levels[-1] == 1
    r.d.regs.enable_msix(1)
    assert r.levels[-1] == 0
    r.t.pci.write_config(r.t.msix.cap + 2, 2, 0)                    # off again: ISR still set
    assert r.levels[-1] == 1


def test_config_change_sets_isr_and_uses_config_vector(rig):
    r = rig()
    r.d.init()
    r.t.config()
    assert r.fired(0) == 1 and r.t.interrupt_status == vd.INT_CONFIG and r.levels == []
    assert r.d.regs.common("config_generation") == 1


def test_pci_config_access_window(rig):
    r = rig(num_queues=3)
    c, cap = r.t.pci, r.t.pci_cfg_cap
    data = cap + 16

    def window(bar, offset, length):
        c.write_config(cap + 4, 1, bar)
        c.write_config(cap + 8, 4, offset)
        c.write_config(cap + 12, 4, length)

    window(4, pm.COMMON + 18, 2)                                    # num_queues
    assert c.read_config(data, 4) == 3 and c.read_config(data, 2) == 3
    window(4, pm.COMMON + 20, 1)                                    # device_status
    c.write_config(data, 4, vd.ACKNOWLEDGE)
    assert r.t.status == vd.ACKNOWLEDGE
    window(4, pm.DEVICE, 4)                                         # device config: capacity
    assert c.read_config(data, 4) == r.dev.capacity & 0xFFFFFFFF
    assert c.read_config(cap + 4, 1) == 4 and c.read_config(cap + 12, 4) == 4
    # cap_vndr/next/len/type are read-only
    c.write_config(cap, 4, 0)
    assert c.read_config(cap, 1) == pm.CAP_VENDOR and c.read_config(cap + 3, 1) == pm.CAP_PCI
    for bar, offset, length in ((4, pm.COMMON + 19, 2), (4, pm.COMMON, 3), (2, 0, 4),
                                (4, pm.BAR_SIZE - 2, 4), (7, 0, 1)):
        window(bar, offset, length)
        assert c.read_config(data, 4) == 0
        c.write_config(data, 4, 0xFFFFFFFF)                         # ignored, no crash
    window(4, pm.COMMON + 20, 1)
    assert c.read_config(data + 1, 1) == 0                          # not at the data offset
    assert c.read_config(data + 2, 4) == 0xFFFFFFFF                 # across the window edge
    assert r.t.status == vd.ACKNOWLEDGE


def test_blk_multiqueue(rig):
    r = rig(num_queues=2)
    assert r.d.init()
    assert r.d.features >> VIRTIO_BLK_F_MQ & 1 and r.d.config(34, 2) == 2
    assert len(r.d.queues) == 2 and r.t.queue_vectors == [1, 2]
    # a request on queue 1 completes there and interrupts its own vector
    data = os.urandom(512)
    q0 = r.d.queues[0]
    r.d.queues[0] = r.d.queues[1]                                  # submit() uses queues[0]
    req = r.d.submit(T_OUT, 3, data)
    r.d.kick(1)
    assert dict(r.d.queues[0].get_used())[req.head] == 1
    r.d.queues[0] = q0
    assert r.fired(2) == 1 and r.fired(1) == 0
    assert r.d.run(T_IN, 3, read_len=512)[1] == data and r.fired(1) == 1
    assert r.dev.stats["requests"] == 2


def test_transitional_legacy_driver(rig, mem):
    """A legacy driver on BAR0 (§4.1.4.8): without MSI-X config at 20; with
    MSI-X the two vector registers and config at 24."""
    r = rig(transitional=True)
    bar0 = r.t.pci.bars[0].handler
    d = BlkDriver(r.t, mem, regs=lambda t: PciLegacyRegs(bar0))
    assert d.init(features=0xFFFFFFFF) and not d.features & V1 and r.t.legacy
    assert bar0.read(pl.CONFIG, 4) == r.dev.capacity
    assert d.run(T_IN, 0, read_len=512)[0] == 0 and r.levels == [1]
    assert d.ack_interrupt() == vd.INT_USED
    d.regs.write_status(0)
    r.d.regs.enable_msix(2)
    assert bar0.read(pm.LEGACY_CONFIG_MSIX, 4) == r.dev.capacity
    bar0.write(pm.LEGACY_CONFIG_VECTOR, 2, 0)
    bar0.write(pl.QUEUE_SEL, 2, 0)
    bar0.write(pm.LEGACY_QUEUE_VECTOR, 2, 1)
    bar0.write(pm.LEGACY_QUEUE_VECTOR + 2, 2, 5)                   # device config: read-only
    assert bar0.read(pm.LEGACY_QUEUE_VECTOR, 2) == 1 and bar0.read(pm.LEGACY_CONFIG_VECTOR, 2) == 0
    bar0.write(pm.LEGACY_QUEUE_VECTOR, 2, 77)
    assert bar0.read(pm.LEGACY_QUEUE_VECTOR, 2) == pm.NO_VECTOR
    # the modern side takes over again
    assert r.d.init() and r.d.features & V1 and not r.t.legacy
    assert r.d.run(T_IN, 0, read_len=512)[0] == 0 and r.fired(1) == 1


def test_msix_table_through_bar(rig):
    r = rig()
    r.t.write(pm.MSIX_TABLE + 8, 4, 0x99)
    assert r.t.read(pm.MSIX_TABLE + 8, 4) == 0x99 and r.t.msix.data[0] == 0x99
    r.t.write(pm.MSIX_TABLE + 3, 2, 0xFFFF)                       # misaligned: ignored
    r.t.write(pm.MSIX_PBA, 8, ~0 & 0xFFFFFFFFFFFFFFFF)
    assert r.t.read(pm.MSIX_PBA, 8) == 0 and r.t.read(pm.MSIX_TABLE + 3, 2) == 0
    r.t.pci.write_config(r.t.msix.cap + 2, 2, mx.CTRL_ENABLE)
    assert r.t.msix.enabled
