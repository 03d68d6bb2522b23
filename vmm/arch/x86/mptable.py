"""MP table (Intel MultiProcessor Specification 1.4): floating pointer plus
configuration table listing the CPUs, the ISA bus, the IOAPIC, ISA interrupt
routing (identity, as KVM's default GSI routing is) and the local interrupts.
Linux finds it by scanning the last KiB of base memory (EBDA_START)."""
import struct

from vmm.arch.x86 import layout as L

MAX_CPUS = 32                  # what fits in the reserved KiB with room to spare
APIC_VERSION = 0x14
IOAPIC_VERSION = 0x11
ISA_IRQS = 16
IOAPIC_PINS = 24

# Entry types (MP spec table 4-3) and interrupt types (table 4-10).
PROCESSOR, BUS, IOAPIC, IO_INTERRUPT, LOCAL_INTERRUPT = 0, 1, 2, 3, 4
INT_VECTORED, INT_NMI, INT_EXTINT = 0, 1, 3
CPU_ENABLED, CPU_BSP = 1, 2
# I/O interrupt entry flags (MP spec 4.3.4, table 4-11): polarity bits 1:0,
# trigger mode bits 3:2.  PCI INTx lines are level-triggered, active low
# (PCI 3.0 §2.2.6); KVM's in-kernel IOAPIC ignores the polarity bit and takes
# KVM_IRQ_LINE level 1 as "asserted" whichever the guest programs.
POLARITY_ACTIVE_LOW, TRIGGER_LEVEL = 0x3, 0x3 << 2
PCI_INT_FLAGS = POLARITY_ACTIVE_LOW | TRIGGER_LEVEL
# Bus IDs.  Linux matches a PCI interrupt entry's source bus ID against the
# PCI bus number (IO_APIC_get_PCI_irq_vector), so PCI bus 0 must be MP bus 0;
# the ISA bus then takes ID 1, as in SeaBIOS's tables.  Without PCI the ISA
# bus is bus 0.
PCI_BUS_ID = 0
ISA_BUS_ID_WITH_PCI = 1
ISA_BUS_ID = 0


def checksum(data):
    """Byte that makes `data` sum to zero mod 256 (MP spec 4.1, 4.2)."""
    return (-sum(data)) & 0xFF


def _processor(apic_id, bsp, signature, features):
    flags = CPU_ENABLED | (CPU_BSP if bsp else 0)
    return struct.pack("<BBBBII8x", PROCESSOR, apic_id, APIC_VERSION, flags, signature, features)


def _bus(bus_id, name):
    return struct.pack("<BB6s", BUS, bus_id, name.ljust(6).encode())


def _ioapic(apic_id):
    return struct.pack("<BBBBI", IOAPIC, apic_id, IOAPIC_VERSION, 1, L.IOAPIC_ADDR)


def _io_int(kind, bus, src_irq, ioapic_id, pin, flags=0):
    return struct.pack("<BBHBBBB", IO_INTERRUPT, kind, flags, bus, src_irq, ioapic_id, pin)


def _local_int(kind, lint, bus):
    return struct.pack("<BBHBBBB", LOCAL_INTERRUPT, kind, 0, bus, 0, 0xFF, lint)


def build(cpu_count, signature=0x600, features=0x201, pci_irqs=()):
    """Bytes of the floating pointer followed by the configuration table, to
    be placed at EBDA_START.  `pci_irqs` is [(device, pin, ioapic_pin)] for
    PCI INTx routing (device number on bus 0, pin 0 = INTA#)."""
    if not 1 <= cpu_count <= MAX_CPUS:
        raise ValueError(f"--cpus must be between 1 and {MAX_CPUS}")
    ioapic_id = cpu_count      # after the LAPIC IDs 0..n-1
    entries = [_processor(i, i == 0, signature, features) for i in range(cpu_count)]
    isa = ISA_BUS_ID_WITH_PCI if pci_irqs else ISA_BUS_ID
    if pci_irqs:
        entries.append(_bus(PCI_BUS_ID, "PCI"))
    entries.append(_bus(isa, "ISA"))
    entries.append(_ioapic(ioapic_id))
    # ISA IRQ 0 is wired to the PIC's output (ExtINT) as well as pin 0, as the
    # KVM in-kernel IOAPIC routes GSI n to pin n.  An IOAPIC input given to a
    # PCI device loses its ISA entry (as SeaBIOS does), so the guest never
    # sees one pin described as both edge/high (ISA) and level/low (PCI).
    pci_pins = {ioapic_pin for _, _, ioapic_pin in pci_irqs}
    for irq in range(ISA_IRQS):
        if irq not in pci_pins:
            entries.append(_io_int(INT_VECTORED, isa, irq, ioapic_id, irq))
    for dev, pin, ioapic_pin in pci_irqs:
        # PCI source IRQ encoding (MP spec 4.3.4): device << 2 | pin.
        entries.append(_io_int(INT_VECTORED, PCI_BUS_ID, (dev << 2) | pin, ioapic_id, ioapic_pin,
                               PCI_INT_FLAGS))
    entries.append(_local_int(INT_EXTINT, 0, isa))
    entries.append(_local_int(INT_NMI, 1, isa))

    body = b"".join(entries)
    table_addr = L.EBDA_START + 16
    header = struct.pack("<4sHBB8s12sIHHIHBB", b"PCMP", 44 + len(body), 4, 0,
                         b"PYVMM   ", b"PYVMM 0.1   ", 0, 0, len(entries),
                         L.LAPIC_ADDR, 0, 0, 0)
    header = header[:7] + bytes([checksum(header + body)]) + header[8:]
    table = header + body
    fp = struct.pack("<4sIBBB5s", b"_MP_", table_addr, 1, 4, 0, bytes(5))
    fp = fp[:10] + bytes([checksum(fp)]) + fp[11:]
    blob = fp + table
    if len(blob) > L.HIGH_MEM - L.EBDA_START:
        raise ValueError("MP table too large")
    return blob


def write(memory, cpu_count, **kw):
    memory.write(L.EBDA_START, build(cpu_count, **kw))
