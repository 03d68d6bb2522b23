"""PCI bus 0 behind configuration mechanism #1 (PCI Local Bus Specification
3.0 §3.2.2.3.2), with a host bridge at 00:00.0 and devices in the next slots.

CONFIG_ADDRESS (0xCF8) is latched only by dword writes (bit 31 enable,
23:16 bus, 15:11 device, 10:8 function, 7:2 register); other accesses to
0xCF8-0xCFB are not configuration cycles (reads float high, writes are
dropped: Linux's type 1 probe writes a byte to 0xCFB).  CONFIG_DATA
(0xCFC-0xCFF) takes byte, word and dword accesses at any of its offsets: the
access reaches register + (port - 0xCFC).  Absent devices, functions 1-7 and
other bus numbers read as all ones (vendor 0xFFFF, §6.1).

The bus plays firmware for the devices it is given: BARs get addresses (I/O
from 0xC000 as SeaBIOS assigns them, memory from 0xE0000000) with decoding
enabled, and whenever the guest moves a BAR or turns decoding off the
handler follows on the machine's port or memory bus; a device's optional
`bar_moved(bar, old, new)` hook then moves what KVM decodes by itself
(ioeventfds).  A memory BAR the guest puts over RAM or the platform's
fixed range (IOAPIC, LAPIC, KVM's TSS pages: 0xFEC00000 up to 4 GiB), or
over another device, is not decoded (an access there would never reach us,
or would steal the other device's); it is decoded again once moved to a
free place.  64-bit memory BARs are placed in the 32-bit hole as well.
"""
import logging

from vmm.bus import BusError
from vmm.pci import device as pd

log = logging.getLogger("pyvmm.pci")

CONFIG_ADDRESS, CONFIG_DATA, PORTS = 0xCF8, 0xCFC, 8
ENABLE = 0x80000000
ADDRESS_MASK = 0x80FFFFFC        # reserved bits 30:24 and 1:0 read as 0
SLOTS = 32
IO_BASE, IO_END = 0xC000, 0x10000
MEM_BASE, MEM_END = 0xE0000000, 0xFEC00000      # below the IOAPIC
PLATFORM = (0xFEC00000, 1 << 32)                # IOAPIC, LAPIC, TSS/identity map, reset vector
# Host bridge: class 06/00/00.  The ID is the one QEMU's generic host bridge
# uses (Red Hat, Inc. 1b36:0008); Linux has no quirks for it, and the class
# is what its pci_sanity_check() looks for on bus 0.
HOST_VENDOR, HOST_DEVICE, CLASS_HOST_BRIDGE = 0x1B36, 0x0008, 0x060000


class PciBus:
    def __init__(self, pio_bus=None, mmio_bus=None, ram=()):
        self.pio_bus, self.mmio_bus = pio_bus, mmio_bus
        # [start, end) ranges no memory BAR may cover: guest RAM and PLATFORM
        self.reserved = [(gpa, gpa + size) for gpa, size, *_ in ram] + [PLATFORM]
        self.address = 0
        self.devices = [None] * SLOTS
        self._io_next, self._mem_next = IO_BASE, MEM_BASE
        self.host_bridge = pd.PciDevice(HOST_VENDOR, HOST_DEVICE, CLASS_HOST_BRIDGE,
                                        name="host-bridge")
        self.add(self.host_bridge, slot=0)

    # --- devices ---
    def add(self, dev, slot=None, irq=None):
        """Put `dev` in `slot` (the first free one by default), assign its BARs
        and enable decoding as firmware would; `irq` goes in Interrupt Line.
        Returns the slot (device number)."""
        if slot is None:
            slot = next((s for s in range(1, SLOTS) if self.devices[s] is None), None)
            if slot is None:
                raise ValueError("PCI bus 0 is full")
        elif self.devices[slot] is not None:
            raise ValueError(f"PCI slot {slot} is taken")
        self.devices[slot] = dev
        dev.on_map = self._map
        if irq is not None:
            dev.set(pd.INTERRUPT_LINE, 1, irq, wmask=0xFF)
        cmd = 0
        for bar in sorted(dev.bars.values(), key=lambda b: -b.size):
            dev.program_bar(bar.index, self._allocate(bar))
            cmd |= pd.CMD_IO if bar.io else pd.CMD_MEMORY
        if cmd:
            dev.write_config(pd.COMMAND, 2, dev.get(pd.COMMAND, 2) | cmd)
        return slot

    def _allocate(self, bar):
        if bar.io:
            addr = (self._io_next + bar.size - 1) & ~(bar.size - 1)
            if addr + bar.size > IO_END:
                raise ValueError("PCI I/O space exhausted")
            self._io_next = addr + bar.size
        else:
            addr = (self._mem_next + bar.size - 1) & ~(bar.size - 1)
            if addr + bar.size > MEM_END:
                raise ValueError("PCI memory space exhausted")
            self._mem_next = addr + bar.size
        return addr

    def _map(self, dev, bar, old, new):
        """A BAR moved from `old` to `new` (None: not decoded); returns where
        it is decoded now (None when `new` overlaps another device)."""
        bus = self.pio_bus if bar.io else self.mmio_bus
        if new is not None and not bar.io and any(
                new < end and new + bar.size > start for start, end in self.reserved):
            log.warning("%s BAR%d at 0x%x overlaps RAM or the platform range: not decoded",
                        dev.name, bar.index, new)
            new = None
        if bus is not None:
            if old is not None:
                bus.unregister(old)
            if new is not None:
                try:
                    bus.register(new, bar.size, bar.handler)
                except BusError as e:
                    log.warning("%s BAR%d not decoded: %s", dev.name, bar.index, e)
                    new = None
        log.debug("%s BAR%d: %s -> %s", dev.name, bar.index,
                  None if old is None else hex(old), None if new is None else hex(new))
        hook = getattr(dev, "bar_moved", None)
        if hook is not None:
            hook(bar, old, new)
        return new

    def _target(self):
        """(device, register) CONFIG_ADDRESS selects, or (None, 0)."""
        a = self.address
        if not a & ENABLE or (a >> 16) & 0xFF or (a >> 8) & 7:
            return None, 0                  # disabled, bus != 0 or function != 0
        return self.devices[(a >> 11) & 0x1F], a & 0xFC

    # --- port I/O at 0xCF8..0xCFF ---
    def read(self, offset, size):
        if offset >= 4:
            dev, reg = self._target()
            if dev is not None:
                return dev.read_config(reg + offset - 4, size)
        elif offset == 0 and size == 4:
            return self.address
        return (1 << (8 * size)) - 1

    def write(self, offset, size, value):
        if offset >= 4:
            dev, reg = self._target()
            if dev is not None:
                dev.write_config(reg + offset - 4, size, value)
        elif offset == 0 and size == 4:
            self.address = value & ADDRESS_MASK


def get_or_create(machine):
    """The machine's PCI bus, created (and put on 0xCF8) on first use."""
    bus = getattr(machine, "pci_bus", None)
    if bus is None:
        mem = getattr(machine, "memory", None)
        bus = PciBus(machine.pio_bus, machine.mmio_bus, ram=mem.regions if mem is not None else ())
        machine.pio_bus.register(CONFIG_ADDRESS, PORTS, bus)
        machine.pci_bus = bus
    return bus
