"""Does a disk starve a NIC?  Latency of a frame from a tap to the guest
driver, with the disk idle and during a disk flush storm, both devices
attached the way `pyvmm run` attaches them (vmm.devices' --drive and --net
specs on virtio-mmio, on one machine's I/O threads).

    python -m bench.starve [--pings 200] [--interval-ms 5]

Both devices are wired through the same code as in a VM (DriveSpec /
NetSpec attach: notify ioeventfds, irqfds, the machine's I/O loop); only KVM
is replaced by a stand-in that hands the eventfds to the drivers, which are
bench/driver.c's C loops on their own threads (GIL released):
- ping: the peer (an AF_PACKET socket in a private netns) sends one
  60-byte frame to the tap; the clock stops when the NIC's driver has it in
  its receive ring (device polled the tap, moved the frame, interrupted);
  --pings of them, --interval-ms apart;
- flush storm: the disk's driver loops over 32 writes of 64 KiB then one
  FLUSH (fdatasync of the image), as fast as the device completes them.
Reported: median and 99th percentile of the ping with the disk idle and
during the storm, and the flushes per second the storm achieved.
"""
import argparse
import os
import statistics
import tempfile
import threading
import time

import numpy as np

from bench import cdriver
from bench.common import save
from vmm.bus import Bus
from vmm.devices import DriveSpec, NetSpec, Slots
from vmm.memory import GuestMemory, MiB
from vmm.testing.mockdriver import MockDriver
from vmm.testing.netns import NetNs, packet_socket
from vmm.virtio.queue import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE

TAP, ETH_P = "pvstarve0", 0x88B5
T_OUT, T_FLUSH = 1, 4


class FakeVm:
    """KVM stand-in: records the irqfds and ioeventfds a device registers."""

    def __init__(self):
        self.irqfds, self.ioeventfds = {}, {}

    def irqfd(self, fd, gsi, *a, **k):
        self.irqfds[gsi] = fd

    def ioeventfd(self, fd, addr, length, datamatch=None, **k):
        self.ioeventfds[(addr, datamatch)] = fd


class FakeMachine:
    """What VirtioMmioAttachment.attach uses of a Machine."""

    def __init__(self, mem):
        self.memory, self.vm, self.slots = mem, FakeVm(), Slots()
        self.mmio_bus, self.pio_bus = Bus("mmio"), Bus("pio")
        self.pci_irqs = []
        self._ioloop = None

    def ioloop(self, *a, **k):
        if self._ioloop is None:
            from vmm.virtio.ioloop import IoLoop
            self._ioloop = IoLoop()
            self._ioloop.start()
        return self._ioloop

    def close(self):
        if self._ioloop is not None:
            self._ioloop.close()


def ring_of(ffi, mem, q, notify_fd, irq_fd):
    r = ffi.new("struct bd_ring *")
    r.desc = ffi.cast("uint8_t *", mem.host_addr(q.desc, 16 * q.size))
    r.avail = ffi.cast("uint8_t *", mem.host_addr(q.avail, 6 + 2 * q.size))
    r.used = ffi.cast("uint8_t *", mem.host_addr(q.used, 6 + 8 * q.size))
    r.size, r.event_idx, r.notify_fd, r.irq_fd = q.size, int(q.event_idx), notify_fd, irq_fd
    return r


def run(args):
    ffi, lib = cdriver.load()
    tmp = tempfile.mkdtemp(prefix="pyvmm-starve-")
    img = os.path.join(tmp, "disk.img")
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    mem = GuestMemory(64 * MiB)
    res = {}
    try:
        with NetNs("pyvmm-starve") as ns:
            fm = FakeMachine(mem)
            drive, net = DriveSpec(f"file={img}"), NetSpec(f"tap={TAP}")
            try:
                drive.attach(fm, "")
                ns.call(net.attach, fm, "")
                ns.ip("link", "set", TAP, "up")
                peer = ns.call(packet_socket, TAP, ETH_P)
                peer.setblocking(True)
                gsis = list(fm.vm.irqfds)            # in attach order: disk, NIC
                bt, nt = drive.transport, net.transport
                # the disk: slots 0-31 writes (header, data, status), slot 32 a flush
                bd = MockDriver(bt, mem, arena=0x10000, arena_size=16 * MiB)
                nd = MockDriver(nt, mem, arena=0x1010000, arena_size=8 * MiB)
                assert bd.init() and nd.init()
                bq = bd.queues[0]
                hdr, status = bd.alloc(16 * 33), bd.alloc(33)
                data, tables = bd.alloc(65536 * 32, 4096), bd.alloc(48 * 33)
                for k in range(32):
                    t = tables + 48 * k
                    bq.write_desc(0, hdr + 16 * k, 16, VRING_DESC_F_NEXT, 1, table=t)
                    bq.write_desc(1, data + 65536 * k, 65536, VRING_DESC_F_NEXT, 2, table=t)
                    bq.write_desc(2, status + k, 1, VRING_DESC_F_WRITE, 0, table=t)
                    bq.write_desc(k, t, 48, VRING_DESC_F_INDIRECT)
                t = tables + 48 * 32
                bq.write_desc(0, hdr + 16 * 32, 16, VRING_DESC_F_NEXT, 1, table=t)
                bq.write_desc(1, status + 32, 1, VRING_DESC_F_WRITE, 0, table=t)
                bq.write_desc(32, t, 32, VRING_DESC_F_INDIRECT)
                bring = ring_of(ffi, mem, bq, bt.notify_fds[0], fm.vm.irqfds[gsis[0]])
                rq = nd.queues[0]
                rx_data = nd.alloc(1526 * rq.size, 4096)
                for k in range(rq.size):
                    rq.write_desc(k, rx_data + 1526 * k, 1526, VRING_DESC_F_WRITE)
                nring = ring_of(ffi, mem, rq, nt.notify_fds[0], fm.vm.irqfds[gsis[1]])
                sectors = (np.arange(32, dtype=np.uint64) * 128)
                fsec = np.zeros(1, dtype=np.uint64)
                acks = {"b": ffi.callback("int(void)", lambda: bd.ack_interrupt() and 0),
                        "n": ffi.callback("int(void)", lambda: nd.ack_interrupt() and 0)}

                def blk_work(typ, n, depth, base, secs):
                    w = ffi.new("struct bd_work *")
                    w.mode, w.depth, w.n, w.type, w.base = 0, depth, n, typ, base
                    w.headers = ffi.cast("uint8_t *", mem.host_addr(hdr + 16 * base, 16 * depth))
                    w.status = ffi.cast("uint8_t *", mem.host_addr(status + base, depth))
                    w.sectors = ffi.cast("uint64_t *", secs.ctypes.data)
                    w.timeout_ms, w.ack = 60000, acks["b"]
                    return w

                stop, flushes = threading.Event(), [0]

                def storm():
                    while not stop.is_set():
                        for w in (blk_work(T_OUT, 32, 32, 0, sectors), blk_work(T_FLUSH, 1, 1, 32, fsec)):
                            r = lib.bd_run(bring, w)
                            if r < 0 or w.errors:
                                raise OSError(-r, f"storm: {w.errors} errors")
                        flushes[0] += 1

                frame = b"\x02" * 6 + b"\x04" * 6 + ETH_P.to_bytes(2, "big") + bytes(46)

                def pings(n):
                    out = []
                    for _ in range(n):
                        w = ffi.new("struct bd_work *")
                        w.mode, w.depth, w.n, w.timeout_ms, w.ack = 2, 1, 1, 5000, acks["n"]
                        t0 = time.perf_counter()
                        peer.send(frame)
                        r = lib.bd_run(nring, w)
                        out.append((time.perf_counter() - t0) * 1e6 if r == 0 else None)
                        time.sleep(args.interval_ms / 1000)
                    return out

                pings(10)
                idle = pings(args.pings)
                th = threading.Thread(target=storm, daemon=True)
                t0 = time.monotonic()
                th.start()
                time.sleep(0.2)
                busy = pings(args.pings)
                stop.set()
                th.join(60)
                storm_s = time.monotonic() - t0
                for name, s in (("idle", idle), ("flush storm", busy)):
                    good = sorted(x for x in s if x is not None)
                    res[name] = {"median_us": statistics.median(good),
                                 "p99_us": good[min(len(good) - 1, int(len(good) * 0.99))],
                                 "max_us": good[-1], "n": len(good), "lost": len(s) - len(good)}
                res["storm_flushes_per_s"] = flushes[0] / storm_s
                res["io_threads"] = "one I/O loop for every device (vmm/virtio/ioloop.py)"
                peer.close()
            finally:
                drive.close()
                ns.call(net.close)
                fm.close()
    finally:
        mem.close()
        for f in os.listdir(tmp):
            os.unlink(os.path.join(tmp, f))
        os.rmdir(tmp)
    for k in ("idle", "flush storm"):
        v = res[k]
        print(f"  NIC RX latency, disk {k:12s} median {v['median_us']:8.0f} us  p99 {v['p99_us']:8.0f} us"
              f"  max {v['max_us']:8.0f} us  lost {v['lost']}")
    print(f"  storm: {res['storm_flushes_per_s']:.1f} (32 x 64 KiB writes + flush)/s")
    res["p99_ratio"] = res["flush storm"]["p99_us"] / res["idle"]["p99_us"]
    print("saved", save("starve", res))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pings", type=int, default=200)
    p.add_argument("--interval-ms", type=float, default=5)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
