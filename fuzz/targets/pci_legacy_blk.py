"""Fuzz target: legacy virtio-pci over virtio-blk, reached through the PCI bus (config mechanism #1 and BAR0 wherever the guest moves it).
Register reads/writes, status changes, mock-driver initialization and
requests, ring scribbles and bare notifications in any order (fuzzlib.drive)."""
from fuzzlib import drive


def one_input(data):
    drive(data, "pci", "blk")
