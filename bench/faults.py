"""What fault injection, tracing and rate limiting cost, and how exact the
limiters are, through the mock driver.

    python -m bench.faults [--reps 5] [--requests 25600] [--frames 25600] [--seconds 3]

virtio-blk, 4 KiB random reads from a page-cached image (bench.blk's
batched driver: 128 requests per kick); virtio-net, 60-byte frames both ways
over a datagram socketpair standing in for the tap (128 per kick / 256 per
receive call).  Each device runs as:

  absent      a subclass with the queue handlers as they were before the
              feature (no intercept check at all): "compiled out"
  off         the shipped device, nothing configured (the C fast path)
  no-op spec  faults="" installed: every request through the Python path
  tracing     trace=FILE (blk) / pcap=FILE (net) on
  limiter     a rate limiter too large to ever throttle (blk only)

Figures are median (min..max) requests or frames per second and the ratio to
"absent".  Rate-limiter accuracy: a 3-second stream at 10 MiB/s (64 KiB
reads) and at 1,000 ops/s (4 KiB reads), measured rate and error.
"""
import argparse
import os
import statistics
import tempfile
import time

import numpy as np

from vmm.memory import GuestMemory, MiB
from vmm.native import lib
from vmm.testing.mockdriver import BlkDriver, MockDriver, T_IN
from vmm.testing.sockbackend import SockBackend
from vmm.testing.streams import BlkStream
from vmm.virtio import mmio as m
from vmm.virtio.blk import BlkDevice
from vmm.virtio.faults import DiskFaults, NetFaults
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.net import NetDevice
from vmm.virtio.queue import QueueError
from vmm.virtio.ratelimit import RateLimiter, TokenBucket
from vmm.virtio.trace import BlkTracer, PcapWriter

from bench.common import save
from vmm.testing.streams import BATCH, BatchBlkDriver as FastDriver, FixedRing as Ring

HDR = 12


class AbsentBlk(BlkDevice):
    """queue_notify as before the slow path existed (C engine only)."""

    def queue_notify(self, index):
        rings = self._rings
        ring = rings[index] if 0 <= index < len(rings) else None
        if ring is None or ring.broken:
            return False
        self.stats["kicks"] += 1
        res = self._res
        lib.pv_blk_process(ring.vq, self._blk, ring.chain, res)
        self.stats["requests"] += res.completed
        self.stats["ioerr"] += res.ioerr
        if res.interrupt:
            self._interrupt.used(index)
        if res.error:
            self._interrupt.needs_reset(QueueError(-res.error, index))
            return False
        return bool(res.more)


class AbsentNet(NetDevice):
    """The data path as before the slow path existed (C movers only), per
    queue pair as NetDevice has it since multiqueue."""

    def _process_rx(self, p):
        ring = p.rx
        if ring is None or p.index >= self.active_pairs:
            return lib.PV_NET_RX_IDLE
        res = self._res
        lib.pv_net_rx(ring.vq, p.net, ring.chain, res)
        state = res.state
        if not self._finish(p, 2 * p.index, res):
            return lib.PV_NET_RX_IDLE
        self._set_polling(p, state != lib.PV_NET_RX_NOBUF)
        return state

    def _process_tx(self, p):
        ring = p.tx
        res = self._res
        lib.pv_net_tx(ring.vq, p.net, ring.chain, res)
        more = bool(res.state)
        return self._finish(p, 2 * p.index + 1, res) and more


def make_image(path, size):
    """A random image, read once so it is in the page cache."""
    with open(path, "wb") as f:
        chunk = os.urandom(MiB)
        for _ in range(size // MiB):
            f.write(chunk)
    with open(path, "rb") as f:
        while f.read(8 * MiB):
            pass


def rates(fn, n, reps):
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        done = fn(n)
        out.append(done / (time.perf_counter() - t0))
    return out


def bench_blk(args, tmp):
    image = os.path.join(tmp, "faults-bench.img")
    size = 64 * MiB
    make_image(image, size)
    rng = np.random.default_rng(7)
    out = {}
    configs = [
        ("absent", AbsentBlk, {}, 1),
        ("off", BlkDevice, {}, 1),
        ("no-op spec", BlkDevice, {"faults": DiskFaults("")}, 10),
        ("tracing", BlkDevice, {"tracer": BlkTracer(os.path.join(tmp, "t.jsonl"))}, 10),
        ("limiter (never throttles)", BlkDevice,
         {"limiter": RateLimiter(TokenBucket(1 << 40, 1), TokenBucket(1 << 40, 1))}, 10),
    ]
    for label, cls, conf, slow in configs:
        mem = GuestMemory(64 * MiB)
        dev = cls(image, readonly=True)
        if conf:
            dev.configure(**conf)
        drv = FastDriver(dev, mem, 4096)
        n = max(BATCH, args.requests // slow // BATCH * BATCH)
        sectors = rng.integers(0, size // 4096, n, dtype=np.uint64) * 8

        def go(k, drv=drv, sectors=sectors):
            drv.run(sectors[:k])
            return k
        go(BATCH)                                     # warm up
        out[label] = rates(go, n, args.reps)
        drv.close()
        mem.close()
        os.unlink(os.path.join(tmp, "t.jsonl")) if label == "tracing" else None
    return out


class NetBench:
    def __init__(self, cls, conf):
        self.mem = GuestMemory(32 * MiB)
        self.b = SockBackend(bufsize=8 << 20, name="bench")
        self.dev = cls(self.b)
        if conf:
            self.dev.configure(**conf)
        self.t = VirtioMmio(self.dev, self.mem)
        self.d = MockDriver(self.t, self.mem, arena=0x10000, arena_size=24 * MiB)
        assert self.d.init()
        self.rx = Ring(self.d, self.d.queues[0], 1526, True, self.mem)
        self.tx = Ring(self.d, self.d.queues[1], HDR + 60, False, self.mem)
        frame = bytes(HDR) + b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + bytes(46)
        for k in range(self.tx.q.size):
            self.mem.write(self.tx.data + len(frame) * k, frame)
        self.peer_frame = frame

    def tx_run(self, n):
        done = 0
        while done < n:
            self.tx.post(128)
            self.t.write(m.QUEUE_NOTIFY, 4, 1)
            done += 128
            self.b.drain_peer()
        return done

    def rx_run(self, n):
        done = 0
        free = self.rx.q.size
        while done < n:
            for _ in range(256):
                self.b.peer.send(self.peer_frame)
            before = int(self.rx.used_idx[0])
            self.rx.post(free)
            self.t.write(m.QUEUE_NOTIFY, 4, 0)
            self.dev.poll_rx()
            free = (int(self.rx.used_idx[0]) - before) & 0xFFFF
            done += free
            if free == 0:
                raise RuntimeError("RX stalled")
        return done

    def close(self):
        self.t.close()
        self.mem.close()


def bench_net(args, tmp):
    out = {}
    pcap = os.path.join(tmp, "bench.pcap")
    configs = [("absent", AbsentNet, {}, 1), ("off", NetDevice, {}, 1),
               ("no-op spec", NetDevice, {"faults": NetFaults("")}, 5),
               ("tracing", NetDevice, {"pcap": PcapWriter(pcap)}, 5)]
    for label, cls, conf, slow in configs:
        nb = NetBench(cls, conf)
        n = max(256, args.frames // slow // 256 * 256)
        nb.tx_run(256)
        out[f"TX {label}"] = rates(nb.tx_run, n, args.reps)
        out[f"RX {label}"] = rates(nb.rx_run, n, args.reps)
        st = nb.dev.stats
        assert st["rx_drops"] == st["tx_errors"] == 0, st
        nb.close()
    if os.path.exists(pcap):
        os.unlink(pcap)
    return out


def limiter_accuracy(args, tmp):
    image = os.path.join(tmp, "limit.img")
    with open(image, "wb") as f:
        f.write(os.urandom(MiB))
    out = {}
    loop = IoLoop("bench-io")
    loop.start()
    try:
        for label, lim, nbytes, target in (
                ("10 MiB/s", RateLimiter(bandwidth=TokenBucket(MiB // 2, 50)), 65536, 10 * MiB),
                ("1000 ops/s", RateLimiter(ops=TokenBucket(50, 50)), 4096, 1000)):
            mem = GuestMemory(32 * MiB)
            dev = BlkDevice(image)
            dev.ioloop = loop
            dev.configure(limiter=lim)
            t = VirtioMmio(dev, mem)
            d = BlkDriver(t, mem, arena_size=24 << 20)
            assert d.init()
            n, nb, secs = BlkStream(d, T_IN, nbytes, depth=32).run(args.seconds)
            got = nb / secs if "MiB" in label else n / secs
            out[label] = {"target": target, "measured": got, "error_pct": 100 * (got / target - 1)}
            t.close()
            mem.close()
    finally:
        loop.close()
    return out


def fmt(rs):
    return f"{statistics.median(rs):>12,.0f}  ({min(rs):,.0f}..{max(rs):,.0f})"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--requests", type=int, default=25600)
    p.add_argument("--frames", type=int, default=25600)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyvmm-faults-") as tmp:
        blk = bench_blk(args, tmp)
        net = bench_net(args, tmp)
        acc = limiter_accuracy(args, tmp)
    result = {"blk_4k_iops": {}, "net_small_pps": {}, "limiter": acc}
    print(f"virtio-blk 4 KiB random reads, requests/s, median (min..max) of {args.reps}")
    base = statistics.median(blk["absent"])
    for label, rs in blk.items():
        r = statistics.median(rs) / base
        print(f"  {label:<28}{fmt(rs)}  x{r:.3f}")
        result["blk_4k_iops"][label] = {"median": statistics.median(rs), "min": min(rs),
                                        "max": max(rs), "ratio_to_absent": r}
    print(f"\nvirtio-net 60-byte frames, frames/s, median (min..max) of {args.reps}")
    for d in ("TX", "RX"):
        base = statistics.median(net[f"{d} absent"])
        for label, rs in net.items():
            if label.startswith(d):
                r = statistics.median(rs) / base
                print(f"  {label:<28}{fmt(rs)}  x{r:.3f}")
                result["net_small_pps"][label] = {"median": statistics.median(rs),
                                                  "min": min(rs), "max": max(rs),
                                                  "ratio_to_absent": r}
    print(f"\nrate limiter accuracy ({args.seconds:.0f} s stream through the mock driver)")
    for label, a in acc.items():
        unit = "MiB/s" if "MiB" in label else "ops/s"
        val = a["measured"] / MiB if unit == "MiB/s" else a["measured"]
        print(f"  {label:<12} measured {val:,.1f} {unit}  error {a['error_pct']:+.1f}%")
    save("faults", result)
    return result


if __name__ == "__main__":
    main()
