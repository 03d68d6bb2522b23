"""virtio-net through the real notify/interrupt path and a tap, against a
plain read/write loop on the same tap.

    python -m bench.net [--reps 5] [--small 20480] [--big 1536]

What is measured: frames per second a driver thread gets through pyvmm's
virtio-net device and a tap (kick -> I/O thread -> tap -> interrupt), against
one thread doing plain write()s/read()s of the same frames on the same tap.
The device's per-frame work is C (native/src/net.c), and on every
transport here the I/O thread serves kicks and tap wake-ups in C too (the
I/O loop's fast path, native/src/fastnet.c: no Python per kick or per batch
of up to 256 frames, interrupts written from C).

Everything happens in a private network namespace (deleted at the end): a
tap with MTU 65521, up, and an AF_PACKET socket on it as the peer.

Device figures ("real path"): pyvmm's NetDevice on its transport (virtio-mmio,
legacy virtio-pci with INTx, or modern virtio-pci with MSI-X vectors on
irqfds, whose handler acknowledges nothing) is serviced by pyvmm's I/O thread as in a VM: queue
kicks arrive on the notify eventfds (KVM's ioeventfd), the tap is polled by
the same thread, interrupts go out on an eventfd (KVM's irqfd; legacy
virtio-pci: the trigger eventfd of its INTx resample irqfd, whose EOI the
driver signals after its ISR read, as KVM would: vmm/pci/intx_irqfd.py).  The driver
is the C loop of bench/driver.c on the benchmark's thread (GIL released):
TX keeps the whole ring (256 frames) in flight, refilling as frames complete;
RX posts every buffer and re-posts each one used; it kicks when the device
asks (EVENT_IDX), sleeps on the interrupt eventfd and acknowledges each
interrupt through the transport's registers (none with MSI-X).
TX: the device writes each frame to the tap (the namespace's stack drops the
unknown ethertype).  RX: the peer first queues N frames in the tap, then the
clock runs while the device moves them into the driver's buffers.
Limits: a C loop of write()s (TX) or read()s (RX) of the same frames on the
same tap, through the same 256 buffers in turn, timed between the device's
runs (rep by rep, in alternating order; pooled over both transports): a
limit timed after all the device rows once came out below a device figure.
Frames: 60 bytes ("small") and 65535 bytes ("64 KiB", the largest a tap
takes at this MTU), plus the 12-byte virtio_net_hdr.  Figures are min /
median / max over --reps, ratios of medians.
"""
import argparse
import os
import socket
import time


from bench import cdriver
from bench.common import save, stats
from vmm.memory import GuestMemory, MiB
from vmm.tap import Tap
from vmm.testing.mockdriver import MockDriver
from vmm.testing.netns import NetNs, packet_socket
from vmm.virtio.ioloop import IoLoop
from vmm.virtio.mmio import VirtioMmio
from vmm.virtio.net import NetDevice
from vmm.pci.intx_irqfd import IrqfdIntx
from vmm.virtio.pci_legacy import VirtioPciLegacy
from vmm.virtio.queue import VRING_DESC_F_WRITE

HDR = 12
ETH_P = 0x88B5
TAP = "pvbench0"
SIZES = {"small": 60, "64k": 65535}
RX_BUF = {"small": 1526, "64k": 65562}
ONE = (1).to_bytes(8, "little")
TRANSPORTS = ("mmio", "pci", "pci-modern")


class Queue:
    """One queue's C-driver ring; slot k = descriptor k = buffer k."""

    def __init__(self, rp, index, buf_len, writable):
        ffi, mem = rp.ffi, rp.mem
        q = self.q = rp.d.queues[index]
        self.data = rp.d.alloc(buf_len * q.size, 4096)
        for k in range(q.size):
            q.write_desc(k, self.data + buf_len * k, buf_len, VRING_DESC_F_WRITE if writable else 0)
        r = self.ring = ffi.new("struct bd_ring *")
        r.desc = ffi.cast("uint8_t *", mem.host_addr(q.desc, 16 * q.size))
        r.avail = ffi.cast("uint8_t *", mem.host_addr(q.avail, 6 + 2 * q.size))
        r.used = ffi.cast("uint8_t *", mem.host_addr(q.used, 6 + 8 * q.size))
        r.size = q.size
        r.event_idx = int(q.event_idx)
        r.notify_fd = rp.t.notify_fds[index]
        # MSI-X: queue n's vector is n + 1 (PciModernRegs), its irqfd what KVM injects
        r.irq_fd = (rp.t.msix._fds[index + 1] if rp.msix else
                    rp.intx.trigger_fd if rp.intx is not None else rp.irq)


class RealPath:
    def __init__(self, tap, mem, transport, kind, cffi):
        self.ffi, self.lib = cffi
        self.mem = mem
        self.loop = IoLoop()
        self.loop.start()
        self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.dev = NetDevice(tap, ioloop=self.loop)
        self.msix = transport == "pci-modern"
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
        elif self.msix:
            from vmm.testing.fakevm import FakeVm
            from vmm.testing.pcimodern_regs import PciModernRegs
            from vmm.virtio.pci_modern import VirtioPciModern
            self.t = VirtioPciModern(self.dev, mem, vm=FakeVm(), ioloop=self.loop,
                                     ioeventfd=lambda *a, **k: None)
            regs = lambda t: PciModernRegs(t, msix=True)     # noqa: E731
        else:
            self.t = VirtioMmio(self.dev, mem, irq=self.irq, ioloop=self.loop,
                                register_ioeventfd=lambda *a: None)
        self.d = MockDriver(self.t, mem, arena=0x10000, arena_size=60 * MiB, regs=regs)
        if not self.d.init():
            raise RuntimeError("feature negotiation failed")
        self.rx = Queue(self, 0, RX_BUF[kind], True)
        self.frame = bytes(HDR) + b"\xff" * 6 + b"\x02" * 6 + ETH_P.to_bytes(2, "big")
        self.frame += bytes(SIZES[kind] - 14)
        self.tx = Queue(self, 1, len(self.frame), False)
        for k in range(self.tx.q.size):
            mem.write(self.tx.data + len(self.frame) * k, self.frame)
        # the guest's handler: vm_interrupt / vp_interrupt read (and ack) ISR;
        # vp_vring_interrupt (MSI-X) reads nothing
        self.ack = self.ffi.NULL if self.msix else self.ffi.callback("int(void)", self._ack)

    def _ack(self):
        self.d.ack_interrupt()
        if self.intx is not None:       # the EOI: KVM de-asserts, signals resample
            os.write(self.intx.resample_fd, ONE)
        return 0

    def run(self, queue, n, mode):
        w = self.ffi.new("struct bd_work *")
        w.mode, w.depth, w.n = mode, queue.q.size, n
        w.timeout_ms = 3000
        w.ack = self.ack
        sent = self.dev.stats["tx_packets"]
        t0 = time.perf_counter()
        r = self.lib.bd_run(queue.ring, w)
        dt = time.perf_counter() - t0
        if r < 0:
            raise OSError(-r, f"driver loop: {os.strerror(-r)} after {w.done} of {n} frames")
        if mode == 1:     # TX: frames the tap took; a frame the tap refused is a drop, not a frame
            return (self.dev.stats["tx_packets"] - sent) / dt
        return w.done / dt

    def close(self):
        self.t.close()          # the device; the tap stays open for the next one
        self.loop.close()
        os.close(self.irq)


class DetachedTap:
    """The tap for a NetDevice that must not close it (several devices in turn)."""

    def __init__(self, tap):
        self._tap = tap

    def __getattr__(self, name):
        return getattr(self._tap, name)

    def close(self):
        pass


def fill_tap(peer, frame_len, n):
    f = b"\x02" * 6 + b"\x04" * 6 + ETH_P.to_bytes(2, "big") + bytes(frame_len - 14)
    for _ in range(n):
        peer.send(f)


def plain(lib, ffi, tap_fd, mem, queue, stride, n, write):
    buf = ffi.cast("uint8_t *", mem.host_addr(queue.data, stride * queue.q.size))
    t0 = time.perf_counter()
    r = lib.bd_tap_loop(tap_fd, buf, stride, n, int(write), stride, queue.q.size)
    dt = time.perf_counter() - t0
    if r < 0:
        raise OSError(-r, "plain tap loop")
    return r / dt, r


def run(args):
    ffi, lib = cffi = cdriver.load()
    res = {"what": "frames/s through the real path (notify eventfds and tap polling on pyvmm's "
                   "I/O thread, interrupt eventfd), C driver on its own thread; limit: plain C "
                   "read()/write() loop on the same tap", "device": {}, "limit": {}}
    with NetNs("pyvmm-bench") as ns:
        tap = ns.call(Tap, TAP)
        ns.ip("link", "set", TAP, "mtu", "65521", "txqueuelen", "100000", "up")
        peer = ns.call(packet_socket, TAP, ETH_P)
        peer.setblocking(True)
        peer.setsockopt(socket.SOL_SOCKET, 32, 512 * MiB)    # SO_SNDBUFFORCE
        mem = GuestMemory(64 * MiB)
        try:
            for kind, n in (("small", args.small), ("64k", args.big)):
                flen = SIZES[kind]
                # limits: the same frames through the same buffers, plain C
                # loops, timed between the device's runs (rep by rep, order
                # alternating) and pooled over the transports' passes
                tx_l, rx_l = [], []
                for transport in TRANSPORTS:
                    rp = RealPath(DetachedTap(tap), mem, transport, kind, cffi)
                    try:
                        rp.run(rp.tx, 256, 1)                          # warm up
                        tx, rx = [], []
                        tx0, rx0 = len(tx_l), len(rx_l)
                        for rep in range(args.reps):
                            lim_first = rep % 2
                            if lim_first:
                                tx_l.append(plain(lib, ffi, tap.fd, mem, rp.tx, HDR + flen, n,
                                                  True)[0])
                            tx.append(rp.run(rp.tx, n, 1))
                            if not lim_first:
                                tx_l.append(plain(lib, ffi, tap.fd, mem, rp.tx, HDR + flen, n,
                                                  True)[0])
                            for who in (("plain", "device") if lim_first else ("device", "plain")):
                                fill_tap(peer, flen, n)
                                if who == "device":
                                    rx.append(rp.run(rp.rx, n, 2))
                                else:
                                    rate, got = plain(lib, ffi, tap.fd, mem, rp.rx, RX_BUF[kind],
                                                      n, False)
                                    rx_l.append(rate if got >= n * 0.99 else None)
                        st = rp.dev.stats
                        if st["tx_errors"] or st["rx_errors"]:
                            raise RuntimeError(f"device errors: {st}")
                        res.setdefault("device_drops", {})[f"{kind} {transport}"] = {
                            k: st[k] for k in ("tx_drops", "rx_drops")}
                    finally:
                        rp.close()
                    for d, samples, lim in (("TX", tx, tx_l[tx0:]), ("RX", rx, rx_l[rx0:])):
                        res["device"].setdefault(f"{kind} {d}", {})[transport] = stats(samples)
                        ls = stats(lim)         # the limit timed alongside this transport
                        line = f"  {kind:5s} {d} {transport:4s} {stats(samples)['median']:>12,.0f} frames/s"
                        if ls:
                            res.setdefault("limit_by_path", {}).setdefault(
                                f"{kind} {d}", {})[transport] = ls
                            line += (f"  ({stats(samples)['median'] / ls['median']:.2f} of the "
                                     f"limit {ls['median']:,.0f} timed alongside)")
                        print(line, flush=True)
                for d, samples in (("TX", tx_l), ("RX", rx_l)):
                    res["limit"][f"{kind} {d}"] = stats(samples)
                    print(f"  {kind:5s} {d} limit {stats(samples)['median']:>12,.0f} frames/s", flush=True)
        finally:
            peer.close()
            tap.close()
            mem.close()
    res["frame_bytes"] = SIZES
    print("saved", save("net", res))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--small", type=int, default=20480, help="small frames per repetition")
    p.add_argument("--big", type=int, default=1536, help="64 KiB frames per repetition")
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
