"""Fuzz target: virtio-mmio over virtio-rng.
Register reads/writes, status changes, mock-driver initialization and
requests, ring scribbles and bare notifications in any order (fuzzlib.drive)."""
from fuzzlib import drive


def one_input(data):
    drive(data, "mmio", "rng")
