"""Tiny ring-0 test guests: a 64-bit ELF whose entry point runs a few bytes
of machine code (entered through the VMM's normal 64-bit boot path), so
exits, devices and exit statuses can be tested in milliseconds."""
import struct

LOAD_ADDR = 0x200000


def make_elf(code, path):
    """Write an ELF64 x86_64 executable with one PT_LOAD segment holding
    `code` at LOAD_ADDR (= entry point)."""
    ehdr_size, phdr_size = 64, 56
    offset = ehdr_size + phdr_size
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       2, 62, 1, LOAD_ADDR, ehdr_size, 0, 0, ehdr_size, phdr_size, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, offset, LOAD_ADDR, LOAD_ADDR, len(code), len(code), 0x1000)
    with open(path, "wb") as f:
        f.write(ehdr + phdr + code)
    return path


def out_byte(port, value):
    """mov dx, port; mov al, value; out dx, al"""
    return b"\x66\xba" + struct.pack("<H", port) + b"\xb0" + bytes([value]) + b"\xee"


def serial_text(text):
    return b"".join(out_byte(0x3F8, b) for b in text.encode())


HLT_LOOP = b"\xf4\xeb\xfd"              # hlt; jmp hlt
CLI_HLT = b"\xfa\xf4\xeb\xfd"           # cli; hlt; jmp hlt (power off, as Linux's halt)
UD2 = b"\x0f\x0b"                       # #UD with no IDT -> triple fault
RESET = out_byte(0x64, 0xFE) + HLT_LOOP  # i8042 reset
PANIC = out_byte(0x505, 1) + HLT_LOOP    # pvpanic PANICKED
