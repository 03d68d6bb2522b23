"""virtio-blk through the real notify/interrupt path, against the fastest
plain program doing the same I/O.

    python -m bench.blk [--size-mib 256] [--reps 5] [--image PATH]

What is measured: requests per second a driver thread gets from pyvmm's
device, each request crossing two threads both ways (kick -> I/O thread ->
interrupt -> driver), against a single-threaded plain program doing the
same reads/writes.

Device figures ("real path"): pyvmm's BlkDevice on its transport (virtio-mmio,
legacy virtio-pci with INTx, or modern virtio-pci with MSI-X vectors on
irqfds) is serviced by pyvmm's I/O thread (vmm.virtio.ioloop),
exactly as in a VM: the queue's notify eventfd (the one KVM's ioeventfd would
signal) wakes it, it runs the engine (sync or io_uring) and signals the
interrupt eventfd (the one KVM's irqfd would deliver; legacy virtio-pci: the
trigger eventfd of its INTx resample irqfd, vmm/pci/intx_irqfd.py).  With
the sync engine that is the I/O loop's C fast path on every transport
(native/src/fastpath.c: no Python per kick); io_uring runs the loop's Python
handlers.  Legacy virtio-pci's INTx is level-triggered: the driver plays
KVM's part too, its handler's ISR read (the acknowledgement) followed by the
EOI, at which KVM would signal the resample eventfd; the I/O thread then
looks at the ISR in Python (re-asserting the line if bits are left), as it
does in a VM for each EOI.  The driver is a C
loop (bench/driver.c) on the benchmark's own thread with the GIL released:
it keeps QD requests in flight (indirect descriptors: header, data, status,
as Linux lays them out), kicks only when the device asks (EVENT_IDX), sleeps
on the interrupt eventfd, acknowledges each interrupt through the transport's
registers (a call into pyvmm, the MMIO/PIO exit a guest's handler takes;
none with MSI-X, whose handler reads no register) and refills the ring.  Not included: the guest's own costs and KVM's exit and
injection costs (measured by bench/exits.py, bench/pio.py and the in-guest
figures of bench/inguest.py).

Workloads on a page-cached raw image (--size-mib, random bytes): 4 KiB
random and 64 KiB sequential, read and write, at queue depth 1 and 32.

Limits: the same I/O done by plain C programs on the same image (class
Plain): a pread/pwrite loop (QD1 is exactly that), and at QD32 also io_uring
with 32 in flight; the fastest one-thread program (median) is the limit.
The loop on two threads is timed too and reported beside it as the
"two-core reference" (its own ratio), not as the limit: the device serves
its queue on one I/O thread, and on this 2-core host the other core runs the
driver, as it would run the guest's vCPU, so two cores of plain I/O are a
reference no single-queue device path here could reach (an idle run
measured it at 1.5M 4 KiB reads/s against ~0.8M for one thread).  They are timed between the device's runs, rep by rep in alternating
order, and every write sample (device or plain) starts after an fdatasync:
buffered writes here swing 5x with what writeback is doing, and a limit
measured minutes apart from the device once came out below it.

QD1 wake-up bound: any queue-depth-1 request through two threads costs at
least one wake-up each way.  The "wakeup" figures are plain C round trips
between two threads (no virtio at all, after a warm-up): blocking hand-offs
(eventfd + poll() as the driver and the I/O loop use, futex, pipe), each
unpinned (as the device runs), on two CPUs (a cross-CPU wake-up: here an
idle vCPU of the host VM halts, so it is the slowest) and on one CPU (a
local context switch), and both sides spinning on two CPUs (no wake-up at
all: what polling buys).  The "qd1_bound" of each workload is 1 / (the
fastest blocking round trip, median + the limit's time per request): about
what a perfect two-thread device that sleeps when idle could reach at QD1
on this host (a loaded host moves both; a reference, not a ceiling).
The real path's QD1 figures follow the same split: run by run they land
near the one-CPU figures when the scheduler keeps the driver and the I/O
thread on one CPU, and 4-7x lower when it puts them on two (measured
2026-11-24, pci-modern 4 KiB reads QD1: 100-150k vs 14-35k req/s; the
device's polling setting did not decide it).  So the QD1 sync runs on mmio
and pci-modern are also timed with both threads pinned to CPU 0 ("one_cpu",
labelled rows, never in place of the real-path figure; --no-one-cpu: none).

Limit buffers are page-aligned (mmap), as the device's (guest pages): a
16-byte-aligned numpy buffer made the kernel's copies 15-28 % slower for
64 KiB requests and put device figures above their "limit".  A device
median above the plain programs timed beside it is printed as a warning
and listed under "above_limit": such a limit is wrong, not the goal.

Adaptive polling: the device runs with pyvmm's default (--drive poll_us,
vmm/virtio/fastpath.py DEFAULT_POLL_US; --poll-us overrides, 0: off).

"Driver polls" rows (QD1, sync engine, mmio and pci-modern), labelled as
such and never in place of the real-path figure: the same runs with the C
driver looking at the used ring for up to --driver-poll-us before it sleeps,
as a vCPU does under KVM's halt-polling (halt_poll_ns) or Linux's virtio-blk
poll queues; with the device also polling, a QD1 request then costs no
thread wake-up.  Like KVM, the driver does not spin while it is being
preempted.

Also "device processing cost": the old in-thread figure (the driver calls
the transport's QueueNotify on the same thread: no eventfd, no I/O thread,
no interrupt), labelled as such: what the C engine costs per request alone.
Each figure: min / median / max over --reps; ratios of medians.
"""
import argparse
import contextlib
import mmap
import os
import time

import numpy as np

from bench import cdriver
from bench.common import save, stats
from vmm.memory import GuestMemory, MiB
from vmm.native import ffi as nffi, lib as nlib
from vmm.testing.mockdriver import MockDriver
from vmm.virtio import mmio as m
from vmm.virtio import pci_legacy as pl
from vmm.virtio.blk import BlkDevice
from vmm.virtio.fastpath import DEFAULT_POLL_US as FP_DEFAULT_POLL_US
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.mmio import VirtioMmio
from vmm.pci.intx_irqfd import IrqfdIntx
from vmm.virtio.pci_legacy import VirtioPciLegacy
from vmm.virtio.queue import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

T_IN, T_OUT = 0, 1
ONE = (1).to_bytes(8, "little")
KINDS = {"rand4k": 4096, "seq64k": 65536}
DEPTHS = (1, 32)
# (transport, engine) pairs measured: both engines on mmio, the default on pci
PATHS = (("mmio", "sync"), ("mmio", "io_uring"), ("pci", "sync"), ("pci-modern", "sync"))


class RealPath:
    """A BlkDevice on a transport served by an IoLoop, and the C driver's rings."""

    def __init__(self, image, mem, transport, engine, max_len, cffi, poll_us=None):
        self.ffi, self.lib = cffi
        self.loop = IoLoop()
        self.loop.start()
        self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.dev = BlkDevice(image, io_engine=engine, ioloop=self.loop)
        regs = None
        self.intx = None
        if transport == "pci":
            # INTx on a resample irqfd (vmm/pci/intx_irqfd.py), KVM's part
            # played here: the driver sleeps on the trigger eventfd KVM would
            # consume, and its handler's ISR read is followed by the EOI
            # that makes KVM signal the resample eventfd (_ack)
            self.intx = IrqfdIntx()
            self.t = VirtioPciLegacy(self.dev, mem, ioloop=self.loop, intx=self.intx,
                                     ioeventfd=lambda *a, **k: None)
        elif transport == "pci-modern":
            from vmm.testing.fakevm import FakeVm
            from vmm.testing.pcimodern_regs import PciModernRegs
            from vmm.virtio.pci_modern import VirtioPciModern
            self.t = VirtioPciModern(self.dev, mem, vm=FakeVm(), ioloop=self.loop,
                                     ioeventfd=lambda *a, **k: None)
            regs = lambda t: PciModernRegs(t, msix=True)     # noqa: E731
        else:
            self.t = VirtioMmio(self.dev, mem, irq=self.irq, ioloop=self.loop,
                                register_ioeventfd=lambda *a: None)
        self.mem = mem
        if poll_us is not None and getattr(self.t, "_fast", None) is not None:
            self.t._fast.set_poll_us(poll_us)        # adaptive polling (vmm/virtio/fastpath.py)
        self.d = MockDriver(self.t, mem, arena=0x10000, arena_size=48 * MiB, regs=regs)
        if not self.d.init():
            raise RuntimeError("feature negotiation failed")
        msix = transport == "pci-modern"
        if msix:      # queue 0 is vector 1 (PciModernRegs): its irqfd is what KVM would inject
            self.irq_fd = self.t.msix._fds[1]
        q = self.q = self.d.queues[0]
        depth = max(DEPTHS)
        self.hdr = self.d.alloc(16 * depth, 16)
        self.status = self.d.alloc(depth, 16)
        self.data = self.d.alloc(max_len * depth, 4096)
        self.tables = self.d.alloc(48 * depth, 16)
        r = self.ring = self.ffi.new("struct bd_ring *")
        r.desc = self.ffi.cast("uint8_t *", mem.host_addr(q.desc, 16 * q.size))
        r.avail = self.ffi.cast("uint8_t *", mem.host_addr(q.avail, 6 + 2 * q.size))
        r.used = self.ffi.cast("uint8_t *", mem.host_addr(q.used, 6 + 8 * q.size))
        r.size = q.size
        r.event_idx = int(q.event_idx)
        r.notify_fd = self.t.notify_fds[0]
        r.irq_fd = (self.irq_fd if msix else
                    self.intx.trigger_fd if self.intx is not None else self.irq)
        # the guest's interrupt handler: vm_interrupt / vp_interrupt read (and ack)
        # ISR; vp_vring_interrupt (MSI-X) reads nothing
        self.ack = self.ffi.NULL if msix else self.ffi.callback("int(void)", self._ack)

    def _ack(self):
        self.d.ack_interrupt()
        if self.intx is not None:       # the EOI: KVM de-asserts, signals resample
            os.write(self.intx.resample_fd, ONE)
        return 0

    def layout(self, length, write):
        """Slot k = descriptor k -> indirect table k: header, data, status."""
        q = self.q
        for k in range(max(DEPTHS)):
            t = self.tables + 48 * k
            q.write_desc(0, self.hdr + 16 * k, 16, VRING_DESC_F_NEXT, 1, table=t)
            q.write_desc(1, self.data + length * k, length,
                         (0 if write else VRING_DESC_F_WRITE) | VRING_DESC_F_NEXT, 2, table=t)
            q.write_desc(2, self.status + k, 1, VRING_DESC_F_WRITE, 0, table=t)
            q.write_desc(k, t, 48, VRING_DESC_F_INDIRECT)

    def run(self, sectors, depth, write, spin_us=0):
        """All requests at `sectors`, `depth` in flight; returns seconds.
        spin_us: the driver looks at the used ring this long before it
        sleeps (the labelled driver-polls rows only)."""
        w = self.ffi.new("struct bd_work *")
        w.mode, w.depth, w.n = 0, depth, len(sectors)
        w.headers = self.ffi.cast("uint8_t *", self.mem.host_addr(self.hdr, 16 * depth))
        w.status = self.ffi.cast("uint8_t *", self.mem.host_addr(self.status, depth))
        w.type = T_OUT if write else T_IN
        w.sectors = self.ffi.cast("uint64_t *", sectors.ctypes.data)
        w.timeout_ms = 10000
        w.ack = self.ack
        w.spin_ns = int(spin_us * 1000)
        t0 = time.perf_counter()
        r = self.lib.bd_run(self.ring, w)
        dt = time.perf_counter() - t0
        if r < 0:
            raise OSError(-r, f"driver loop: {os.strerror(-r)} after {w.done} of {w.n} requests")
        if w.errors:
            raise RuntimeError(f"{w.errors} requests failed")
        return dt

    def close(self):
        self.t.close()
        self.loop.close()
        os.close(self.irq)


# -- the in-thread driver (device processing cost; also used by bench/faults.py) --
BATCH = 128
HDR = np.dtype([("type", "<u4"), ("reserved", "<u4"), ("sector", "<u8")])


class FastDriver:
    """In-thread driver: the transport's QueueNotify is called on this thread (no
    eventfd, no I/O thread, no interrupt); fixed request slots, so a batch
    costs a few numpy operations."""

    def __init__(self, dev, mem, req_len, transport="mmio"):
        self.mem = mem
        if transport == "pci":
            self.t = VirtioPciLegacy(dev, mem)
            self.notify = lambda: self.t.write(pl.QUEUE_NOTIFY, 2, 0)
        else:
            self.t = VirtioMmio(dev, mem)
            self.notify = lambda: self.t.write(m.QUEUE_NOTIFY, 4, 0)
        self.d = MockDriver(self.t, mem, arena=0x10000, arena_size=48 * MiB)
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
            self.d.ack_interrupt()          # the transport's own ISR access (mmio or pci)

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
        return rng.integers(0, size // 4096, n, dtype=np.uint64) * 8
    return (np.arange(n, dtype=np.uint64) % (size // 65536)) * 128


class Plain:
    """The plain programs the device is held against (its "limits"), each
    timed once per call of sample(), so a caller can interleave them with the
    device's runs: page-cache state (dirty pages under writeback above all)
    changes during a run, and a limit measured minutes away from the device
    figure it divides was once beaten by it (4 KiB writes, QD32).

    At queue depth 1: a C pread/pwrite loop.  At depth d > 1 also io_uring
    with d in flight (one thread) and, on a multi-core host, the
    pread/pwrite loop on two threads.  The limit is the fastest (by median)
    one-thread program (ONE_THREAD): the device serves a queue with one I/O
    thread, and on this 2-core host the other core runs the driver (a
    guest's vCPU), so two cores of plain I/O measure the host, not what the
    device could reach; that program is kept and reported beside the limit
    as the "two-core reference", with its own ratio."""

    def __init__(self, path, cffi):
        self.ffi, self.lib = cffi
        self.fd = os.open(path, os.O_RDWR)
        # Page-aligned and already faulted in, as the device's data buffers
        # are (guest pages): np.zeros() gives a 16-byte-aligned heap block,
        # and the kernel's copy from or to a buffer 16 bytes off a cache
        # line was measured here 15 % slower for 64 KiB writes and 28 %
        # slower for 64 KiB reads, which put device rows above this "limit"
        # (64 KiB writes QD32: 1.09-1.13).
        self._map = mmap.mmap(-1, max(KINDS.values()) * max(DEPTHS))
        self.buf = np.frombuffer(self._map, np.uint8)
        self.buf[:] = 0x5A
        self.threads = min(2, os.cpu_count() or 1)

    def candidates(self, length, sectors, depth, write):
        ffi, lib, fd = self.ffi, self.lib, self.fd
        offs = (sectors * 512).astype(np.uint64)
        n = len(sectors)
        buf = ffi.cast("uint8_t *", self.buf.ctypes.data)
        offs_c = ffi.cast("uint64_t *", offs.ctypes.data)
        op = "pwrite" if write else "pread"
        cands = {f"C {op} loop": lambda: lib.bd_prw_loop(fd, buf, length, offs_c, n, int(write))}
        if depth > 1:
            bufp = nffi.cast("uint8_t *", self.buf.ctypes.data)
            offs_p = nffi.cast("uint64_t *", offs.ctypes.data)
            cands[f"io_uring, {depth} in flight"] = lambda: nlib.pv_bench_uring(
                fd, bufp, length, offs_p, n, depth, int(write))
            if self.threads > 1:
                cands[f"C {op} loop on {self.threads} threads"] = lambda: lib.bd_prw_threads(
                    fd, buf, length, offs_c, n, int(write), self.threads)
        return cands, offs

    def settle(self, write):
        """Before a timed write sample (the device's too): write the image's
        dirty pages back, so every sample starts from clean pages with no
        writeback under way.  Measured here: the same pwrite loop ran at 27k
        to 144k req/s depending on what writeback was doing."""
        if write:
            os.fdatasync(self.fd)

    def sample(self, length, sectors, depth, write, warm=False):
        """{label: requests/s}, each plain program run once over `sectors`."""
        cands, _offs = self.candidates(length, sectors, depth, write)
        out = {}
        for label, call in cands.items():
            self.settle(write)
            t0 = time.perf_counter()
            r = call()
            dt = time.perf_counter() - t0
            if r < 0:
                raise OSError(-r, f"plain I/O reference ({label})")
            out[label] = len(sectors) / dt
        return {} if warm else out

    def close(self):
        os.close(self.fd)
        del self.buf
        self._map.close()


def one_thread(label):
    """Is this plain program a one-thread one (a limit candidate)?"""
    return "threads" not in label


def best_limit(samples, pick=one_thread):
    """(label, stats) of the fastest plain program among those `pick`
    accepts, from {label: [req/s]}; None if there is none."""
    best = None
    for label, xs in samples.items():
        if not pick(label):
            continue
        s = stats(xs)
        if best is None or s["median"] > best[1]["median"]:
            best = (label, s)
    return best


def in_thread(image, mem, sectors, length, reps):
    """Device processing cost: the driver notifies on the same thread (no
    eventfd, no I/O thread, no interrupt); batches of 32 requests per kick."""
    dev = BlkDevice(image)
    t = VirtioMmio(dev, mem)
    d = MockDriver(t, mem, arena=0x10000, arena_size=48 * MiB)
    assert d.init()
    q = d.queues[0]
    batch = 32
    hdr, data, status = d.alloc(16 * batch), d.alloc(length * batch, 4096), d.alloc(batch)
    tables = d.alloc(48 * batch)
    for k in range(batch):
        tb = tables + 48 * k
        q.write_desc(0, hdr + 16 * k, 16, VRING_DESC_F_NEXT, 1, table=tb)
        q.write_desc(1, data + length * k, length, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2, table=tb)
        q.write_desc(2, status + k, 1, VRING_DESC_F_WRITE, 0, table=tb)
        q.write_desc(k, tb, 48, VRING_DESC_F_INDIRECT)
    heads = mem.view(hdr, 16 * batch).view(np.dtype([("t", "<u4"), ("r", "<u4"), ("s", "<u8")]))
    heads["t"] = T_IN
    a = mem.offset(q.avail)
    ring = mem.array[a + 4:a + 4 + 2 * q.size].view("<u2")
    aidx = mem.array[a + 2:a + 4].view("<u2")
    uevt = mem.array[a + 4 + 2 * q.size:a + 6 + 2 * q.size].view("<u2")
    slots = np.arange(batch, dtype=np.uint16)
    n = len(sectors) // batch * batch
    idx = [0]

    def go():
        t0 = time.perf_counter()
        for s in range(0, n, batch):
            heads["s"] = sectors[s:s + batch]
            ring[(idx[0] + slots) % q.size] = slots
            idx[0] = (idx[0] + batch) & 0xFFFF
            uevt[0] = idx[0]
            aidx[0] = idx[0]
            t.write(m.QUEUE_NOTIFY, 4, 0)
            d.ack_interrupt()
        return n / (time.perf_counter() - t0)
    go()
    out = stats([go() for _ in range(reps)])
    t.close()
    return out


# the hand-offs timed by wakeup(): (mech, pin) of bench/driver.c's bd_pingpong2
WAKE_MECHS = ("eventfd", "futex", "pipe", "spin")
WAKE_PINS = ("unpinned", "on two CPUs", "on one CPU")


def wakeup_variants():
    """[(label, mech, pin, blocking)]: every blocking hand-off unpinned (as
    the device runs), on two CPUs and on one CPU; spinning on two CPUs."""
    out = []
    for m, mech in enumerate(WAKE_MECHS):
        for p, pin in enumerate(WAKE_PINS):
            if mech == "spin" and p != 1:
                continue        # two spinners on one CPU wait for each other
            out.append((f"{mech}, {pin}", m, p, mech != "spin"))
    return out


def wakeup(res, lib, reps, n=5000):
    """Round trips between two threads, each variant once per rep (interleaved),
    and from the fastest blocking one (median) plus each QD1 limit the
    "qd1_bound": about what a perfect two-thread device that sleeps while
    idle could reach at QD1 here."""
    samples = {}
    for _ in range(reps):
        for label, m, p, _blocking in wakeup_variants():
            r = lib.bd_pingpong2(n * (10 if m == 3 else 1), m, p)
            samples.setdefault(label, []).append(r / 1e9 if r > 0 else None)
    variants = {}
    for label, m, p, blocking in wakeup_variants():
        xs = [x for x in samples[label] if x is not None]
        if xs:
            variants[label] = dict(stats(xs), blocking=blocking)
            print(f"  wake-up round trip, {label:22s} {variants[label]['min'] * 1e6:7.1f} / "
                  f"{variants[label]['median'] * 1e6:7.1f} us (min / median)", flush=True)
        else:
            print(f"  wake-up round trip, {label:22s} failed (the peer never ran)", flush=True)
    res["wakeup"] = {"what": "round trips between two C threads (bench/driver.c bd_pingpong2), "
                             "after a warm-up; blocking: each side sleeps until woken (eventfd + "
                             "poll() as the driver and the I/O loop, futex, pipe); spin: both "
                             "poll a shared word (no wake-up); unpinned as the device runs, on "
                             "two CPUs (cross-CPU wake-up) or on one CPU (local switch)",
                     "variants": variants}
    if "eventfd, unpinned" in variants:
        res["wakeup"]["round_trip_s"] = variants["eventfd, unpinned"]   # the device's own hand-off
    blocking = {k: v for k, v in variants.items() if v["blocking"]}
    res["qd1_bound"] = {}
    if not blocking:
        return
    best = min(blocking, key=lambda k: blocking[k]["median"])
    rt = blocking[best]["median"]
    for key, lim in res["limit"].items():
        if key.endswith("QD1"):
            bound = 1 / (rt + 1 / lim["median"])
            res["qd1_bound"][key] = {"req_s": bound, "ratio": bound / lim["median"], "how": best,
                                     "round_trip_s": rt}
            print(f"  {key:22s} QD1 wake-up bound {bound:>10,.0f} req/s "
                  f"({bound / lim['median']:.2f} of the limit; {best})", flush=True)


@contextlib.contextmanager
def on_one_cpu(rp):
    """The driver (this thread) and rp's I/O thread on CPU 0 for the block;
    both get their CPU sets back after it."""
    tid = rp.loop._thread.native_id
    mine, its = os.sched_getaffinity(0), os.sched_getaffinity(tid)
    os.sched_setaffinity(0, {0})
    os.sched_setaffinity(tid, {0})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)
        try:
            os.sched_setaffinity(tid, its)
        except ProcessLookupError:      # the I/O thread is gone (the loop was closed)
            pass


def above_limit(res):
    """Device medians above the limit timed beside them: such a limit is
    not the fastest plain program and has to be fixed, not the goal."""
    out = []
    for key, paths in res["device"].items():
        for path, st in paths.items():
            lim = res["limit_by_path"].get(key, {}).get(path)
            if lim and st["median"] > lim["median"]:
                out.append({"figure": key, "path": path, "device": st["median"],
                            "limit": lim["median"], "how": lim["how"],
                            # the 64 KiB write case before the buffer fix: every
                            # device sample above every plain one (else the two
                            # overlap: a device as fast as the plain program,
                            # within the run-to-run spread)
                            "every_sample_above": (st["min"] > lim["max"] and
                                                   min(st.get("n", 0), lim.get("n", 0)) >= 3)})
    return out



def bench(args):
    size = args.size_mib * MiB
    make_image(args.image, size)
    rng = np.random.default_rng(1)
    cffi = cdriver.load()
    mem = GuestMemory(64 * MiB)
    res = {"what": "requests/s through the real path (notify eventfd -> pyvmm I/O thread -> "
                   "interrupt eventfd), C driver on its own thread; limit: plain C program, "
                   "same image, same I/O",
           "image_mib": args.size_mib, "reps": args.reps,
           "poll_us": FP_DEFAULT_POLL_US if args.poll_us is None else args.poll_us,
           "limit_is": "the fastest one-thread plain program (pread/pwrite loop; io_uring "
                       "with the same requests in flight): the device serves the queue on one "
                       "I/O thread while the driver (a guest's vCPU) needs the other core; the "
                       "pread/pwrite loop on two threads is reported as two_core_reference",
           "device": {}, "limit": {}, "limit_by_path": {}, "two_core_reference": {},
           "driver_polls": {"what": f"the C driver looks at the used ring for up to "
                                    f"{args.driver_poll_us} us before sleeping (as a vCPU under "
                                    "KVM halt-polling, or Linux virtio-blk poll queues); not "
                                    "while it is being preempted; everything else as the real path",
                            "spin_us": args.driver_poll_us, "device": {}},
           "one_cpu": {"what": "the same QD1 runs with the driver thread and the device's I/O "
                               "thread pinned to CPU 0 (a placement the scheduler picks on its "
                               "own in some runs): a wake-up is then a local switch, no "
                               "cross-CPU wake-up; nothing else changed", "device": {}},
           "processing_cost": {}}
    counts = {("rand4k", 1): args.requests // 4, ("rand4k", 32): args.requests,
              ("seq64k", 1): args.requests // 8, ("seq64k", 32): args.requests // 4}
    work = {}
    for kind, length in KINDS.items():
        for depth in DEPTHS:
            work[(kind, depth)] = workload(kind, size, counts[(kind, depth)], rng)
    plain = Plain(args.image, cffi)
    lim_samples = {}        # key: {label: [req/s]}, taken between the device's runs
    try:
        paths = [tuple(x.split(":")) for x in args.paths.split(",")] if args.paths else PATHS
        for transport, engine in paths:
            rp = RealPath(args.image, mem, transport, engine, max(KINDS.values()), cffi,
                          poll_us=args.poll_us)
            try:
                for kind, length in KINDS.items():
                    for write in (False, True):
                        rp.layout(length, write)
                        for depth in DEPTHS:
                            secs = work[(kind, depth)]
                            key = f"{kind} {'write' if write else 'read'} QD{depth}"
                            rp.run(secs[:depth * 4], depth, write)          # warm up
                            ls = lim_samples.setdefault(key, {})
                            mine = {}           # this path's neighbours only
                            samples, spun, pinned = [], [], []
                            spin = (args.driver_poll_us if depth == 1 and engine == "sync"
                                    and transport != "pci" else 0)
                            pin = (depth == 1 and engine == "sync" and transport != "pci"
                                   and args.one_cpu and (os.cpu_count() or 1) > 1)
                            # device and plain programs alternate, rep by rep:
                            # the ratio compares runs seconds apart
                            for rep in range(args.reps):
                                if rep % 2 and not args.no_limits:    # order alternates
                                    for label, x in plain.sample(length, secs, depth,
                                                                 write).items():
                                        ls.setdefault(label, []).append(x)
                                        mine.setdefault(label, []).append(x)
                                plain.settle(write)
                                samples.append(len(secs) / rp.run(secs, depth, write))
                                if spin:        # the labelled driver-polls variant, same rep
                                    plain.settle(write)
                                    spun.append(len(secs) / rp.run(secs, depth, write, spin))
                                if pin:         # the labelled one-CPU variant, same rep
                                    plain.settle(write)
                                    with on_one_cpu(rp):
                                        pinned.append(len(secs) / rp.run(secs, depth, write))
                                if not rep % 2 and not args.no_limits:
                                    for label, x in plain.sample(length, secs, depth,
                                                                 write).items():
                                        ls.setdefault(label, []).append(x)
                                        mine.setdefault(label, []).append(x)
                            res["device"].setdefault(key, {})[f"{transport} {engine}"] = stats(samples)
                            s = res["device"][key][f"{transport} {engine}"]
                            line = f"  {key:22s} {transport:4s} {engine:8s} {s['median']:>10,.0f} req/s"
                            if mine:
                                label, ls_ = best_limit(mine)
                                res["limit_by_path"].setdefault(key, {})[f"{transport} {engine}"] = \
                                    dict(ls_, how=label)
                                line += f"  ({s['median'] / ls_['median']:.2f} of {label} " \
                                        f"{ls_['median']:,.0f} timed alongside"
                                two = best_limit(mine, pick=lambda lab: not one_thread(lab))
                                if two:
                                    res["two_core_reference"].setdefault(key, {})[
                                        f"{transport} {engine}"] = dict(two[1], how=two[0])
                                    line += f"; {s['median'] / two[1]['median']:.2f} of the " \
                                            f"two-core reference {two[1]['median']:,.0f}"
                                line += ")"
                            print(line, flush=True)
                            for samples, section, how in (
                                    (spun, "driver_polls", f"driver polls <= {spin} us"),
                                    (pinned, "one_cpu", "driver and I/O thread on one CPU")):
                                if not samples:
                                    continue
                                st = stats(samples)
                                res[section]["device"].setdefault(key, {})[
                                    f"{transport} {engine}"] = st
                                line = f"  {key:22s} {transport:4s} {engine:8s} {st['median']:>10,.0f} " \
                                       f"req/s  {how}"
                                if mine:
                                    line += f"  ({st['median'] / ls_['median']:.2f} of {label})"
                                print(line, flush=True)
            finally:
                rp.close()
        for key, ls in lim_samples.items():
            if not ls:
                continue
            label, s = best_limit(ls)
            res["limit"][key] = dict(s, how=label, candidates={
                lab: stats(xs)["median"] for lab, xs in ls.items()})
            print(f"  {key:22s} limit ({label}) {s['median']:>10,.0f} req/s  [" +
                  ", ".join(f"{lab} {stats(xs)['median']:,.0f}" for lab, xs in ls.items()) + "]",
                  flush=True)
        wakeup(res, cffi[1], args.reps)
        res["above_limit"] = above_limit(res)
        for item in res["above_limit"]:
            print(f"  WARNING: {item['figure']} {item['path']} {item['device']:,.0f} req/s is "
                  f"above its limit {item['limit']:,.0f} ({item['how']}): " +
                  ("every device sample above every plain one: the limit is wrong"
                   if item["every_sample_above"] else "within the samples' spread (noise, or a "
                   "limit to check)"), flush=True)
        for kind, length in KINDS.items():
            res["processing_cost"][f"{kind} read"] = in_thread(args.image, mem, work[(kind, 32)],
                                                               length, args.reps)
    finally:
        plain.close()
        mem.close()
    print("saved", save("blk", res))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mib", type=int, default=256)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--requests", type=int, default=16384,
                   help="4 KiB requests per repetition at QD32 (QD1: a quarter; 64 KiB: fewer)")
    p.add_argument("--image", default="/tmp/pyvmm-bench-blk.img")
    p.add_argument("--paths", help="transport:engine[,...] (default: " +
                   ",".join(f"{t}:{e}" for t, e in PATHS) + ")")
    p.add_argument("--poll-us", type=int, default=None,
                   help="the C fast path's adaptive polling window, at most this many us "
                        f"(default: the device's, {FP_DEFAULT_POLL_US}; 0: off)")
    p.add_argument("--driver-poll-us", type=int, default=50,
                   help="QD1 'driver polls' rows (sync engine, mmio and pci-modern): the "
                        "driver spins this long on the used ring before sleeping (0: no rows)")
    p.add_argument("--no-one-cpu", dest="one_cpu", action="store_false",
                   help="no QD1 'driver and I/O thread on one CPU' rows")
    p.add_argument("--no-limits", action="store_true", help=argparse.SUPPRESS)
    return bench(p.parse_args(argv))


if __name__ == "__main__":
    main()
