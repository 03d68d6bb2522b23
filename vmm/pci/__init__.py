"""PCI: configuration space of a function (device.py), bus 0 behind
configuration mechanism #1 at 0xCF8 (bus.py) and MSI-X (msix.py).  virtio
devices reach it through vmm/virtio/pci_legacy.py and pci_modern.py (the
transports) and their attachments (wiring into a Machine)."""
from vmm.pci.bus import PciBus, get_or_create
from vmm.pci.device import PciDevice

__all__ = ["PciBus", "PciDevice", "get_or_create"]
