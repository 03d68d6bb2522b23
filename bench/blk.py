"""virtio-blk throughput through the mock driver, against plain preadv.

    python -m bench.blk [--size-mib 256] [--reps 5] [--image PATH]

On a page-cached raw image: 4 KiB random reads per second and 64 KiB
sequential MB/s through VirtioMmio + BlkDevice (C engine and pure-Python
engine; the C engine also through legacy and modern virtio-pci, the latter
with MSI-X vectors on irqfds of a FakeVm), and the same reads done directly: os.preadv from Python, and a C
pread loop (the physical limit).  Each figure is min / median / max over
--reps repetitions; ratios use medians.  The driver side is vectorized
(numpy writes a whole batch of headers and avail entries, one QueueNotify per
batch of 128 requests, each an indirect descriptor of 3 buffers, as Linux
does), so what is measured is the device.
"""
import argparse
import os
import statistics
import time

import numpy as np

from vmm.memory import GuestMemory, MiB
from vmm.native import ffi, lib
from vmm.virtio import mmio as m
from vmm.virtio.blk import BlkDevice
from vmm.virtio import pci_legacy as pl
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.pci_legacy import VirtioPciLegacy
from vmm.virtio import pci_modern as pm
from vmm.testing.fakevm import FakeVm
from vmm.testing.mockdriver import MockDriver
from vmm.testing.pcimodern_regs import PciModernRegs
from vmm.virtio.queue import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

BATCH = 128
HDR = np.dtype([("type", "<u4"), ("reserved", "<u4"), ("sector", "<u8")])


class FastDriver:
    """Fixed request slots, so a batch costs a few numpy operations."""

    def __init__(self, dev, mem, req_len, transport="mmio"):
        self.mem = mem
        regs = None
        if transport == "pci":
            self.t = VirtioPciLegacy(dev, mem)
            self.notify = lambda: self.t.write(pl.QUEUE_NOTIFY, 2, 0)
            self.ack = lambda: self.t.read(pl.ISR, 1)          # what the guest's INTx handler does
        elif transport == "pci-modern":                         # MSI-X: no ISR read at all
            self.t = pm.VirtioPciModern(dev, mem, vm=FakeVm())
            self.notify = lambda: self.t.write(pm.NOTIFY, 2, 0)
            self.ack = lambda: None
            regs = lambda t: PciModernRegs(t, msix=True)
        else:
            self.t = VirtioMmio(dev, mem)
            self.notify = lambda: self.t.write(m.QUEUE_NOTIFY, 4, 0)
            self.ack = lambda: self.t.write(m.INTERRUPT_ACK, 4, self.t.read(m.INTERRUPT_STATUS, 4))
        self.d = MockDriver(self.t, mem, arena=0x10000, arena_size=48 * MiB, regs=regs)
        if not self.d.init():
            raise RuntimeError("feature negotiation failed")
        self.q = q = self.d.queues[0]
        d = self.d
        self.hdr_gpa = d.alloc(16 * BATCH, 16)
        self.data_gpa = d.alloc(req_len * BATCH, 4096)
        self.status_gpa = d.alloc(BATCH, 16)
        tables = d.alloc(48 * BATCH, 16)
        for k in range(BATCH):
            t = tables + 48 * k
            q.write_desc(0, self.hdr_gpa + 16 * k, 16, VRING_DESC_F_NEXT, 1, table=t)
            q.write_desc(1, self.data_gpa + req_len * k, req_len,
                         VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2, table=t)
            q.write_desc(2, self.status_gpa + k, 1, VRING_DESC_F_WRITE, 0, table=t)
            q.write_desc(k, t, 48, VRING_DESC_F_INDIRECT)
        self.headers = mem.view(self.hdr_gpa, 16 * BATCH).view(HDR)
        self.headers["type"] = 0                     # VIRTIO_BLK_T_IN
        self.status = mem.view(self.status_gpa, BATCH)
        off = mem.offset(q.avail)
        self.avail_ring = mem.array[off + 4:off + 4 + 2 * q.size].view("<u2")
        self.avail_idx = mem.array[off + 2:off + 4].view("<u2")
        off = mem.offset(q.used)
        self.used_idx = mem.array[off + 2:off + 4].view("<u2")
        self.used_event = mem.array[mem.offset(q.avail) + 4 + 2 * q.size:][:2].view("<u2")
        self.slots = np.arange(BATCH, dtype=np.uint16)
        self.idx = 0

    def run(self, sectors):
        """Read at every sector (a multiple of BATCH of them), batch by batch."""
        size = self.q.size
        for start in range(0, len(sectors), BATCH):
            self.headers["sector"] = sectors[start:start + BATCH]
            self.status[:] = 0xFF
            pos = (self.idx + self.slots) % size
            self.avail_ring[pos] = self.slots
            self.idx = (self.idx + BATCH) & 0xFFFF
            self.used_event[0] = self.idx
            self.avail_idx[0] = self.idx
            self.notify()
            if self.used_idx[0] != self.idx or self.status.any():
                raise RuntimeError(f"batch failed: used {self.used_idx[0]} != {self.idx}, "
                                   f"device status 0x{self.t.status:x}")
            self.ack()

    def close(self):
        self.t.close()


def make_image(path, size):
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        chunk = os.urandom(MiB)
        with open(path, "wb") as f:
            for _ in range(size // MiB):
                f.write(chunk)
    with open(path, "rb") as f:                      # into the page cache
        while f.read(8 * MiB):
            pass


def workload(kind, size, n, rng):
    if kind == "rand4k":
        return rng.integers(0, size // 4096, n, dtype=np.uint64) * 8, 4096
    count = size // 65536
    return (np.arange(n, dtype=np.uint64) % count) * 128, 65536


def time_reps(fn, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bench(args):
    size = args.size_mib * MiB
    make_image(args.image, size)
    rng = np.random.default_rng(1)
    mem = GuestMemory(64 * MiB)
    results = {}
    for kind, n_fast, n_slow in (("rand4k", args.requests, args.requests // 20),
                                 ("seq64k", size // 65536, size // 65536 // 8)):
        sectors, length = workload(kind, size, n_fast, rng)
        n_fast = len(sectors) // BATCH * BATCH
        sectors = sectors[:n_fast]
        n_slow = max(BATCH, n_slow // BATCH * BATCH)
        fd = os.open(args.image, os.O_RDONLY)
        buf = np.zeros(length, np.uint8)
        offs = (sectors * 512).astype(np.uint64)
        offs_c = ffi.cast("uint64_t *", offs.ctypes.data)
        bufp = ffi.cast("void *", buf.ctypes.data)
        mv = memoryview(buf)
        offs_list = offs.tolist()

        def py_preadv():
            for off in offs_list:
                os.preadv(fd, [mv], off)
        runs = {"preadv (C loop)": (n_fast, lambda: lib.pv_bench_pread(fd, bufp, length, offs_c, n_fast)),
                "os.preadv (Python)": (n_fast, py_preadv)}
        for label, native, n, transport in (("device, C engine", True, n_fast, "mmio"),
                                            ("device, C engine, legacy virtio-pci", True, n_fast, "pci"),
                                            ("device, C engine, modern virtio-pci", True, n_fast,
                                             "pci-modern"),
                                            ("device, Python engine", False, n_slow, "mmio")):
            dev = BlkDevice(args.image, readonly=True, native=native)
            drv = FastDriver(dev, mem, length, transport)
            drv.run(sectors[:BATCH])                 # warm up
            runs[label] = (n, lambda drv=drv, n=n: drv.run(sectors[:n]))
            results[(kind, label)] = (n, time_reps(runs[label][1], args.reps))
            drv.close()
        for label in ("preadv (C loop)", "os.preadv (Python)"):
            n, fn = runs[label]
            fn()
            results[(kind, label)] = (n, time_reps(fn, args.reps))
        os.close(fd)
    mem.close()
    report(results, args)


def report(results, args):
    print(f"virtio-blk via mock driver, {args.size_mib} MiB page-cached image {args.image}, "
          f"{args.reps} reps, batches of {BATCH} indirect requests\n")
    medians = {}
    for kind, unit in (("rand4k", "4 KiB random reads, requests/s"),
                       ("seq64k", "64 KiB sequential reads, MB/s")):
        print(f"{unit:<44} {'min':>10} {'median':>10} {'max':>10}")
        for label in ("device, C engine", "device, C engine, legacy virtio-pci",
                      "device, C engine, modern virtio-pci", "device, Python engine",
                      "preadv (C loop)", "os.preadv (Python)"):
            n, times = results[(kind, label)]
            rates = [n / t if kind == "rand4k" else n * 65536 / t / 1e6 for t in times]
            medians[(kind, label)] = statistics.median(rates)
            print(f"  {label:<42} {min(rates):>10,.0f} {statistics.median(rates):>10,.0f} {max(rates):>10,.0f}")
        dev = medians[(kind, "device, C engine")]
        print(f"  ratio device(C) / preadv(C loop):      {dev / medians[(kind, 'preadv (C loop)')]:.2f}")
        print(f"  ratio device(C) / os.preadv(Python):   {dev / medians[(kind, 'os.preadv (Python)')]:.2f}")
        print(f"  ratio device(C) / device(Python):      {dev / medians[(kind, 'device, Python engine')]:.1f}")
        pci = medians[(kind, "device, C engine, legacy virtio-pci")]
        print(f"  ratio device(C, pci) / preadv(C loop): {pci / medians[(kind, 'preadv (C loop)')]:.2f}")
        mod = medians[(kind, "device, C engine, modern virtio-pci")]
        print(f"  ratio device(C, modern pci) / preadv:  {mod / medians[(kind, 'preadv (C loop)')]:.2f}\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--requests", type=int, default=128 * 800, help="4 KiB requests per repetition")
    p.add_argument("--image", default="/tmp/pyvmm-bench-blk.img")
    bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
