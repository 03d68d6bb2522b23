"""A tiny ring-0 guest that takes level-triggered interrupts through the
IOAPIC (for tests of PCI INTx on real KVM; see vmm/testing/tinyguest.py).

It loads an IDT with one 64-bit interrupt gate (VECTOR), masks both 8259
PICs (GSIs below 16 are wired to them too), enables its local APIC (SVR)
and programs IOAPIC pin `gsi` as Linux does for a PCI INTx line: fixed
delivery to APIC 0, level-triggered (active high: KVM's IOAPIC takes the
line level as given), unmasked; optionally makes a legacy virtio-pci
device live (an empty queue 0, DRIVER_OK).  Then it writes "R" to the serial port,
enables interrupts and halts in a loop.  Its handler, for interrupt k
(1, 2, ...):

    writes "I"
    if `isr_port` is given and k is even: reads the virtio ISR (the read
        acknowledges it, virtio 1.1 §4.1.4.5) and writes it as a digit
    EOI to the local APIC (a level interrupt: KVM passes the EOI to the
        IOAPIC, which is where a resample irqfd de-asserts the line)
    when k == count: writes "D", then resets the machine (i8042), with
        interrupts off; otherwise returns (iretq)

So with an ISR port, odd interrupts leave the ISR set: the line must come
back (the VMM re-asserts it on KVM's resample) before the guest acks it.
The serial writes are exits to the VMM taken on the vCPU thread: the
host can look at the VM's state at each one (the "D" comes after the last
EOI)."""
import struct

from vmm.testing import tinyguest as T

VECTOR = 0x30
STACK_TOP = 0x1F0000            # below the ELF's load address, free RAM
LAPIC, IOAPIC = 0xFEE00000, 0xFEC00000      # identity-mapped by the boot page tables
APIC_SVR, APIC_TPR, APIC_EOI = 0xF0, 0x80, 0xB0
IOAPIC_LEVEL = 1 << 15
BOOT_CS = 0x10
SERIAL = 0x3F8


def _out_serial(ch):
    return b"\x66\xba" + struct.pack("<H", SERIAL) + b"\xb0" + ch.encode() + b"\xee"


RING_PFN = 0x300                # an empty legacy ring at 3 MiB (zeroed RAM)


def code(gsi, count, isr_port=None, live_base=None):
    """Machine code (loaded at tinyguest.LOAD_ADDR) for the guest above.
    `live_base`: a legacy virtio-pci BAR0 port; first queue 0's ring goes at
    RING_PFN (QUEUE_PFN, an empty ring) and STATUS gets ACKNOWLEDGE|DRIVER|
    DRIVER_OK (7): the device goes live (its queue on the fast path)."""
    if not 0 <= gsi < 24 or not 1 <= count < 128:
        raise ValueError("gsi 0-23, count 1-127")
    base = T.LOAD_ADDR
    idt_entries = VECTOR + 1

    def main(idtr_addr):
        c = b"\xbc" + struct.pack("<I", STACK_TOP)                  # mov esp, STACK_TOP
        c += b"\x0f\x01\x1c\x25" + struct.pack("<I", idtr_addr)     # lidt [idtr]
        c += b"\xb0\xff\xe6\x21\xe6\xa1"                            # mask both PICs
        c += b"\xbf" + struct.pack("<I", LAPIC)                     # mov edi, LAPIC
        c += b"\xc7\x87" + struct.pack("<II", APIC_SVR, 0x1FF)      # SVR: enabled, spurious 0xff
        c += b"\xc7\x87" + struct.pack("<II", APIC_TPR, 0)          # TPR 0
        c += b"\xbe" + struct.pack("<I", IOAPIC)                    # mov esi, IOAPIC
        c += b"\xc7\x06" + struct.pack("<I", 0x11 + 2 * gsi)        # IOREGSEL: entry high
        c += b"\xc7\x46\x10" + struct.pack("<I", 0)                 # destination APIC 0
        c += b"\xc7\x06" + struct.pack("<I", 0x10 + 2 * gsi)        # IOREGSEL: entry low
        c += b"\xc7\x46\x10" + struct.pack("<I", VECTOR | IOAPIC_LEVEL)
        c += b"\x4d\x31\xc0"                                        # xor r8, r8 (count)
        if live_base is not None:     # legacy header: QUEUE_PFN at 8, STATUS at 18
            c += b"\x66\xba" + struct.pack("<H", live_base + 8)
            c += b"\xb8" + struct.pack("<I", RING_PFN) + b"\xef"           # out dx, eax
            c += b"\x66\xba" + struct.pack("<H", live_base + 18) + b"\xb0\x07\xee"
        c += _out_serial("R")
        c += b"\xfb"                                                # sti
        c += b"\xf4\xeb\xfd"                                        # hlt; jmp hlt
        return c

    def handler():
        c = b"\x50\x52"                                             # push rax; push rdx
        c += b"\x49\xff\xc0"                                        # inc r8
        c += _out_serial("I")
        if isr_port is not None:
            ack = (b"\x66\xba" + struct.pack("<H", isr_port) + b"\xec"   # in al, dx (ISR)
                   + b"\x04\x30"                                    # add al, '0'
                   + b"\x66\xba" + struct.pack("<H", SERIAL) + b"\xee")
            c += b"\x41\xf6\xc0\x01" + b"\x75" + bytes([len(ack)]) + ack  # odd: skip the ack
        c += b"\xc7\x87" + struct.pack("<II", APIC_EOI, 0)          # EOI
        done = _out_serial("D") + b"\xfa" + T.RESET
        c += b"\x49\x83\xf8" + bytes([count]) + b"\x75" + bytes([len(done)]) + done
        c += b"\x5a\x58\x48\xcf"                                    # pop rdx; pop rax; iretq
        return c

    # two passes: the handler's address depends on main's length only
    m_len = len(main(0))
    handler_addr = base + m_len
    h = handler()
    idt_off = (m_len + len(h) + 15) & ~15
    idt_addr = base + idt_off
    gate = struct.pack("<HHBBHIxxxx", handler_addr & 0xFFFF, BOOT_CS, 0, 0x8E,
                       (handler_addr >> 16) & 0xFFFF, handler_addr >> 32)
    idt = bytes(16 * VECTOR) + gate          # other vectors: not present (#NP -> triple fault)
    idtr = struct.pack("<HQ", 16 * idt_entries - 1, idt_addr)
    idtr_addr = idt_addr + len(idt)
    body = main(idtr_addr) + h
    return body + bytes(idt_off - len(body)) + idt + idtr


def make(path, gsi, count, isr_port=None, live_base=None):
    return T.make_elf(code(gsi, count, isr_port, live_base), path)


def ioapic_pin(vm, gsi):
    """(line level as the IOAPIC sees it (IRR bit), remote IRR) of pin
    `gsi`, from KVM_GET_IRQCHIP (struct kvm_ioapic_state: base u64,
    ioregsel u32, id u32, irr u32, pad u32, redirtbl u64[24])."""
    from vmm.kvm.state import save_vm
    blob = save_vm(vm)["ioapic"]
    chip = blob[8:]                         # after kvm_irqchip's chip_id and pad
    irr = struct.unpack_from("<I", chip, 16)[0]
    entry = struct.unpack_from("<Q", chip, 24 + 8 * gsi)[0]
    return (irr >> gsi) & 1, (entry >> 14) & 1
