"""GDT and identity page tables for the 64-bit entry."""
import struct

from vmm.arch.x86 import layout as L, regs
from vmm.memory import GuestMemory, MiB


def test_gdt_descriptors():
    # Flat 64-bit code at __BOOT_CS, flat data at __BOOT_DS (boot protocol).
    assert regs.GDT[regs.BOOT_CS // 8] == 0x00AF9B000000FFFF
    assert regs.GDT[regs.BOOT_DS // 8] == 0x00CF93000000FFFF
    cs = regs.segment_from_gdt(regs.GDT[2], 2)
    assert cs["l"] == 1 and cs["db"] == 0 and cs["present"] == 1 and cs["s"] == 1
    assert cs["type"] == 0xB and cs["limit"] == 0xFFFFF and cs["g"] == 1 and cs["selector"] == 0x10
    ds = regs.segment_from_gdt(regs.GDT[3], 3)
    assert ds["db"] == 1 and ds["l"] == 0 and ds["type"] == 3 and ds["selector"] == 0x18


def test_gdt_and_page_tables_in_memory():
    m = GuestMemory(32 * MiB)
    try:
        regs.write_gdt(m)
        regs.write_page_tables(m)
        gdt = struct.unpack("<5Q", m.read(L.GDT_ADDR, 40))
        assert list(gdt) == regs.GDT
        pml4 = struct.unpack("<Q", m.read(L.PML4_ADDR, 8))[0]
        assert pml4 == L.PDPT_ADDR | 3
        pdpt = struct.unpack("<4Q", m.read(L.PDPT_ADDR, 32))
        assert [e & ~0xFFF for e in pdpt] == [L.PD_ADDR + i * 4096 for i in range(4)]
        # Walk a few addresses through the tables: identity, 2 MiB pages.
        for va in (0, 0x100000, 0x7654321, 0xBFFFFFFF, 0xFEE00000):
            pdpte = pdpt[va >> 30]
            pde = struct.unpack("<Q", m.read((pdpte & ~0xFFF) + ((va >> 21) & 511) * 8, 8))[0]
            assert pde & 0x83 == 0x83                  # present, writable, 2 MiB
            assert (pde & ~0x1FFFFF) + (va & 0x1FFFFF) == va
    finally:
        m.close()
