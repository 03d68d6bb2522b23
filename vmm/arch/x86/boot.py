"""Linux x86 boot protocol: the zero page (struct boot_params), command line,
initrd placement and the e820 memory map.  Layout of boot_params comes from
<asm/bootparam.h> through cffi (vmm.native)."""
from __future__ import annotations

import os

from vmm.arch.x86 import layout as L
from vmm.arch.x86.loader import KernelError
from vmm.memory import MMIO_HOLE_END
from vmm.native import ffi, lib
from vmm.record import Record

BOOT_FLAG = 0xAA55
HDRS_MAGIC = 0x53726448
LOADER_TYPE_UNDEFINED = 0xFF   # "bootloader not registered" (boot protocol)
PAGE = 4096


class Initrd(Record):
    addr: int
    size: int


def e820_map(memory):
    """[(addr, size, type)] for the guest: base memory below the EBDA, the
    EBDA/BIOS area reserved (the MP table lives there), RAM from 1 MiB, and
    the part above the MMIO hole if any."""
    entries = [(0, L.EBDA_START, L.E820_RAM),
               (L.EBDA_START, L.HIGH_MEM - L.EBDA_START, L.E820_RESERVED)]
    for gpa, size, _ in memory.regions:
        if gpa == 0:
            entries.append((L.HIGH_MEM, size - L.HIGH_MEM, L.E820_RAM))
        else:
            entries.append((gpa, size, L.E820_RAM))
    return entries


def load_initrd(path, memory, kernel):
    """Place the initrd page-aligned as high as the kernel allows, below the
    MMIO hole, above the kernel (boot protocol: ramdisk_image/size)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KernelError(f"cannot read initrd {path}: {e.strerror}") from None
    low_end = memory.regions[0][1]
    top = min(low_end, kernel.initrd_addr_max + 1)
    addr = (top - size) & ~(PAGE - 1)
    if size == 0 or addr < kernel.end:
        raise KernelError(f"initrd {path} ({size >> 20} MiB) does not fit in guest memory "
                          f"between the kernel and 0x{top:x}; give the guest more memory")
    memory.write(addr, data)
    return Initrd(addr, size)


def write_cmdline(memory, cmdline, kernel):
    raw = cmdline.encode() + b"\0"
    limit = min(kernel.cmdline_max, L.CMDLINE_MAX)
    if len(raw) > limit:
        raise KernelError(f"kernel command line is {len(raw) - 1} bytes; this kernel takes "
                          f"at most {limit - 1}")
    memory.write(L.CMDLINE_ADDR, raw)
    return len(raw)


def write_zero_page(memory, kernel, cmdline, initrd=None):
    """Fill struct boot_params at ZERO_PAGE; returns its address (for RSI)."""
    size = ffi.sizeof("struct boot_params")
    memory.fill(L.ZERO_PAGE, size)
    bp = ffi.cast("struct boot_params *", memory.host_addr(L.ZERO_PAGE, size))
    hdr = bp.hdr
    if kernel.setup_header:
        # Keep the kernel's own header fields (boot protocol: copy, then fill
        # the loader-written ones).
        ffi.memmove(ffi.addressof(hdr), kernel.setup_header, len(kernel.setup_header))
    else:
        hdr.boot_flag = BOOT_FLAG
        hdr.header = HDRS_MAGIC
        hdr.version = 0x020F
        hdr.kernel_alignment = 0x1000000
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED
    hdr.loadflags |= lib.LOADED_HIGH | lib.KEEP_SEGMENTS
    write_cmdline(memory, cmdline, kernel)
    hdr.cmd_line_ptr = L.CMDLINE_ADDR
    hdr.cmdline_size = min(kernel.cmdline_max, L.CMDLINE_MAX) - 1
    if initrd is not None:
        hdr.ramdisk_image = initrd.addr & 0xFFFFFFFF
        hdr.ramdisk_size = initrd.size & 0xFFFFFFFF
        bp.ext_ramdisk_image = initrd.addr >> 32
        bp.ext_ramdisk_size = initrd.size >> 32
    entries = e820_map(memory)
    if len(entries) > lib.E820_MAX_ENTRIES_ZEROPAGE:
        raise KernelError("too many e820 entries")
    for i, (addr, length, kind) in enumerate(entries):
        bp.e820_table[i].addr = addr
        bp.e820_table[i].size = length
        bp.e820_table[i].type = kind
    bp.e820_entries = len(entries)
    return L.ZERO_PAGE


__all__ = ["e820_map", "load_initrd", "write_zero_page", "write_cmdline", "Initrd",
           "MMIO_HOLE_END"]
