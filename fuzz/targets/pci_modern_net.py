"""Fuzz target: modern (or transitional) virtio-pci with MSI-X over
virtio-net, reached through the PCI bus (config mechanism #1, the 64-bit
BAR wherever the guest moves it: common/notify/ISR/device regions, MSI-X
table and PBA).  Register reads/writes, status changes, mock-driver
initialization (with or without MSI-X) and requests, ring scribbles and bare
notifications in any order (fuzzlib.drive)."""
from fuzzlib import drive


def one_input(data):
    drive(data, "pci-modern", "net")
