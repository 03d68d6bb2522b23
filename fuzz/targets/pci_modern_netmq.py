"""Fuzz target: modern virtio-pci over multiqueue virtio-net with its control queue (MQ, RX mode, MAC commands).
Register reads/writes, status changes, mock-driver initialization and
requests, ring scribbles and bare notifications in any order (fuzzlib.drive)."""
from fuzzlib import drive


def one_input(data):
    drive(data, "pci-modern", "netmq")
