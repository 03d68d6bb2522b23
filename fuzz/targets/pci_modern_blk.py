"""Fuzz target: modern virtio-pci (MSI-X on a fake VM's routing table) over virtio-blk.
Register reads/writes, status changes, mock-driver initialization and
requests, ring scribbles and bare notifications in any order (fuzzlib.drive)."""
from fuzzlib import drive


def one_input(data):
    drive(data, "pci-modern", "blk")
