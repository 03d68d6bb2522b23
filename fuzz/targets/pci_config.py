"""Fuzz target: PCI configuration space through configuration mechanism #1
(vmm/pci/bus.py, vmm/pci/device.py): any access of any size at 0xCF8-0xCFF,
BAR sizing and moves, decode enables, with two legacy virtio-pci functions
(blk and net) and the host bridge on the bus.

Invariants after every access: reads fit their size; IDs and header type
never change; a BAR reads back its size mask's low bits (I/O: bit 0 set);
every BAR the device says is decoded is on the port bus at that address with
that handler, decoded BARs never overlap, and a BAR with I/O decoding off is
not on the bus."""
from fuzzlib import Provider, SockBackend, check, check_no_errors, disk_image, guest_memory

from vmm.bus import Bus
from vmm.pci import bus as pci_bus
from vmm.pci import device as pd
from vmm.virtio.blk import BlkDevice
from vmm.virtio.net import NetDevice
from vmm.virtio.pci_legacy import VirtioPciLegacy


def _check(bus, pio, fns):
    for slot, fn in fns:
        check(fn.get(pd.VENDOR_ID, 2) in (0x1AF4, pci_bus.HOST_VENDOR), f"slot {slot} vendor")
        check(fn.get(pd.HEADER_TYPE, 1) == 0, "header type")
        for bar in fn.bars.values():
            raw = fn.get(bar.offset, 4)
            check(raw & 1 == 1 and raw & (bar.size - 1) == 1, f"BAR{bar.index} raw {raw:#x}")
            if bar.mapped is not None:
                check(fn.get(pd.COMMAND, 2) & pd.CMD_IO, "decoded with I/O space off")
                dev, off = pio.find(bar.mapped)
                check(dev is bar.handler and off == 0, f"BAR at {bar.mapped:#x} not on the bus")
    spans = sorted((b.mapped, b.mapped + b.size) for _, fn in fns for b in fn.bars.values()
                   if b.mapped is not None)
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
        check(a1 <= b0, f"BARs overlap at {b0:#x}")


def one_input(data):
    p = Provider(data)
    mem = guest_memory()
    pio = Bus("pio")
    bus = pci_bus.PciBus(pio, Bus("mmio"))
    pio.register(pci_bus.CONFIG_ADDRESS, pci_bus.PORTS, bus)
    backend = SockBackend()
    ts = [VirtioPciLegacy(BlkDevice(disk_image()), mem),
          VirtioPciLegacy(NetDevice(backend), mem)]
    try:
        fns = [(0, bus.host_bridge)] + [(bus.add(t.pci, irq=5 + i), t.pci) for i, t in enumerate(ts)]
        for _ in range(128):
            if not p.left:
                break
            op = p.byte()
            if op & 1:               # select a register (dword write to 0xCF8, or not)
                slot = p.pick((1, 2, 0, 3, 1, 2))
                value = pci_bus.ENABLE | slot << 11 | (p.byte() & 0xFC)
                if op & 2:
                    value = p.int(4)
                size = p.pick((4, 4, 1, 2))
                pio.write(pci_bus.CONFIG_ADDRESS + (op >> 6 if op & 4 else 0), size,
                          value & ((1 << (8 * size)) - 1))
            size = p.pick((4, 1, 2, 4))
            port = pci_bus.CONFIG_ADDRESS + p.byte() % 8
            if op & 8:
                v = pio.read(port, size)
                check(0 <= v < 1 << (8 * size), f"read {v:#x}")
            else:
                pio.write(port, size, p.pick((0xFFFFFFFF, 0, p.int(4), 0xC001, 1, 0x407))
                          & ((1 << (8 * size)) - 1))
            check_no_errors()
            _check(bus, pio, fns)
    finally:
        for t in ts:
            t.close()
        backend.close()
