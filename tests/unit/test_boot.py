"""Zero page, e820, kernel loading, command line and initrd placement."""
import struct

import pytest

from vmm.testing.tinyguest import make_elf, HLT_LOOP, LOAD_ADDR
from vmm.arch.x86 import boot, layout as L, loader
from vmm.memory import GiB, MiB, GuestMemory, GuestMemoryError
from vmm.native import ffi


def fake_bzimage(path, version=0x020F, xload=0x1, loadflags=0x1, init_size=0x400000,
                 payload=b"\x90" * 4096):
    setup_sects = 4
    hdr = bytearray((setup_sects + 1) * 512)
    hdr[0x1f1] = setup_sects
    struct.pack_into("<H", hdr, 0x1fe, 0xAA55)
    hdr[0x200] = 0xEB
    hdr[0x201] = 0x6A                                   # header ends at 0x26c
    struct.pack_into("<IH", hdr, 0x202, 0x53726448, version)
    hdr[0x211] = loadflags
    struct.pack_into("<I", hdr, 0x214, 0x100000)
    struct.pack_into("<I", hdr, 0x22c, 0x7FFFFFFF)      # initrd_addr_max
    struct.pack_into("<I", hdr, 0x230, 0x200000)
    struct.pack_into("<H", hdr, 0x236, xload)
    struct.pack_into("<I", hdr, 0x238, 2047)            # cmdline_size
    struct.pack_into("<Q", hdr, 0x258, 0x1000000)       # pref_address
    struct.pack_into("<I", hdr, 0x260, init_size)
    path.write_bytes(bytes(hdr) + payload)
    return str(path)


@pytest.fixture
def mem():
    m = GuestMemory(64 * MiB)
    yield m
    m.close()


def zero_page(mem):
    return ffi.cast("struct boot_params *", mem.host_addr(L.ZERO_PAGE, 4096))


def test_bzimage_loaded_at_1mib_and_entry_is_startup_64(tmp_path, mem):
    k = loader.load_kernel(fake_bzimage(tmp_path / "bz", payload=b"KERNEL" + bytes(100)), mem)
    assert k.kind == "bzImage"
    assert k.entry == 0x100000 + 0x200
    assert mem.read(0x100000, 6) == b"KERNEL"
    assert k.cmdline_max == 2048


def test_zero_page_fields(tmp_path, mem):
    k = loader.load_kernel(fake_bzimage(tmp_path / "bz"), mem)
    rd = tmp_path / "initrd"
    rd.write_bytes(b"R" * 10000)
    initrd = boot.load_initrd(str(rd), mem, k)
    assert boot.write_zero_page(mem, k, "console=ttyS0 foo", initrd) == L.ZERO_PAGE
    bp = zero_page(mem)
    assert bp.hdr.boot_flag == 0xAA55
    assert bp.hdr.header == 0x53726448
    assert bp.hdr.version == 0x020F                     # copied from the kernel
    assert bp.hdr.type_of_loader == 0xFF
    assert bp.hdr.loadflags & 0x1
    assert bp.hdr.cmd_line_ptr == L.CMDLINE_ADDR
    assert mem.read(L.CMDLINE_ADDR, 18) == b"console=ttyS0 foo\0"
    assert bp.hdr.ramdisk_image == initrd.addr and bp.hdr.ramdisk_size == 10000
    # Offsets straight from the boot protocol document, as a cross-check of
    # the compiler-provided layout.
    raw = mem.read(L.ZERO_PAGE, 4096)
    assert struct.unpack_from("<H", raw, 0x1fe)[0] == 0xAA55
    assert struct.unpack_from("<I", raw, 0x228)[0] == L.CMDLINE_ADDR
    assert struct.unpack_from("<I", raw, 0x218)[0] == initrd.addr
    assert raw[0x1e8] == bp.e820_entries


def test_initrd_is_high_page_aligned_and_above_kernel(tmp_path, mem):
    k = loader.load_kernel(fake_bzimage(tmp_path / "bz"), mem)
    rd = tmp_path / "initrd"
    rd.write_bytes(b"x" * 5000)
    initrd = boot.load_initrd(str(rd), mem, k)
    assert initrd.addr % 4096 == 0
    assert initrd.addr + initrd.size <= 64 * MiB
    assert initrd.addr >= 64 * MiB - 3 * 4096
    assert initrd.addr >= k.end
    assert mem.read(initrd.addr, 5000) == b"x" * 5000


def test_initrd_that_does_not_fit_is_rejected(tmp_path, mem):
    k = loader.load_kernel(fake_bzimage(tmp_path / "bz"), mem)
    rd = tmp_path / "big"
    rd.write_bytes(bytes(50 * MiB))
    with pytest.raises(loader.KernelError, match="does not fit"):
        boot.load_initrd(str(rd), mem, k)


def test_e820_map_low_memory():
    m = GuestMemory(64 * MiB)
    try:
        assert boot.e820_map(m) == [
            (0, 0x9FC00, L.E820_RAM),
            (0x9FC00, 0x100000 - 0x9FC00, L.E820_RESERVED),
            (0x100000, 64 * MiB - 0x100000, L.E820_RAM),
        ]
    finally:
        m.close()


def test_e820_map_splits_around_the_mmio_hole():
    m = GuestMemory(4 * GiB)
    try:
        e = boot.e820_map(m)
        assert e[2] == (0x100000, 3 * GiB - 0x100000, L.E820_RAM)
        assert e[3] == (4 * GiB, 1 * GiB, L.E820_RAM)
        with pytest.raises(GuestMemoryError):
            m.read(3 * GiB, 1)                           # the hole is not RAM
    finally:
        m.close()


@pytest.mark.parametrize("kwargs,message", [
    (dict(version=0x0205), "too old"),
    (dict(xload=0), "no 64-bit entry"),
    (dict(loadflags=0), "zImage"),
])
def test_bad_bzimages_rejected(tmp_path, mem, kwargs, message):
    with pytest.raises(loader.KernelError, match=message):
        loader.load_kernel(fake_bzimage(tmp_path / "bz", **kwargs), mem)


def test_kernel_larger_than_memory_rejected(tmp_path, mem):
    with pytest.raises(loader.KernelError, match="needs guest RAM"):
        loader.load_kernel(fake_bzimage(tmp_path / "bz", init_size=200 * MiB), mem)


def test_neither_elf_nor_bzimage(tmp_path, mem):
    p = tmp_path / "junk"
    p.write_bytes(b"hello world" * 100)
    with pytest.raises(loader.KernelError, match="neither a bzImage nor an ELF"):
        loader.load_kernel(str(p), mem)


def test_elf_segments_loaded_at_paddr(tmp_path, mem):
    k = loader.load_kernel(make_elf(HLT_LOOP, str(tmp_path / "k.elf")), mem)
    assert k.kind == "elf" and k.entry == LOAD_ADDR
    assert mem.read(LOAD_ADDR, len(HLT_LOOP)) == HLT_LOOP
    boot.write_zero_page(mem, k, "x")
    bp = zero_page(mem)
    assert bp.hdr.boot_flag == 0xAA55 and bp.hdr.header == 0x53726448


def test_cmdline_too_long(tmp_path, mem):
    k = loader.load_kernel(make_elf(HLT_LOOP, str(tmp_path / "k.elf")), mem)
    with pytest.raises(loader.KernelError, match="command line"):
        boot.write_zero_page(mem, k, "a" * 3000)


@pytest.mark.parametrize("size", [1 * MiB, 2 << 40, 64 * MiB + 1])
def test_memory_size_out_of_range(size):
    with pytest.raises(ValueError):
        GuestMemory(size)
