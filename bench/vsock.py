"""virtio-vsock stream throughput through the mock driver, against a plain
Unix socketpair in the same run, and the CPU an idle vsock device uses.

    python -m bench.vsock [--reps 5] [--mib 256]

What is measured: the device (vmm/virtio/vsock.py + native/src/vsock.c)
entered the way an I/O thread enters it (kicks through the virtio-mmio
register, host-socket polls), on the bench's thread, with a C driver side
(native/src/benchdrv.c: recycling used buffers and offering chains; a
guest's driver is kernel C, and the Python mock driver used to be most of
the time measured).  The guest's data are never touched by the driver (as
a guest program's would be), so the figures are the device's data path,
its Python per kick/poll, and the kernel's Unix socket.

Host -> guest: a host thread writes --mib MiB into the Unix socket of an
established connection (a C write loop, no GIL); the device reads it
straight into the driver's receive buffers (one 64 KiB + header descriptor
each, 256 of them, re-posted in C as soon as used) and the driver returns
credit with one CREDIT_UPDATE per 2 MiB.  Guest -> host: the driver posts
RW packets of 64 KiB within the device's credit (256 KiB, the production
value), the device sends them to the socket (chains the socket cannot
take yet wait in the ring until EPOLLOUT), a host thread reads them (C
loop).  Reference: the same byte count through a socketpair, C loops on
both ends, 64 KiB at a time, the guest's end on the bench's thread cycling
through as many buffers as the device uses, in the same kind of memory at
the same offsets (see socketpair()).  Ratio = device median ÷
socketpair median; runs alternate, and the per-run ratios are reported
too (this machine is shared: wall-clock figures swing by 2x between runs).
Also reported: the share of the bench thread's wall time spent inside the
device's entry points, and that thread's CPU time against the socketpair's
guest end's, and the CPU of both ends (plus the host program's thread)
against the socketpair's two threads (load-independent views of the cost
per byte).  Both runs end when the host thread has read the last byte
(the device run stops servicing the device once no guest byte is left
waiting for the host socket).  On a loaded machine the wall-clock ratio
swings with the other load (perf sched then shows the two threads of
either setup taking turns on one core); the figure is meant for an idle
machine, where each end has a core of its own.

Idle: a device on an I/O loop for --idle seconds with one established but
silent stream, and with none: CPU time of the whole process (all threads)
per wall second.
"""
import argparse
import os
import select
import socket
import statistics
import tempfile
import threading
import time

from vmm.memory import GuestMemory, MiB
from vmm.native import ffi, lib
from vmm.testing.mockvsock import (HDR, HDR_LEN, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
                                   OP_RW, RX, TX, VsockDriver, hdr)
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.queue import VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
from vmm.virtio.vsock import VsockDevice

from bench.common import fmt, save, stats

PKT = 64 << 10
GPORT, HPORT = 1000, 52
GUEST_BUF = 4 << 20                   # the mock guest's receive buffer (its credit to us)


class Rig:
    def __init__(self, tmp, ioloop=None, ring=False, connect=True):
        self.mem = GuestMemory(128 * MiB)
        self.uds = os.path.join(tmp, "v.sock")
        self.dev = VsockDevice(self.uds, ioloop=ioloop)
        self.t = VirtioMmio(self.dev, self.mem)
        self.d = VsockDriver(self.t, self.mem, rx_buffers=0 if ring else 8,
                             arena_size=100 * MiB)
        assert self.d.init()
        self.ring = RxRing(self.d, self.mem) if ring else None
        self.host = self.listener = None
        if connect:
            self._connect(ring)

    def _connect(self, ring):
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(f"{self.uds}_{HPORT}")
        self.listener.listen(1)
        self.d.packet(GPORT, HPORT, OP_REQUEST, buf_alloc=GUEST_BUF)
        if ring:
            assert self.ring.harvest() == 0   # the RESPONSE
        else:
            pk = self.d.received(refill=False)
            assert [p.op for p in pk] == [OP_RESPONSE], pk
        self.host, _ = self.listener.accept()
        self.fwd = 0                  # guest bytes consumed (its fwd_cnt)

    def close(self):
        if self.listener is not None:
            self.host.close()
            self.listener.close()
            os.unlink(f"{self.uds}_{HPORT}")
        self.t.close()
        self.mem.close()


class CQueue:
    """The bench driver's side of one queue, in C (native/src/benchdrv.c):
    no Python per buffer, as a guest's kernel driver (the mock driver's
    Python would otherwise be most of what is measured)."""

    def __init__(self, mem, q):
        self.mem = mem
        self.q = ffi.new("struct pv_drvq *")
        self.q.avail = ffi.cast("uint8_t *", mem.host_addr(q.avail, 4 + 2 * q.size))
        self.q.used = ffi.cast("uint8_t *", mem.host_addr(q.used, 4 + 8 * q.size))
        self.q.size, self.q.avail_idx, self.q.last_used = q.size, q.avail_idx, q.last_used
        self._bytes = ffi.new("uint64_t *")
        self._head = ffi.new("uint32_t *")

    def recycle(self):
        """(entries, used bytes, last head) of the new used entries, which
        are offered again at once."""
        self._bytes[0] = 0
        n = lib.pv_drvq_recycle(self.q, self._bytes, self._head)
        return n, int(self._bytes[0]), int(self._head[0])

    def post(self, heads, start, n):
        lib.pv_drvq_post(self.q, heads, len(heads), start, n)


class RxRing:
    """The receive queue as `size` one-descriptor chains of header + 64 KiB,
    recycled in C as soon as the device used them."""

    def __init__(self, d, mem):
        q = d.queues[RX]              # (the driver posted no buffers of its own)
        self.mem = mem
        self.n = q.size
        self.buf = d.alloc((HDR_LEN + PKT) * self.n, 4096)
        mem.write(self.buf, bytes((HDR_LEN + PKT) * self.n))   # faulted in, as a guest's are
        for k in range(self.n):
            q.write_desc(k, self.buf + (HDR_LEN + PKT) * k, HDR_LEN + PKT, VRING_DESC_F_WRITE)
        q.free = []
        self.cq = CQueue(mem, q)
        self.cq.post(ffi.new("uint16_t[]", list(range(self.n))), 0, self.n)
        d.kick(RX)

    def harvest(self, want_fwd=False):
        """Bytes of payload in the new used entries (they are re-posted); with
        `want_fwd`, (bytes, fwd_cnt of the last packet or None)."""
        n, used, head = self.cq.recycle()
        got = used - HDR_LEN * n
        if not want_fwd:
            return got
        fwd = None
        if n:                         # struct virtio_vsock_hdr: le32 fwd_cnt at byte 40
            fwd = self.mem.read_int(self.buf + (HDR_LEN + PKT) * head + 40, 4)
        return got, fwd


def host_end(res, *args):
    """A host program's end of the stream (pv_bench_stream, a C loop, GIL
    released) on its own thread: res["n"] = bytes moved, res["cpu"] = that
    thread's CPU seconds."""
    def run():
        c0 = time.thread_time()
        res["n"] = lib.pv_bench_stream(*args)
        res["cpu"] = time.thread_time() - c0
    return threading.Thread(target=run)


class DevClock:
    """Wall time the bench's thread spends inside the device's entry points
    (kicks, host-socket polls) versus in the harness and waiting."""

    def __init__(self):
        self.dev = 0.0

    def wrap(self, fn):
        pc = time.perf_counter

        def timed(*a):
            t = pc()
            try:
                return fn(*a)
            finally:
                self.dev += pc() - t
        return timed


def host_to_guest(tmp, total):
    r = Rig(tmp, ring=True)
    try:
        ring = r.ring
        buf = ffi.new("uint8_t[]", PKT)
        res = {}
        th = host_end(res, r.host.fileno(), buf, PKT, total, 1, 0, 1)
        clock = DevClock()
        poll, harvest = clock.wrap(r.dev.poll), ring.harvest
        fd = r.dev.fileno
        t0, c0 = time.perf_counter(), time.thread_time()
        th.start()
        got = told = 0
        while got < total:
            poll()                    # socket events, then the receive pump
            n = harvest()             # (re-posted; the next poll's pump finds them)
            if not n:                 # sleep as the I/O thread would, until the socket has data
                select.select([fd], [], [], 1.0)
            got += n
            if got - told >= GUEST_BUF // 2:   # the guest read it: credit back
                told = got
                t = time.perf_counter()
                r.d.packet(GPORT, HPORT, OP_CREDIT_UPDATE, buf_alloc=GUEST_BUF,
                           fwd_cnt=got & 0xFFFFFFFF)
                clock.dev += time.perf_counter() - t
        dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
        th.join()
        assert got == total, (got, total)
        return total / dt, clock.dev / dt, cpu, res["cpu"]
    finally:
        r.close()


def guest_to_host(tmp, total):
    r = Rig(tmp, ring=True)
    try:
        d, mem = r.d, r.mem
        q = d.queues[TX]
        nslots = 8
        base = d.alloc((HDR_LEN + PKT) * nslots, 4096)
        buf = ffi.new("uint8_t[]", PKT)
        res = {}
        th = host_end(res, r.host.fileno(), buf, PKT, total, 0, 0, 1)
        credit_buf = r.dev.mux.buf_alloc
        # chains k: descriptors 2k (header) and 2k+1 (payload), reused forever
        q.get_used()
        for k in range(nslots):
            h = base + (HDR_LEN + PKT) * k
            mem.write(h, hdr(d.cid, 2, GPORT, HPORT, OP_RW, PKT, 0, GUEST_BUF, 0))
            q.write_desc(2 * k, h, HDR_LEN, VRING_DESC_F_NEXT, 2 * k + 1)
            q.write_desc(2 * k + 1, h + HDR_LEN, PKT, 0)
        q.free = []
        txq = CQueue(mem, q)
        heads = ffi.new("uint16_t[]", [2 * k for k in range(nslots)])
        clock = DevClock()
        ring, fd = r.ring, r.dev.fileno
        poll, kick = clock.wrap(r.dev.poll), clock.wrap(d.kick)
        t0, c0 = time.perf_counter(), time.thread_time()
        th.start()
        sent, peer_fwd, k = 0, 0, 0
        while sent < total:
            _, fwd = ring.harvest(want_fwd=True)     # CREDIT_UPDATEs from the device
            if fwd is not None:
                peer_fwd = sent - ((sent - fwd) & 0xFFFFFFFF)
            n = min((credit_buf - (sent - peer_fwd)) // PKT, (total - sent) // PKT)
            if n > 0:
                txq.post(heads, k, n)
                k += n
                sent += n * PKT
                kick(TX)
            else:                     # out of credit: wait for EPOLLOUT as the I/O thread would
                select.select([fd], [], [], 1.0)
                poll()
        # The last packets may wait in the device for EPOLLOUT; once the
        # host socket has all of them only the reader is left to wait for.
        # (Selecting on the device until the reader finished, as this loop
        # did, slept out its 0.1 s timeout at the end of most runs whenever
        # the reader had a core of its own: the device has no event left to
        # give; at 256 MiB that alone made the figure ~0.35.)
        # (bounded by the reader: one that failed takes no more bytes, and
        # its short count fails the assert below instead of hanging here)
        while r.dev.mux.unsent() and th.is_alive():
            select.select([fd], [], [], 1.0)
            poll()
            ring.harvest()
        th.join()
        dt, cpu = time.perf_counter() - t0, time.thread_time() - c0
        assert res["n"] == total, res
        return total / dt, clock.dev / dt, cpu, res["cpu"]
    finally:
        r.close()


def socketpair(total, direction):
    """The same bytes through a socketpair; the guest's end cycles through as
    many 64 KiB buffers as the device uses (256 receive buffers for
    host_to_guest, 8 transmit payloads for guest_to_host), so both see the
    same memory (one hot buffer would flatter the reference): memory mapped
    as guest RAM is (pv_alloc_ram: 2 MiB aligned, transparent huge pages),
    faulted in, each payload HDR_LEN bytes into a slot of HDR_LEN + 64 KiB
    as in the device runs (and in a Linux 6.1 guest, whose packets are one
    skb: header, then payload).  That alignment matters: the kernel's copy
    from a source 44 bytes past a page boundary costs ~20% more CPU here
    than from a malloc'd buffer.  The guest's end runs on the calling
    thread, as the device does: returns (bytes/s, CPU seconds of that
    thread)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    nslots = 256 if direction == "host_to_guest" else 8
    size = -(-(HDR_LEN + PKT) * nslots // (2 * MiB)) * 2 * MiB
    ram = lib.pv_alloc_ram(size, 2 * MiB, 1)
    assert ram != ffi.NULL
    ffi.memmove(ram, bytes(size), size)
    one, many = ffi.new("uint8_t[]", PKT), ffi.cast("uint8_t *", ram) + HDR_LEN
    try:
        if direction == "host_to_guest":   # host writes one buffer, guest reads into many
            host = (a.fileno(), one, PKT, total, 1, 0, 1)
            guest = (b.fileno(), many, PKT, total, 0, HDR_LEN + PKT, nslots)
        else:                              # guest writes from many, host reads into one
            guest = (a.fileno(), many, PKT, total, 1, HDR_LEN + PKT, nslots)
            host = (b.fileno(), one, PKT, total, 0, 0, 1)
        res = {}
        th = host_end(res, *host)
        t0, c0 = time.perf_counter(), time.thread_time()
        th.start()
        n = lib.pv_bench_stream(*guest)
        cpu = time.thread_time() - c0
        th.join()
        dt = time.perf_counter() - t0
        assert n == total and res["n"] == total
        return total / dt, cpu, res["cpu"]
    finally:
        a.close()
        b.close()
        lib.pv_free_ram(ram, size)


def idle_cpu(tmp, seconds, connected):
    """CPU time of the whole process (every thread) per wall second while a
    device on an I/O loop, with one established but silent stream or none,
    waits: the idle cost of the device, its loop and the host side."""
    loop = IoLoop()
    loop.start()
    try:
        r = Rig(tmp, ioloop=loop, connect=connected)
        try:
            time.sleep(0.2)
            c0, w0 = time.process_time(), time.perf_counter()
            time.sleep(seconds)
            return (time.process_time() - c0) / (time.perf_counter() - w0)
        finally:
            r.close()
    finally:
        loop.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--idle", type=float, default=3.0)
    args = ap.parse_args(argv)
    total = args.mib * MiB
    out = {"mib": args.mib}
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-vsock-") as tmp:
        for name, fn in (("host_to_guest", host_to_guest), ("guest_to_host", guest_to_host)):
            dev, ref, share, paired, cpu, cpu2 = [], [], [], [], [], []
            for _ in range(args.reps):     # interleaved: the machine's load hits both alike
                rate, busy, c_dev, h_dev = fn(tmp, total)
                rate_ref, c_ref, h_ref = socketpair(total, name)
                dev.append(rate / 1e6)
                ref.append(rate_ref / 1e6)
                share.append(busy)
                paired.append(rate / rate_ref)
                cpu.append(c_dev / c_ref)
                cpu2.append((c_dev + h_dev) / (c_ref + h_ref))
            s_dev, s_ref = stats(dev), stats(ref)
            ratio = s_dev["median"] / s_ref["median"]
            out[name] = {"device": s_dev, "socketpair": s_ref, "ratio": ratio,
                         "paired_ratio": stats(paired), "device_share": stats(share),
                         "cpu_ratio": stats(cpu), "cpu_both_ends_ratio": stats(cpu2)}
            print(f"vsock {name:14s} device {fmt(s_dev, ' MB/s')}   socketpair "
                  f"{fmt(s_ref, ' MB/s')}   ratio {ratio:.2f} (goal >= 0.8; paired runs "
                  f"{fmt(stats(paired), '', digits=2)})")
            print(f"      {'':14s} bench thread: inside the device {fmt(stats(share), ' %', 100, 2)} "
                  f"of its time; its CPU / the socketpair guest end's CPU "
                  f"{fmt(stats(cpu), '', digits=2)}; both ends' CPU (+ the host "
                  f"program's thread) / the socketpair's {fmt(stats(cpu2), '', digits=2)}")
        for label, connected in (("no connection", False), ("one idle stream", True)):
            cpu = [idle_cpu(tmp, args.idle, connected) for _ in range(max(1, args.reps // 2))]
            out["idle_cpu_fraction" + ("" if connected else "_no_connection")] = stats(cpu)
            print(f"vsock idle device CPU, {label:15s} {fmt(stats(cpu), ' % of a core', 100)} "
                  f"over {args.idle:g} s (goal: none measurable)")
    save("vsock", out)
    return out


if __name__ == "__main__":
    main()
