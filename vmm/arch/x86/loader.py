"""Kernel image loading: bzImage (Linux boot protocol 2.06+, 64-bit entry)
and uncompressed ELF vmlinux (its 64-bit entry with a synthesized zero page).

Returns a KernelImage telling where the kernel sits and where to enter; the
zero page itself is written by vmm/arch/x86/boot.py.
"""
from __future__ import annotations

import struct

from vmm.arch.x86.layout import HIGH_MEM
from vmm.native import lib
from vmm.record import Record

HDRS_MAGIC = 0x53726448    # "HdrS" (boot protocol header signature)
MIN_PROTOCOL = 0x0206
ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
PT_LOAD = 1


class KernelError(Exception):
    """The kernel file cannot be booted; the message is one line for the user."""


class KernelImage(Record):
    kind: str              # "bzImage" or "elf"
    entry: int             # guest-physical 64-bit entry point
    start: int             # lowest guest-physical byte the kernel occupies
    end: int               # one past the highest (including its init_size)
    setup_header: bytes    # bzImage: header bytes from 0x1f1; ELF: b""
    initrd_addr_max: int
    cmdline_max: int       # bytes including the terminating NUL


def load_kernel(path, memory):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise KernelError(f"cannot read kernel {path}: {e.strerror}") from None
    if data[:4] == ELF_MAGIC:
        return _load_elf(path, data, memory)
    if len(data) > 0x264 and struct.unpack_from("<I", data, 0x202)[0] == HDRS_MAGIC:
        return _load_bzimage(path, data, memory)
    raise KernelError(f"{path} is neither a bzImage nor an ELF vmlinux")


def _check_fits(path, memory, start, end):
    try:
        memory.offset(start, end - start)
    except Exception:
        need = (end + (1 << 20) - 1) >> 20
        raise KernelError(f"kernel {path} needs guest RAM up to {need} MiB; "
                          f"give the guest more memory (--mem)") from None


def _load_bzimage(path, data, memory):
    version = struct.unpack_from("<H", data, 0x206)[0]
    if version < MIN_PROTOCOL:
        raise KernelError(f"{path}: boot protocol {version >> 8}.{version & 0xff:02d} "
                          f"is too old (need 2.06+)")
    loadflags = data[0x211]
    xloadflags = struct.unpack_from("<H", data, 0x236)[0]
    if not loadflags & lib.LOADED_HIGH:
        raise KernelError(f"{path}: zImage kernels (loaded low) are not supported")
    if not xloadflags & lib.XLF_KERNEL_64:
        raise KernelError(f"{path}: kernel has no 64-bit entry point (not an x86_64 bzImage)")
    setup_sects = data[0x1f1] or 4
    kernel_off = (setup_sects + 1) * 512
    payload = data[kernel_off:]
    if not payload:
        raise KernelError(f"{path}: truncated bzImage")
    # The setup header runs from 0x1f1 to 0x202 + the byte at 0x201 (§ "The
    # real-mode kernel header": the jump's offset gives the header's end).
    hdr_end = min(0x202 + data[0x201], 0x1f1 + 123)
    setup_header = data[0x1f1:hdr_end]
    init_size = struct.unpack_from("<I", data, 0x260)[0]
    pref_address = struct.unpack_from("<Q", data, 0x258)[0]
    load = HIGH_MEM
    # The decompressor works in [load, load+init_size) and, for a
    # non-relocatable kernel, at pref_address; both must be RAM.
    end = max(load + len(payload), load + init_size, pref_address + init_size)
    _check_fits(path, memory, load, end)
    memory.write(load, payload)
    return KernelImage(
        kind="bzImage",
        entry=load + 0x200,   # startup_64 sits 0x200 into the protected-mode code
        start=load,
        end=end,
        setup_header=setup_header,
        initrd_addr_max=struct.unpack_from("<I", data, 0x22c)[0],
        cmdline_max=struct.unpack_from("<I", data, 0x238)[0] + 1 if version >= 0x0206 else 256,
    )


def _load_elf(path, data, memory):
    if len(data) < 64 or data[4] != 2 or data[5] != 1:
        raise KernelError(f"{path}: not a 64-bit little-endian ELF file")
    e_machine = struct.unpack_from("<H", data, 18)[0]
    if e_machine != EM_X86_64:
        raise KernelError(f"{path}: ELF machine {e_machine} is not x86_64")
    e_entry, e_phoff = struct.unpack_from("<QQ", data, 24)
    e_phentsize, e_phnum = struct.unpack_from("<HH", data, 54)
    start, end = None, 0
    segments = []
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if off + 56 > len(data):
            raise KernelError(f"{path}: truncated ELF program headers")
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = \
            struct.unpack_from("<IIQQQQQQ", data, off)
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data):
            raise KernelError(f"{path}: malformed ELF segment {i}")
        segments.append((p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
        start = p_paddr if start is None else min(start, p_paddr)
        end = max(end, p_paddr + p_memsz)
    if not segments:
        raise KernelError(f"{path}: ELF file has no loadable segments")
    _check_fits(path, memory, start, end)
    if not start <= e_entry < end:
        raise KernelError(f"{path}: ELF entry point 0x{e_entry:x} is outside the image")
    for paddr, payload, memsz in segments:
        memory.write(paddr, payload)
        memory.fill(paddr + len(payload), memsz - len(payload))
    return KernelImage(kind="elf", entry=e_entry, start=start, end=end, setup_header=b"",
                       initrd_addr_max=0x7FFFFFFF, cmdline_max=2048)
