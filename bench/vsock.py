"""virtio-vsock stream throughput through the mock driver, against a plain
Unix socketpair in the same run, and the CPU an idle vsock device uses.

    python -m bench.vsock [--reps 5] [--mib 256]

Host -> guest: a host thread writes --mib MiB into the Unix socket of an
established connection (a C write loop, no GIL); the device reads it
straight into the driver's receive buffers (one 64 KiB + header descriptor
each, re-posted in bulk per pump) and the driver returns credit with one
CREDIT_UPDATE per pump.  Guest -> host: the driver posts RW packets of 64
KiB within the device's credit (256 KiB, the production value), the device
sends them to the socket, a host thread reads them (C loop).  Reference:
the same byte count through a socketpair, C writer and C reader threads,
64 KiB at a time, the guest's end cycling through as many buffers as the
device uses.  Ratio = device median ÷ socketpair median.

Idle: a device on an I/O loop with one idle connection for --idle seconds;
CPU time of the process (all threads) over that window.
"""
import argparse
import os
import select
import socket
import statistics
import tempfile
import threading
import time

import numpy as np

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
    def __init__(self, tmp, ioloop=None, ring=False):
        self.mem = GuestMemory(128 * MiB)
        self.uds = os.path.join(tmp, "v.sock")
        self.dev = VsockDevice(self.uds, ioloop=ioloop)
        self.t = VirtioMmio(self.dev, self.mem)
        self.d = VsockDriver(self.t, self.mem, rx_buffers=0 if ring else 8,
                             arena_size=100 * MiB)
        assert self.d.init()
        self.ring = RxRing(self.d, self.mem) if ring else None
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
        self.host.close()
        self.listener.close()
        os.unlink(f"{self.uds}_{HPORT}")
        self.t.close()
        self.mem.close()


class RxRing:
    """The receive queue as `size` one-descriptor chains of header + 64 KiB;
    used entries go straight back to the available ring (numpy)."""

    def __init__(self, d, mem):
        q = d.queues[RX]              # (the driver posted no buffers of its own)
        self.q, self.mem, self.d = q, mem, d
        self.n = q.size
        self.buf = d.alloc((HDR_LEN + PKT) * self.n, 4096)
        for k in range(self.n):
            q.write_desc(k, self.buf + (HDR_LEN + PKT) * k, HDR_LEN + PKT, VRING_DESC_F_WRITE)
        arr = mem.array
        a, u = mem.offset(q.avail), mem.offset(q.used)
        self.ring = arr[a + 4:a + 4 + 2 * self.n].view("<u2")
        self.used = arr[u + 4:u + 4 + 8 * self.n].view("<u4").reshape(self.n, 2)
        self.used_idx = arr[u + 2:u + 4].view("<u2")
        self.avail_idx = 0
        self.last = 0
        self.ring[:] = np.arange(self.n, dtype=np.uint16)
        q.free = []
        self.post(self.n)
        d.kick(RX)

    def post(self, count):
        self.avail_idx = (self.avail_idx + count) & 0xFFFF
        self.mem.write_int(self.q.avail + 2, self.avail_idx, 2)

    def harvest(self, want_fwd=False):
        """Bytes of payload in the new used entries (they are re-posted); with
        `want_fwd`, (bytes, fwd_cnt of the last packet or None)."""
        idx = int(self.used_idx[0])
        n = (idx - self.last) & 0xFFFF
        if not n:
            return (0, None) if want_fwd else 0
        pos = (self.last + np.arange(n)) % self.n
        entries = self.used[pos]
        fwd = None
        if want_fwd:                  # struct virtio_vsock_hdr: le32 fwd_cnt at byte 40
            head = int(entries[-1, 0])
            fwd = self.mem.read_int(self.buf + (HDR_LEN + PKT) * head + 40, 4)
        slots = (self.avail_idx + np.arange(n)) % self.n
        self.ring[slots] = entries[:, 0].astype(np.uint16)
        self.last = idx
        self.post(n)
        got = int(entries[:, 1].sum()) - HDR_LEN * n
        return (got, fwd) if want_fwd else got


def host_to_guest(tmp, total):
    r = Rig(tmp, ring=True)
    try:
        ring = r.ring
        buf = ffi.new("uint8_t[]", PKT)
        res = {}
        th = threading.Thread(target=lambda: res.setdefault(
            "w", lib.pv_bench_stream(r.host.fileno(), buf, PKT, total, 1, 0, 1)))
        t0 = time.perf_counter()
        th.start()
        got = told = 0
        poll, harvest = r.dev.poll, ring.harvest
        fd = r.dev.fileno
        while got < total:
            poll()                    # socket events, then the receive pump
            n = harvest()
            if not n:                 # sleep as the I/O thread would, until the socket has data
                select.select([fd], [], [], 1.0)
            got += n
            if got - told >= GUEST_BUF // 2:   # the guest read it: credit back
                told = got
                r.d.packet(GPORT, HPORT, OP_CREDIT_UPDATE, buf_alloc=GUEST_BUF,
                           fwd_cnt=got & 0xFFFFFFFF)
        dt = time.perf_counter() - t0
        th.join()
        assert got == total, (got, total)
        return total / dt
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
        th = threading.Thread(target=lambda: res.setdefault(
            "r", lib.pv_bench_stream(r.host.fileno(), buf, PKT, total, 0, 0, 1)))
        credit_buf = r.dev.mux.buf_alloc
        # chains k: descriptors 2k (header) and 2k+1 (payload), reused forever
        q.get_used()
        for k in range(nslots):
            h = base + (HDR_LEN + PKT) * k
            mem.write(h, hdr(d.cid, 2, GPORT, HPORT, OP_RW, PKT, 0, GUEST_BUF, 0))
            q.write_desc(2 * k, h, HDR_LEN, VRING_DESC_F_NEXT, 2 * k + 1)
            q.write_desc(2 * k + 1, h + HDR_LEN, PKT, 0)
        q.free = []
        ring, fd, poll = r.ring, r.dev.fileno, r.dev.poll
        t0 = time.perf_counter()
        th.start()
        sent, peer_fwd, k = 0, 0, 0
        while sent < total:
            _, fwd = ring.harvest(want_fwd=True)     # CREDIT_UPDATEs from the device
            if fwd is not None:
                peer_fwd = sent - ((sent - fwd) & 0xFFFFFFFF)
            posted = 0
            while sent < total and sent - peer_fwd + PKT <= credit_buf:
                q.put_avail(2 * (k % nslots), publish=False)
                k += 1
                sent += PKT
                posted += 1
            if posted:
                q.publish()
                d.kick(TX)
            else:                     # out of credit: wait for EPOLLOUT as the I/O thread would
                select.select([fd], [], [], 1.0)
                poll()
        while th.is_alive():          # the last packets may wait in the backlog
            select.select([fd], [], [], 0.1)
            poll()
            ring.harvest()
        th.join()
        dt = time.perf_counter() - t0
        assert res["r"] == total, res
        return total / dt
    finally:
        r.close()


def socketpair(total, direction):
    """The same bytes through a socketpair; the guest's end cycles through as
    many 64 KiB buffers as the device uses (256 receive buffers for
    host_to_guest, 8 transmit payloads for guest_to_host), so both see the
    same memory (one hot buffer would flatter the reference)."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    nslots = 256 if direction == "host_to_guest" else 8
    one, many = ffi.new("uint8_t[]", PKT), ffi.new("uint8_t[]", (HDR_LEN + PKT) * nslots)
    try:
        if direction == "host_to_guest":   # host writes one buffer, guest reads into many
            w = (a.fileno(), one, PKT, total, 1, 0, 1)
            rd = (b.fileno(), many, PKT, total, 0, HDR_LEN + PKT, nslots)
        else:                              # guest writes from many, host reads into one
            w = (a.fileno(), many, PKT, total, 1, HDR_LEN + PKT, nslots)
            rd = (b.fileno(), one, PKT, total, 0, 0, 1)
        th = threading.Thread(target=lib.pv_bench_stream, args=w)
        t0 = time.perf_counter()
        th.start()
        n = lib.pv_bench_stream(*rd)
        th.join()
        dt = time.perf_counter() - t0
        assert n == total
        return total / dt
    finally:
        a.close()
        b.close()


def idle_cpu(tmp, seconds):
    loop = IoLoop()
    loop.start()
    try:
        r = Rig(tmp, ioloop=loop)
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
            dev, ref = [], []
            for _ in range(args.reps):
                dev.append(fn(tmp, total) / 1e6)
                ref.append(socketpair(total, name) / 1e6)
            s_dev, s_ref = stats(dev), stats(ref)
            ratio = s_dev["median"] / s_ref["median"]
            out[name] = {"device": s_dev, "socketpair": s_ref, "ratio": ratio}
            print(f"vsock {name:14s} device {fmt(s_dev, ' MB/s')}   socketpair "
                  f"{fmt(s_ref, ' MB/s')}   ratio {ratio:.2f} (goal >= 0.8)")
        cpu = [idle_cpu(tmp, args.idle) for _ in range(max(1, args.reps // 2))]
        out["idle_cpu_fraction"] = stats(cpu)
        print(f"vsock idle device CPU      {fmt(stats(cpu), ' % of a core', 100)} over "
              f"{args.idle:g} s (goal: none measurable)")
    save("vsock", out)
    return out


if __name__ == "__main__":
    main()
