"""Tiny ring-0 guests for tests and benchmarks: a 64-bit ELF whose entry
point runs a few bytes of machine code, entered through the VMM's normal
64-bit boot path, so exits, devices and exit statuses can be checked in
milliseconds.  The ELF also carries a PVH entry note (Xen ELF note 18,
XEN_ELFNOTE_PHYS32_ENTRY) at the same address, so QEMU can boot the same file:
code built from these helpers means the same in 32-bit and 64-bit mode."""
import struct

LOAD_ADDR = 0x200000


XEN_ELFNOTE_PHYS32_ENTRY = 18
PT_LOAD, PT_NOTE = 1, 4


def make_elf(code, path):
    """Write an ELF64 x86_64 executable: one PT_LOAD segment holding `code`
    at LOAD_ADDR (the entry point) and a PT_NOTE with the PVH entry."""
    ehdr_size, phdr_size = 64, 56
    note = struct.pack("<III4sQ", 4, 8, XEN_ELFNOTE_PHYS32_ENTRY, b"Xen\0", LOAD_ADDR)
    note_off = ehdr_size + 2 * phdr_size
    code_off = note_off + len(note)
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       2, 62, 1, LOAD_ADDR, ehdr_size, 0, 0, ehdr_size, phdr_size, 2, 0, 0, 0)
    load = struct.pack("<IIQQQQQQ", PT_LOAD, 5, code_off, LOAD_ADDR, LOAD_ADDR,
                       len(code), len(code), 0x1000)
    pnote = struct.pack("<IIQQQQQQ", PT_NOTE, 4, note_off, 0, 0, len(note), len(note), 4)
    with open(path, "wb") as f:
        f.write(ehdr + load + pnote + note + code)
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

# Ring-0 loops for the control-API tests (pause/resume, Ctrl-Alt-Del):
# TICKER writes 'x' to the serial port, spins ~0x2000 iterations, repeats.
TICKER = (b"\xb9\x00\x20\x00\x00"        # mov ecx, 0x2000
          b"\xe2\xfe"                    # loop $
          + out_byte(0x3F8, ord("x"))
          + b"\xeb\xf0")                 # jmp back to mov ecx (-16)
# KBD_ECHO polls the i8042 status port and copies each byte of its output
# buffer, raw, to the serial port.
KBD_ECHO = (b"\xe4\x64"                  # in al, 0x64
            b"\xa8\x01"                  # test al, 1 (output buffer full)
            b"\x74\xfa"                  # jz back to the in
            b"\xe4\x60"                  # in al, 0x60
            b"\x66\xba\xf8\x03"          # mov dx, 0x3f8
            b"\xee"                      # out dx, al
            b"\xeb\xf1")                 # jmp to the start
