"""MP table layout and checksums (MP spec 1.4)."""
import struct

import pytest

from vmm.arch.x86 import layout as L, mptable


def parse(blob):
    sig, ptr, length, rev, csum = struct.unpack_from("<4sIBBB", blob, 0)
    assert sig == b"_MP_" and length == 1 and rev == 4
    assert sum(blob[:16]) % 256 == 0
    assert ptr == L.EBDA_START + 16
    t = blob[16:]
    sig, tlen, rev, csum, oem, prod, _, _, count, lapic = struct.unpack_from("<4sHBB8s12sIHHI", t, 0)
    assert sig == b"PCMP" and rev == 4 and lapic == L.LAPIC_ADDR
    assert sum(t[:tlen]) % 256 == 0
    entries, off = [], 44
    for _ in range(count):
        kind = t[off]
        size = 20 if kind == 0 else 8
        entries.append(t[off:off + size])
        off += size
    assert off == tlen
    return entries


@pytest.mark.parametrize("cpus", [1, 2, 8, 32])
def test_cpus_ioapic_and_routing(cpus):
    entries = parse(mptable.build(cpus))
    procs = [e for e in entries if e[0] == 0]
    assert [p[1] for p in procs] == list(range(cpus))          # LAPIC IDs
    assert [p[3] for p in procs] == [3] + [1] * (cpus - 1)     # BSP flag on CPU 0 only
    ioapic = [e for e in entries if e[0] == 2]
    assert len(ioapic) == 1
    _, ioapic_id, _, flags, addr = struct.unpack("<BBBBI", ioapic[0])
    assert ioapic_id == cpus and flags == 1 and addr == L.IOAPIC_ADDR
    ints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3]
    assert [(i[4], i[6]) for i in ints] == [(irq, irq) for irq in range(16)]
    assert all(i[5] == ioapic_id for i in ints)
    lints = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 4]
    assert [(l[1], l[6]) for l in lints] == [(3, 0), (1, 1)]   # ExtINT on LINT0, NMI on LINT1
    assert sum(1 for e in entries if e[0] == 1) == 1           # the ISA bus


def test_pci_routing_entries():
    """PCI bus 0 is MP bus 0 (Linux matches the bus number); more in tests/unit/pci."""
    entries = parse(mptable.build(1, pci_irqs=[(1, 0, 10), (2, 0, 11)]))
    buses = [(e[1], e[2:8]) for e in entries if e[0] == 1]
    assert buses == [(0, b"PCI   "), (1, b"ISA   ")]
    pci = [struct.unpack("<BBHBBBB", e) for e in entries if e[0] == 3 and e[4] == 0]
    assert [(p[4], p[6]) for p in pci] == [((1 << 2) | 0, 10), ((2 << 2) | 0, 11)]


@pytest.mark.parametrize("cpus", [0, 33])
def test_cpu_count_bounds(cpus):
    with pytest.raises(ValueError):
        mptable.build(cpus)


def test_fits_in_the_reserved_area():
    assert len(mptable.build(mptable.MAX_CPUS)) <= 0x100000 - L.EBDA_START
