"""Legacy virtio-pci (virtio 1.1 §4.1.4.8, Linux include/uapi/linux/
virtio_pci.h): PCI identity, the BAR0 header, INTx, and virtio-blk driven by
the mock driver through it, directly and through the port bus."""
import os
import select
from types import SimpleNamespace

import pytest

from vmm.bus import Bus
from vmm.pci import bus as pb
from vmm.pci import device as pd
from vmm.virtio import device as vd
from vmm.virtio import pci_legacy as pl
from vmm.virtio.blk import BlkDevice
from vmm.virtio.ioloop import IoLoop, signal_eventfd
from vmm.testing.mockdriver import BlkDriver, PciLegacyRegs, PortWindow, T_IN, T_OUT

V1 = 1 << vd.VIRTIO_F_VERSION_1


class Rig:
    def __init__(self, mem, image, native=True, **kw):
        self.levels = []
        self.dev = BlkDevice(image, native=native)
        self.t = pl.VirtioPciLegacy(self.dev, mem, irq_line=self.levels.append, **kw)
        self.d = BlkDriver(self.t, mem)
        self.image = image

    def disk(self):
        with open(self.image, "rb") as f:
            return f.read()


@pytest.fixture
def rig(mem, image, native):
    made = []

    def make(**kw):
        r = Rig(mem, image, native, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.t.close()


def test_pci_identity(mem, image):
    t = pl.VirtioPciLegacy(BlkDevice(image), mem)
    c = t.pci
    assert (c.get(pd.VENDOR_ID, 2), c.get(pd.DEVICE_ID, 2)) == (0x1AF4, 0x1001)
    assert c.get(pd.REVISION_ID, 1) == 0 and c.get(pd.CLASS_PROG, 3) == 0x010000
    assert (c.get(pd.SUBSYSTEM_VENDOR_ID, 2), c.get(pd.SUBSYSTEM_ID, 2)) == (0x1AF4, 2)
    assert c.get(pd.INTERRUPT_PIN, 1) == 1
    bar = c.bars[0]
    assert bar.io and bar.size == 128 and bar.handler is t    # 20 + 60 bytes of blk config
    c.write_config(pd.BAR0, 4, 0xFFFFFFFF)
    assert c.read_config(pd.BAR0, 4) == 0xFF81
    t.close()


def test_header_registers(rig):
    r = rig()
    t = r.t
    f = t.read(pl.HOST_FEATURES, 4)
    assert f == r.dev.features & 0xFFFFFFFF & ~V1 and not f & V1
    t.write(pl.HOST_FEATURES, 4, 0)                # read-only
    assert t.read(pl.HOST_FEATURES, 4) == f
    assert t.read(pl.QUEUE_NUM, 2) == 256
    t.write(pl.QUEUE_NUM, 2, 16)                   # read-only: the device's size
    assert t.read(pl.QUEUE_NUM, 2) == 256
    t.write(pl.QUEUE_SEL, 2, 1)                    # no queue 1
    assert t.read(pl.QUEUE_SEL, 2) == 1 and t.read(pl.QUEUE_NUM, 2) == 0
    assert t.read(pl.QUEUE_PFN, 4) == 0
    t.write(pl.QUEUE_SEL, 2, 0)
    # device config from offset 20: capacity (u64 sectors), byte by byte as Linux reads it
    cap = sum(t.read(pl.CONFIG + i, 1) << (8 * i) for i in range(8))
    assert cap == os.path.getsize(r.image) // 512 == t.read(pl.CONFIG, 4)
    # a word read across STATUS and ISR
    t.write(pl.STATUS, 1, vd.ACKNOWLEDGE)
    assert t.read(pl.STATUS, 2) == vd.ACKNOWLEDGE


def test_blk_through_the_transport(rig):
    r = rig()
    assert r.d.init()
    assert isinstance(r.d.regs, PciLegacyRegs)
    q, tq = r.d.queues[0], r.t.queues[0]
    assert r.t.read(pl.QUEUE_SEL, 2) == 1          # the driver probed for a queue 1
    r.t.write(pl.QUEUE_SEL, 2, 0)
    assert r.t.read(pl.QUEUE_PFN, 4) == q.desc >> 12
    assert (tq.desc, tq.driver, tq.device) == (q.desc, q.avail, q.used) and q.used % 4096 == 0
    assert r.t.activated and r.dev.acked_features == r.d.features
    disk = r.disk()
    status, data, used_len = r.d.run(T_IN, 7, read_len=8192, split=3, indirect=True)
    assert (status, used_len) == (0, 8193) and data == disk[7 * 512:7 * 512 + 8192]
    payload = os.urandom(64 * 1024)
    assert r.d.run(T_OUT, 200, data=payload, split=5)[0] == 0
    assert r.d.run(T_IN, 200, read_len=len(payload))[1] == payload
    assert r.disk()[200 * 512:200 * 512 + len(payload)] == payload
    assert r.d.check_guards() == []


def test_isr_read_acknowledges_and_lowers_the_line(rig):
    r = rig()
    assert r.d.init()
    r.d.run(T_IN, 0, read_len=512)
    assert r.levels == [1] and r.t.pci.read_config(pd.STATUS, 2) & pd.STATUS_INTERRUPT
    r.d.run(T_IN, 1, read_len=512)                 # still asserted: level stays high
    assert r.levels == [1]
    assert r.t.read(pl.ISR, 1) == vd.INT_USED      # read acknowledges
    assert r.levels == [1, 0] and r.t.read(pl.ISR, 1) == 0
    assert not r.t.pci.read_config(pd.STATUS, 2) & pd.STATUS_INTERRUPT
    r.t.config()                                   # configuration change: bit 1
    assert r.levels == [1, 0, 1] and r.t.read(pl.ISR, 1) == vd.INT_CONFIG
    assert r.levels[-1] == 0
    r.t.write(pl.ISR, 1, 0xFF)                     # read-only
    assert r.t.interrupt_status == 0


def test_queue_pfn_zero_releases_the_queue(rig):
    r = rig()
    regs = r.d.regs
    r.t.write(pl.STATUS, 1, 0)
    r.d.set_status(vd.ACKNOWLEDGE | vd.DRIVER)
    r.d.queues = regs.setup_queues(r.d, None)
    r.t.write(pl.QUEUE_SEL, 2, 0)
    tq = r.t.queues[0]
    assert tq.ready and r.t.read(pl.QUEUE_PFN, 4)
    r.t.write(pl.QUEUE_PFN, 4, 0)                  # Linux del_vq()
    assert not tq.ready and r.t.read(pl.QUEUE_PFN, 4) == 0 and tq.desc == 0
    r.d.queues = regs.setup_queues(r.d, None)      # and can be set up again
    assert tq.ready and tq.desc == r.d.queues[0].desc
    r.d.set_status(vd.DRIVER_OK)
    assert r.d.run(T_IN, 0, read_len=512)[0] == 0
    r.t.write(pl.QUEUE_SEL, 2, 0)
    r.t.write(pl.QUEUE_PFN, 4, 0)                  # not while live
    assert tq.ready


def test_status_zero_resets(rig):
    r = rig()
    assert r.d.init()
    r.d.run(T_IN, 0, read_len=512)
    assert r.levels == [1] and r.t.activated
    r.t.write(pl.STATUS, 1, 0)
    assert r.t.read(pl.STATUS, 1) == 0 and not r.t.activated
    assert r.levels == [1, 0] and r.t.interrupt_status == 0
    assert r.t.read(pl.QUEUE_PFN, 4) == 0 and not r.t.queues[0].ready
    assert r.t.read(pl.GUEST_FEATURES, 4) == 0 and r.dev.acked_features == 0
    r.d.reset_arena(0x400000)
    assert r.d.init()                              # a driver can start over
    assert r.d.run(T_IN, 3, read_len=512)[1] == r.disk()[3 * 512:4 * 512]


def test_guest_features_fixed_at_driver_ok(rig):
    r = rig()
    no_event_idx = ~(1 << vd.VIRTIO_F_RING_EVENT_IDX)
    assert r.d.init(features=no_event_idx)
    assert not r.dev.has(vd.VIRTIO_F_RING_EVENT_IDX) and r.dev.has(vd.VIRTIO_F_RING_INDIRECT_DESC)
    r.t.write(pl.GUEST_FEATURES, 4, 0)             # too late
    assert r.t.read(pl.GUEST_FEATURES, 4) == r.d.features


def test_through_pci_bus_ports_and_ioeventfd(mem, image):
    """Enumerate like a guest, drive the device at its port, move BAR0: the
    notify ioeventfds follow it, and a kick on the eventfd completes the
    request on the I/O thread and raises INTx."""
    pio = Bus("pio")
    m = SimpleNamespace(pio_bus=pio, mmio_bus=Bus("mmio"))
    bus = pb.get_or_create(m)
    fds = []
    loop = IoLoop()
    loop.start()
    levels = []
    t = pl.VirtioPciLegacy(BlkDevice(image), mem, irq_line=levels.append, ioloop=loop,
                           ioeventfd=lambda fd, port, n, dm, deassign=False:
                           fds.append((fd, port, n, dm, deassign)))
    slot = bus.add(t.pci, irq=11)

    def cfg(reg, size=4):
        pio.write(0xCF8, 4, pb.ENABLE | slot << 11 | reg)
        return pio.read(0xCFC, size)
    assert cfg(0) == 0x10011AF4 and cfg(pd.INTERRUPT_LINE, 1) == 11
    port = cfg(pd.BAR0) & ~3
    assert port == t.port == pb.IO_BASE
    kick = t.notify_fds[0]
    assert fds == [(kick, port + pl.QUEUE_NOTIFY, 2, 0, False)]
    d = BlkDriver(PortWindow(pio, port), mem, regs=PciLegacyRegs)
    assert d.init()
    disk = open(image, "rb").read()
    req = d.submit(T_IN, 2, read_len=1024)
    signal_eventfd(kick)                           # what KVM does on the 2-byte notify write
    for _ in range(3000):                          # (30 s: the I/O thread raises it)
        if levels:
            break
        select.select([], [], [], 0.01)
    assert levels == [1] and d.result(req) == (0, disk[1024:2048])
    assert d.ack_interrupt() == vd.INT_USED and levels == [1, 0]
    d.queues[0].get_used()
    # the guest moves BAR0 (decode off, new address, decode on, as Linux does)
    pio.write(0xCF8, 4, pb.ENABLE | slot << 11 | pd.COMMAND)
    pio.write(0xCFC, 2, 0)
    assert fds[-1] == (kick, port + pl.QUEUE_NOTIFY, 2, 0, True) and t.port is None
    pio.write(0xCF8, 4, pb.ENABLE | slot << 11 | pd.BAR0)
    pio.write(0xCFC, 4, 0xD000)
    pio.write(0xCF8, 4, pb.ENABLE | slot << 11 | pd.COMMAND)
    pio.write(0xCFC, 2, pd.CMD_IO | pd.CMD_MASTER)
    assert fds[-1] == (kick, 0xD000 + pl.QUEUE_NOTIFY, 2, 0, False) and t.port == 0xD000
    d.t.base = 0xD000
    status, data, _ = d.run(T_IN, 4, read_len=512)    # a notify that exits: direct path
    assert (status, data) == (0, disk[2048:2560])
    loop.stop()
    t.close()
    loop.close()
