"""Fuzz target: the two virtio-blk engines against each other (differential).

BlkDevice runs requests in C (native/src/blk.c + virtq.c) or, with
native=False, in Python (PyRing + BlkDevice._request_py), "decision for
decision" the same algorithm.  The input is the guest: a header (queue size,
EVENT_IDX / INDIRECT_DESC, per-call budget, ring addresses, number of kicks) and guest RAM
from gpa 0.  Both engines run the same kicks on the same memory and image;
afterwards guest memory, the image, the interrupts signalled, the requests
and I/O errors counted and the queue error (DEVICE_NEEDS_RESET reason) must
be identical.  Any difference is a bug in one of them."""
import hashlib
import os
import struct

import numpy as np

from fuzzlib import Broken, check_no_errors, disk_image

from vmm import memory
from vmm.virtio import device as vd
from vmm.virtio.blk import BlkDevice
from vmm.virtio.queue import Virtqueue

HDR = struct.Struct("<BBHHHB")       # log2 size, flags, desc, avail, used, kicks
RAM = 1 << 16                        # the fuzz input fills guest RAM from 0 up to this
_mem = None


def small_memory():
    """256 KiB of guest RAM (below the VMM's 16 MiB minimum, which is about
    booting, not devices): every input clears and compares all of it."""
    global _mem
    if _mem is None:
        saved, memory.MIN_MEM = memory.MIN_MEM, 256 << 10
        try:
            _mem = memory.GuestMemory(256 << 10)
        finally:
            memory.MIN_MEM = saved
    return _mem


class Recorder:
    """The transport side of the device contract, recording what it is told."""

    def __init__(self):
        self.events = []

    def used(self, queue_index=0):
        self.events.append("used")

    def config(self):
        self.events.append("config")

    def needs_reset(self, reason):
        self.events.append(f"reset: {reason}")


def run(native, data, size, flags, addrs, kicks):
    mem = small_memory()
    mem.array[:] = 0
    mem.write(0, data[:RAM])
    image = disk_image()
    dev = BlkDevice(image, native=native, serial=b"diff", queue_size=max(size, 4))
    dev.budget = flags >> 2         # 0: the default
    try:
        dev.acked_features = ((vd.bit(vd.VIRTIO_F_RING_EVENT_IDX) if flags & 1 else 0)
                              | (vd.bit(vd.VIRTIO_F_RING_INDIRECT_DESC) if flags & 2 else 0))
        q = Virtqueue(0, dev.queue_max_sizes[0])
        q.size, q.ready = size, True
        q.desc, q.driver, q.device = addrs
        rec = Recorder()
        try:
            dev.activate(mem, [q], rec)
        except Exception as e:          # documented: QueueError for a bad ring
            rec.events.append(f"activate: {type(e).__name__} {e}")
        else:
            for _ in range(kicks):
                dev.queue_notify(0)
        with open(image, "rb") as f:
            disk = f.read()
        # numpy copy / compare: atheris hooks Python-level comparisons of bytes
        return mem.array.copy(), hashlib.sha256(disk).digest(), rec.events, dict(dev.stats)
    finally:
        dev.close()


def one_input(data):
    if len(data) < HDR.size:
        return
    log2, flags, desc, avail, used, kicks = HDR.unpack_from(data)
    size = 1 << (log2 % 9)
    args = (data[HDR.size:], size, flags, (desc, avail, used), 1 + kicks % 3)
    c, py = run(True, *args), run(False, *args)
    check_no_errors()
    if not np.array_equal(c[0], py[0]):
        i = int(np.flatnonzero(c[0] != py[0])[0])
        raise Broken(f"engines differ in guest memory at {i:#x}: C {c[0][i]:#04x} "
                     f"Python {py[0][i]:#04x}")
    for what, a, b in zip(("image", "events", "stats"), c[1:], py[1:]):
        if a != b:
            raise Broken(f"engines differ in {what}: C {a} Python {b}")

if __name__ == "__main__":      # replay one input by hand
    import sys
    one_input(open(sys.argv[1], "rb").read())
    print("same", os.path.basename(sys.argv[1]))
