"""virtio-net throughput through the mock driver and a tap, against a plain
read/write loop on the same tap.

    python -m bench.net [--reps 5] [--small 20000] [--big 1500]

Everything happens in a private network namespace (deleted at the end): a
tap with MTU 65521, up, and an AF_PACKET socket on it as the peer.
TX: the driver posts batches of 128 one-descriptor chains (header + frame)
and kicks once per batch; the device writes them to the tap (the namespace's
stack then drops the unknown ethertype).  The plain loop write()s the same
frame the same number of times from C.  RX: the peer queues N frames in the
tap first, then the device drains them into posted buffers (the driver
re-posts each consumed buffer, 256 at a time); the plain loop read()s them
from C.  The plain loops go through the device's own 256 buffers in turn, so
both see the same memory (one hot buffer would flatter the loop).  Figures are min / median / max over --reps, ratios of medians.
Frames: 60 bytes ("small") and 65535 bytes ("64 KiB", the largest a tap takes
at this MTU), plus the 12-byte virtio_net_hdr.
"""
import argparse
import socket
import statistics
import time

import numpy as np

from vmm.memory import GuestMemory, MiB
from vmm.native import ffi, lib
from vmm.testing.netns import NetNs, packet_socket
from vmm.tap import Tap
from vmm.virtio import mmio as m
from vmm.virtio.mmio import VirtioMmio
from vmm.testing.mockdriver import MockDriver
from vmm.virtio.net import NetDevice
from vmm.virtio.queue import VRING_DESC_F_WRITE

from bench.common import save

HDR = 12
ETH_P = 0x88B5
TAP = "pvbench0"
SIZES = {"small": 60, "64k": 65535}
RX_BUF = {"small": 1526, "64k": 65562}


class Ring:
    """numpy views of one queue, `size` slots: slot k = descriptor k = buffer k."""

    def __init__(self, d, q, buf_len, writable, mem):
        self.q, self.mem = q, mem
        self.data = d.alloc(buf_len * q.size, 4096)
        for k in range(q.size):
            q.write_desc(k, self.data + buf_len * k, buf_len, VRING_DESC_F_WRITE if writable else 0)
        a, u = mem.offset(q.avail), mem.offset(q.used)
        arr = mem.array
        self.ring = arr[a + 4:a + 4 + 2 * q.size].view("<u2")
        self.avail_idx = arr[a + 2:a + 4].view("<u2")
        self.used_event = arr[a + 4 + 2 * q.size:a + 6 + 2 * q.size].view("<u2")
        self.used_idx = arr[u + 2:u + 4].view("<u2")
        self.idx = 0
        self.pos = np.arange(q.size, dtype=np.uint32)

    def post(self, n):
        p = (self.idx + self.pos[:n]) & 0xFFFF
        self.ring[p % self.q.size] = p % self.q.size
        self.idx = (self.idx + n) & 0xFFFF
        self.used_event[0] = self.idx
        self.avail_idx[0] = self.idx


class Bench:
    def __init__(self, ns, mem):
        self.ns = ns
        self.tap = ns.call(Tap, TAP)
        ns.ip("link", "set", TAP, "mtu", "65521", "txqueuelen", "100000", "up")
        self.peer = ns.call(packet_socket, TAP, ETH_P)
        self.peer.setblocking(True)
        self.peer.setsockopt(socket.SOL_SOCKET, 32, 512 * MiB)    # SO_SNDBUFFORCE
        self.mem = mem
        self.dev = NetDevice(self.tap)
        self.t = VirtioMmio(self.dev, mem)
        self.d = MockDriver(self.t, mem, arena=0x10000, arena_size=60 * MiB)

    def setup(self, kind):
        self.kind = kind
        self.d._next = 0x10000
        self.t.write(m.STATUS, 4, 0)
        assert self.d.init()
        self.rx = Ring(self.d, self.d.queues[0], RX_BUF[kind], True, self.mem)
        self.tx = Ring(self.d, self.d.queues[1], HDR + SIZES[kind], False, self.mem)
        frame = bytes(HDR) + b"\xff" * 6 + b"\x02" * 6 + ETH_P.to_bytes(2, "big")
        frame += bytes(SIZES[kind] - 14)
        for k in range(self.tx.q.size):
            self.mem.write(self.tx.data + len(frame) * k, frame)
        self.frame = frame

    def device_tx(self, n):
        batch = 128
        for _ in range(n // batch):
            before = int(self.tx.used_idx[0])
            self.tx.post(batch)
            self.t.write(m.QUEUE_NOTIFY, 4, 1)
            if (int(self.tx.used_idx[0]) - before) & 0xFFFF != batch:
                raise RuntimeError("TX batch not completed")
        return n // batch * batch

    def fill_tap(self, n):
        """Queue n frames in the tap (from the namespace side)."""
        f = b"\x02" * 6 + b"\x04" * 6 + ETH_P.to_bytes(2, "big") + bytes(len(self.frame) - HDR - 14)
        for _ in range(n):
            self.peer.send(f)

    def device_rx(self, n):
        """Post every free buffer and kick; re-post what the device used and
        kick again (it stopped polling when the buffers ran out), as a guest."""
        got, last = 0, int(self.rx.used_idx[0])
        free = self.rx.q.size - ((self.rx.idx - last) & 0xFFFF)
        while True:
            self.rx.post(free)
            self.t.write(m.QUEUE_NOTIFY, 4, 0)
            now = int(self.rx.used_idx[0])
            free, last = (now - last) & 0xFFFF, now
            got += free
            if got >= n or free == 0:
                return got

    def plain(self, n, write):
        """read()/write() from C through the device's own buffers, in turn."""
        ring = self.tx if write else self.rx
        stride = len(self.frame) if write else RX_BUF[self.kind]
        buf = ffi.cast("void *", self.mem.host_addr(ring.data, stride * ring.q.size))
        r = lib.pv_bench_tap(self.tap.fd, buf, stride, n, int(write), stride, ring.q.size)
        if r < 0:
            raise OSError(-r, "plain tap loop")
        return r // len(self.frame)     # frames moved (each read/write is header + frame)

    def close(self):
        self.t.close()
        self.peer.close()


def timed(fn, n):
    t0 = time.perf_counter()
    done = fn(n)
    return done, time.perf_counter() - t0


def run(args):
    results = {}
    with NetNs("pyvmm-bench") as ns:
        mem = GuestMemory(64 * MiB)
        b = Bench(ns, mem)
        try:
            for kind, n in (("small", args.small), ("64k", args.big)):
                b.setup(kind)
                for label, fn, rx in (("TX device", b.device_tx, False),
                                      ("TX plain write()", lambda k: b.plain(k, True), False),
                                      ("RX device", b.device_rx, True),
                                      ("RX plain read()", lambda k: b.plain(k, False), True)):
                    rates = []
                    for _ in range(args.reps):
                        if rx:
                            b.fill_tap(n)
                        done, dt = timed(fn, n)
                        if done < n * 0.99:
                            raise RuntimeError(f"{kind} {label}: {done} of {n} frames")
                        rates.append(done / dt)
                    results[(kind, label)] = rates
                    st = b.dev.stats
                    assert st["rx_drops"] == st["rx_errors"] == st["tx_errors"] == 0, st
        finally:
            b.close()
            mem.close()
    report(results, args)


def report(results, args):
    print(f"virtio-net via mock driver and a tap in a private namespace, {args.reps} reps "
          f"({args.small} small / {args.big} 64 KiB frames per rep)\n")
    out = {}
    for kind, flen in SIZES.items():
        print(f"{kind} frames ({flen} bytes){'':<14} {'min':>12} {'median':>12} {'max':>12}")
        med = {}
        for label in ("TX device", "TX plain write()", "RX device", "RX plain read()"):
            rates = results[(kind, label)]
            med[label] = statistics.median(rates)
            gbit = [r * flen * 8 / 1e9 for r in rates]
            print(f"  {label:<18} pkt/s {min(rates):>12,.0f} {med[label]:>12,.0f} {max(rates):>12,.0f}")
            print(f"  {'':<18} Gbit/s {min(gbit):>11.2f} {statistics.median(gbit):>12.2f} "
                  f"{max(gbit):>12.2f}")
            out[f"{kind} {label}"] = {"pps": rates, "gbit_median": statistics.median(gbit)}
        for d in ("TX", "RX"):
            ratio = med[f"{d} device"] / med[f"{d} plain {'write()' if d == 'TX' else 'read()'}"]
            out[f"{kind} {d} ratio"] = ratio
            print(f"  ratio {d} device / plain: {ratio:.2f}")
        print()
    save("net", out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--small", type=int, default=20480, help="small frames per repetition")
    p.add_argument("--big", type=int, default=1536, help="64 KiB frames per repetition")
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
