"""The MP table's PCI routing (MP spec 1.4 §4.3.4): Linux looks up INTx of
device `slot` on PCI bus 0 as source bus 0, IRQ slot << 2 | pin."""
import struct

from vmm.arch.x86 import mptable


def parse(blob):
    """Entries of the configuration table after the 16-byte floating pointer."""
    t = blob[16:]
    tlen, count = struct.unpack_from("<H", t, 4)[0], struct.unpack_from("<H", t, 34)[0]
    assert t[:4] == b"PCMP" and sum(t[:tlen]) % 256 == 0
    entries, off = [], 44
    for _ in range(count):
        size = 20 if t[off] == mptable.PROCESSOR else 8
        entries.append(t[off:off + size])
        off += size
    assert off == tlen
    return entries


def io_ints(entries):
    return [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == mptable.IO_INTERRUPT]


def test_pci_bus_and_interrupt_entries():
    entries = parse(mptable.build(2, pci_irqs=[(1, 0, 5), (2, 0, 6), (3, 1, 7)]))
    buses = {e[1]: e[2:8] for e in entries if e[0] == mptable.BUS}
    assert buses == {0: b"PCI   ", 1: b"ISA   "}
    ioapic_id = 2
    pci = [i for i in io_ints(entries) if i[3] == 0]
    # (type, interrupt type, flags, bus, source irq, IOAPIC, pin)
    assert pci == [(3, 0, 0x0F, 0, 1 << 2 | 0, ioapic_id, 5),
                   (3, 0, 0x0F, 0, 2 << 2 | 0, ioapic_id, 6),
                   (3, 0, 0x0F, 0, 3 << 2 | 1, ioapic_id, 7)]
    assert mptable.PCI_INT_FLAGS == 0x0F          # level-triggered, active low


def test_pci_pins_lose_their_isa_entries():
    entries = parse(mptable.build(1, pci_irqs=[(1, 0, 10)]))
    isa = [i for i in io_ints(entries) if i[3] == 1]
    assert [i[4] for i in isa] == [irq for irq in range(16) if irq != 10]
    assert all(i[6] == i[4] and i[2] == 0 for i in isa)   # identity, conforming flags
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == mptable.LOCAL_INTERRUPT]
    assert [(l[1], l[6]) for l in lints] == [(3, 0), (1, 1)]


def test_without_pci_nothing_changes():
    entries = parse(mptable.build(1))
    assert [(e[1], e[2:8]) for e in entries if e[0] == mptable.BUS] == [(0, b"ISA   ")]
    assert [(i[3], i[4], i[6]) for i in io_ints(entries)] == [(0, irq, irq) for irq in range(16)]
