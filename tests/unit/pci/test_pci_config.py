"""PCI configuration mechanism #1 and type 0 configuration space (PCI Local
Bus Specification 3.0 §3.2.2.3.2, chapter 6)."""
import logging
from types import SimpleNamespace

import pytest

from vmm.bus import Bus
from vmm.pci import bus as pb
from vmm.pci import device as pd
from vmm.pci.bus import PciBus


class Regs:
    """A BAR handler recording accesses."""

    def __init__(self):
        self.log = []

    def read(self, offset, size):
        self.log.append(("r", offset, size))
        return 0x5A

    def write(self, offset, size, value):
        self.log.append(("w", offset, size, value))


def addr(slot, reg, fn=0, bus=0, enable=True):
    return (pb.ENABLE if enable else 0) | bus << 16 | slot << 11 | fn << 8 | reg


class Cfg:
    """Configuration cycles through the ports, as a guest does them."""

    def __init__(self, pio):
        self.pio = pio

    def read(self, slot, reg, size=4, **kw):
        self.pio.write(0xCF8, 4, addr(slot, reg & 0xFC, **kw))
        return self.pio.read(0xCFC + (reg & 3), size)

    def write(self, slot, reg, size, value, **kw):
        self.pio.write(0xCF8, 4, addr(slot, reg & 0xFC, **kw))
        self.pio.write(0xCFC + (reg & 3), size, value)


@pytest.fixture
def machine():
    m = SimpleNamespace(pio_bus=Bus("pio"), mmio_bus=Bus("mmio"))
    pb.get_or_create(m)
    return m


@pytest.fixture
def cfg(machine):
    return Cfg(machine.pio_bus)


def test_created_once(machine):
    bus = machine.pci_bus
    assert pb.get_or_create(machine) is bus
    assert machine.pio_bus.find(0xCF8) == (bus, 0) and machine.pio_bus.find(0xCFF) == (bus, 7)


def test_linux_type1_probe(machine, cfg):
    """arch/x86/pci/direct.c pci_check_type1: a byte to 0xCFB is not a config
    address write; the dword written to 0xCF8 reads back."""
    pio = machine.pio_bus
    pio.write(0xCFB, 1, 0x01)
    assert pio.read(0xCF8, 4) == 0
    pio.write(0xCF8, 4, 0x80000000)
    assert pio.read(0xCF8, 4) == 0x80000000
    pio.write(0xCF8, 2, 0x1234)                    # word: not latched
    assert pio.read(0xCF8, 4) == 0x80000000
    assert pio.read(0xCF8, 1) == 0xFF and pio.read(0xCFA, 2) == 0xFFFF
    pio.write(0xCF8, 4, 0xFFFFFFFF)                # reserved bits read as 0
    assert pio.read(0xCF8, 4) == pb.ADDRESS_MASK
    # pci_sanity_check: a host bridge class on bus 0
    assert cfg.read(0, pd.CLASS_DEVICE, 2) == 0x0600


def test_host_bridge_header(cfg):
    assert cfg.read(0, 0) == pb.HOST_DEVICE << 16 | pb.HOST_VENDOR
    assert cfg.read(0, pd.REVISION_ID) >> 8 == pb.CLASS_HOST_BRIDGE
    assert cfg.read(0, pd.HEADER_TYPE, 1) == 0x00   # type 0, single function


def test_absent_functions_read_all_ones(machine, cfg):
    assert cfg.read(5, 0, 2) == 0xFFFF              # empty slot
    assert cfg.read(0, 0, fn=1) == 0xFFFFFFFF       # function 1 of the host bridge
    assert cfg.read(0, 0, bus=1) == 0xFFFFFFFF      # no bus 1
    assert cfg.read(0, 0, enable=False) == 0xFFFFFFFF
    cfg.write(5, pd.COMMAND, 2, 0xFFFF)             # ignored, no error
    assert cfg.read(5, pd.COMMAND, 2) == 0xFFFF


@pytest.fixture
def dev(machine):
    d = pd.PciDevice(0x1234, 0x5678, 0x0C0340, revision=7, subsystem_vendor=0xAAAA,
                     subsystem=0xBBBB, irq_pin=pd.PIN_INTA, name="test")
    d.regs = Regs()
    d.add_bar(0, 64, d.regs, io=True)
    d.mem_regs = Regs()
    d.add_bar(2, 0x1000, d.mem_regs, io=False)
    d.moves = []
    d.bar_moved = lambda bar, old, new: d.moves.append((bar.index, old, new))
    d.slot = machine.pci_bus.add(d, irq=10)
    return d


def test_every_size_at_every_offset(dev, cfg):
    """Byte, word and dword accesses at any 0xCFC.. offset, including ones
    that run past 0xCFF (a dword at 0xCFD reaches registers 1..4)."""
    space = b"".join(cfg.read(dev.slot, r).to_bytes(4, "little") for r in range(0, 256, 4))
    assert space[:4] == bytes([0x34, 0x12, 0x78, 0x56])
    for reg in range(0, 64, 4):
        for k in range(4):
            for size in (1, 2, 4):
                got = cfg.read(dev.slot, reg + k, size)
                assert got == int.from_bytes(space[reg + k:reg + k + size], "little"), (reg, k, size)
    cfg.pio.write(0xCF8, 4, addr(dev.slot, 0xFC))   # last dword: bytes past 255 float high
    assert cfg.pio.read(0xCFE, 4) == 0xFFFF0000 | int.from_bytes(space[254:256], "little")


def test_header_fields(dev, cfg):
    s = dev.slot
    assert cfg.read(s, pd.REVISION_ID) == 0x0C034007
    assert cfg.read(s, pd.SUBSYSTEM_VENDOR_ID) == 0xBBBBAAAA
    assert cfg.read(s, pd.INTERRUPT_LINE, 2) == 0x010A    # pin INTA#, line 10
    assert cfg.read(s, pd.COMMAND, 2) == pd.CMD_IO | pd.CMD_MEMORY  # firmware enabled decoding


def test_read_only_fields_ignore_writes(dev, cfg):
    s = dev.slot
    before = [cfg.read(s, r) for r in range(0, 64, 4)]
    for reg in (pd.VENDOR_ID, pd.REVISION_ID, pd.SUBSYSTEM_VENDOR_ID, pd.CAPABILITY_LIST):
        cfg.write(s, reg, 4, 0xFFFFFFFF)
    cfg.write(s, pd.HEADER_TYPE, 1, 0xFF)
    cfg.write(s, pd.INTERRUPT_PIN, 1, 4)
    cfg.write(s, pd.STATUS, 2, 0xFFFF)             # RO and write-1-to-clear bits only
    cfg.write(s, 0x80, 4, 0x12345678)              # device-specific space: nothing there
    after = [cfg.read(s, r) for r in range(0, 64, 4)]
    assert after == before
    assert cfg.read(s, 0x80) == 0
    cfg.write(s, pd.INTERRUPT_LINE, 1, 11)         # read-write
    assert cfg.read(s, pd.INTERRUPT_LINE, 1) == 11
    cfg.write(s, pd.COMMAND, 2, 0xFFFF)
    assert cfg.read(s, pd.COMMAND, 2) == 0x547     # only implemented bits stick


def test_status_write_one_to_clear(dev, cfg):
    dev.config[pd.STATUS + 1] = 0x20               # "received master abort" (bit 13)
    cfg.write(dev.slot, pd.STATUS, 2, 0x0000)
    assert cfg.read(dev.slot, pd.STATUS, 2) == 0x2000
    cfg.write(dev.slot, pd.STATUS, 2, 0x2000)
    assert cfg.read(dev.slot, pd.STATUS, 2) == 0


def test_bar_sizing(dev, cfg):
    s, io_bar, mem_bar = dev.slot, pd.BAR0, pd.BAR0 + 8
    cfg.write(s, pd.COMMAND, 2, 0)                 # as Linux does around sizing
    for reg, mask in ((io_bar, 0xFFC1), (mem_bar, 0xFFFFF000)):
        orig = cfg.read(s, reg)
        cfg.write(s, reg, 4, 0xFFFFFFFF)
        assert cfg.read(s, reg) == mask
        cfg.write(s, reg, 4, orig)
        assert cfg.read(s, reg) == orig
    for reg in (pd.BAR0 + 4, pd.BAR0 + 12, pd.BAR0 + 16, pd.BAR0 + 20, pd.ROM_ADDRESS):
        cfg.write(s, reg, 4, 0xFFFFFFFF)           # unimplemented: hardwired to 0
        assert cfg.read(s, reg) == 0


def test_bar_reprogramming_moves_dispatch(machine, dev, cfg):
    pio, mmio = machine.pio_bus, machine.mmio_bus
    old = dev.bars[0].mapped
    assert old == pb.IO_BASE and cfg.read(dev.slot, pd.BAR0) == old | 1
    assert dev.bars[2].mapped == pb.MEM_BASE
    assert pio.read(old + 3, 1) == 0x5A and dev.regs.log[-1] == ("r", 3, 1)
    assert mmio.read(pb.MEM_BASE + 0x10, 4) == 0x5A
    cfg.write(dev.slot, pd.BAR0, 4, 0x6000)        # the guest moves BAR0
    assert dev.bars[0].mapped == 0x6000 and dev.moves[-1] == (0, old, 0x6000)
    pio.write(0x6002, 2, 0xBEEF)
    assert dev.regs.log[-1] == ("w", 2, 2, 0xBEEF)
    n = len(dev.regs.log)
    assert pio.read(old, 1) == 0xFF and len(dev.regs.log) == n   # nothing at the old port
    cfg.write(dev.slot, pd.BAR0 + 1, 1, 0x70)      # a byte write moves it too
    assert dev.bars[0].mapped == 0x7000
    cfg.write(dev.slot, pd.COMMAND, 2, pd.CMD_MEMORY)   # I/O decode off: unmapped
    assert dev.bars[0].mapped is None and dev.moves[-1] == (0, 0x7000, None)
    assert pio.find(0x7000) == (None, 0) and dev.bars[2].mapped == pb.MEM_BASE
    cfg.write(dev.slot, pd.COMMAND, 2, pd.CMD_IO)       # and back on; memory off
    assert dev.bars[0].mapped == 0x7000 and dev.bars[2].mapped is None
    assert mmio.find(pb.MEM_BASE) == (None, 0)


def test_bar_over_another_device_is_not_decoded(machine, dev, cfg, caplog):
    other = Regs()
    machine.pio_bus.register(0x3F8, 8, other)
    with caplog.at_level(logging.WARNING, logger="pyvmm.pci"):
        cfg.write(dev.slot, pd.BAR0, 4, 0x3C0)     # 0x3C0..0x3FF overlaps 0x3F8
    assert dev.bars[0].mapped is None and "not decoded" in caplog.text
    assert machine.pio_bus.find(0x3F8) == (other, 0)
    assert machine.pio_bus.find(pb.IO_BASE) == (None, 0)
    cfg.write(dev.slot, pd.BAR0, 4, 0x8000)
    assert dev.bars[0].mapped == 0x8000


def test_capability_list():
    d = pd.PciDevice(0x1AF4, 0x1000, 0x020000)
    assert d.read_config(pd.STATUS, 2) & pd.STATUS_CAP_LIST == 0
    a = d.add_capability(0x09, b"\x08\x01\x02\x03\x04\x05")   # vendor-specific
    b = d.add_capability(0x05, bytes(12), wmask=b"\x01\x00")  # MSI-like
    assert d.read_config(pd.STATUS, 2) & pd.STATUS_CAP_LIST
    assert d.read_config(pd.CAPABILITY_LIST, 1) == a == 0x40
    assert d.read_config(a, 2) == (b << 8) | 0x09 and d.read_config(b, 2) == 0x05
    assert d.read_config(a + 2, 1) == 0x08
    d.write_config(b + 2, 2, 0xFFFF)
    assert d.read_config(b + 2, 2) == 0x0001
    d.write_config(a, 2, 0)                        # ID and next pointer are read-only
    assert d.read_config(a, 2) == (b << 8) | 0x09


def test_intx_line_status_and_disable():
    levels = []
    d = pd.PciDevice(0x1AF4, 0x1001, 0x010000, irq_pin=pd.PIN_INTA, irq_line=levels.append)
    d.set_intx(1)
    assert levels == [1] and d.read_config(pd.STATUS, 2) & pd.STATUS_INTERRUPT
    d.set_intx(1)                                  # already asserted: no new call
    assert levels == [1]
    d.write_config(pd.COMMAND, 2, pd.CMD_INTX_DISABLE)
    assert levels == [1, 0] and d.read_config(pd.STATUS, 2) & pd.STATUS_INTERRUPT
    d.set_intx(0)
    assert levels == [1, 0] and not d.read_config(pd.STATUS, 2) & pd.STATUS_INTERRUPT
    d.set_intx(1)
    assert levels == [1, 0]
    d.write_config(pd.COMMAND, 2, 0)
    assert levels == [1, 0, 1]


def test_slots_fill_in_order(machine):
    bus = machine.pci_bus
    a = pd.PciDevice(1, 2, 0xFF0000)
    b = pd.PciDevice(1, 3, 0xFF0000)
    assert bus.add(a) == 1 and bus.add(b) == 2
    with pytest.raises(ValueError):
        bus.add(pd.PciDevice(1, 4, 0xFF0000), slot=2)


def test_bad_bars():
    d = pd.PciDevice(1, 2, 0xFF0000)
    for size, io in ((3, True), (512, True), (8, False)):
        with pytest.raises(ValueError):
            d.add_bar(0, size, Regs(), io=io)
