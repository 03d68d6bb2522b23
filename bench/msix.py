"""Interrupts and exits per virtio transport: virtio-mmio, legacy virtio-pci
(INTx) and modern virtio-pci (MSI-X), in one run.

    python -m bench.msix [--reps 5] [--notifications 20000] [--requests 2000] [--no-guest]

1. Interrupt delivery cost per used-buffer notification, on a real KVM VM
   (in-kernel irqchip, one vCPU for the LAPIC): the VMM's side of one
   notification and of the guest's acknowledgement, timed over
   --notifications in a row:
   - modern virtio-pci, MSI-X: Transport.used() writes the vector's irqfd
     (KVM injects the message); the guest acknowledges nothing;
   - legacy virtio-pci, INTx: used() raises the line, and the guest's
     handler reads ISR (dispatched to the transport).  As a Machine does
     when KVM has KVM_CAP_IRQFD_RESAMPLE, the line is a resample irqfd
     (vmm/pci/intx_irqfd.py): raising it is an eventfd write and the ISR
     read lowers nothing (KVM does at the EOI; with no guest running here,
     the resample that follows an EOI is not in this figure).  Without the
     capability: KVM_IRQ_LINE up, and down at the ISR read;
   - virtio-mmio: used() writes the irqfd, and the guest's handler reads
     InterruptStatus and writes InterruptAck (two register accesses).
   Each guest register access is also one exit to the VMM; the per-exit cost
   of a virtio-pci BAR register is measured in the same run (bench.pio's
   tiny guest, QUEUE_SEL writes), giving the total per notification.
2. Exits to the VMM per request, per transport, measured in the default
   guest kernel: one boot with an ext4 root on virtio-mmio and three more
   disks (mmio, pci-legacy, pci) whose register accesses, interrupts and
   completed requests are counted while the guest reads --requests 4 KiB
   blocks from each with O_DIRECT (one request each).
3. virtio-blk device throughput per transport, in the same process and
   the same KVM VM: 4 KiB reads from a page-cached image through the C
   engine, the driver (numpy, as in the old bench/blk.py) posting a batch of
   1 (one notification, one interrupt and its acknowledgement per request)
   or 128 requests per notification, acknowledging each interrupt as the
   guest driver would on that transport.  (virtio-net throughput is not
   measured per transport here: its data path does not depend on it.)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from bench.common import fmt, save, stats

RUNNER = r"""
import json, sys, threading
from vmm.devices import DriveSpec
from vmm.machine import Machine, MachineConfig

kernel, root, out_path, *disks = sys.argv[1:]
specs = [DriveSpec(f"file={root}")] + [DriveSpec(f"file={p},transport={t}") for t, p in
                                       (d.split("=", 1) for d in disks)]
counts = {}

class Counter:
    def __init__(self, name, t):
        self.name, self.t = name, t
        self.n = 0
        read, write = t.read, t.write
        def r(off, size):
            self.n += 1
            return read(off, size)
        def w(off, size, value):
            self.n += 1
            write(off, size, value)
        t.read, t.write = r, w

    def snap(self):
        return {"exits": self.n, "interrupts": self.t.interrupts,
                "requests": self.t.device.stats["requests"]}

class Console:
    def __init__(self):
        self.buf, self.marks = b"", {}
    def write(self, data):
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            text = line.decode(errors="replace").strip()
            sys.stdout.write(text + "\n")
            if text.startswith("bench: "):
                _, what, name = text.split()
                self.marks[(what, name)] = {c.name: c.snap() for c in counters}
        return len(data)
    def flush(self):
        pass
    def close(self):
        pass

console = Console()
m = Machine(MachineConfig(kernel=kernel, devices=specs, serial_out=console, timeout=600,
                          cmdline="console=ttyS0 reboot=k panic=-1 rodata=off 8250.nr_uarts=1 nopti "
                                  "root=/dev/vda rw"))
counters = [Counter(f"vd{chr(ord('b') + i)}", s.transport) for i, s in enumerate(specs[1:])]
try:
    rc = m.run()
finally:
    m.close()
res = {}
for c in counters:
    a, b = console.marks.get(("begin", c.name)), console.marks.get(("end", c.name))
    if a and b:
        res[c.name] = {k: b[c.name][k] - a[c.name][k] for k in a[c.name]}
json.dump({"rc": rc, "devices": res}, open(out_path, "w"))
"""

INIT = """#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for d in vdb vdc vdd; do
  echo "bench: begin $d"
  dd if=/dev/$d of=/dev/null bs=4096 count={n} iflag=direct 2>/dev/null
  echo "bench: end $d"
done
reboot -f
"""
TRANSPORTS = ("mmio", "pci-legacy", "pci")


def legacy_transport(dev, mem, vm, closers):
    """A VirtioPciLegacy on GSI 5 with its INTx as pci_attach gives it: a
    resample irqfd (its resample eventfd on an I/O loop, appended to
    `closers`) where KVM has one, KVM_IRQ_LINE otherwise."""
    from vmm.virtio import pci_legacy as pl
    if not vm.irqfd_resample_supported():
        return pl.VirtioPciLegacy(dev, mem, irq_line=lambda level: vm.set_irq_line(5, level))
    from vmm.pci.intx_irqfd import IrqfdIntx
    from vmm.virtio.ioloop import IoLoop
    loop = IoLoop()
    loop.start()
    closers.append(loop)
    intx = IrqfdIntx(lambda t, r, deassign=False: vm.irqfd(t, 5, deassign=deassign, resample_fd=r))
    return pl.VirtioPciLegacy(dev, mem, ioloop=loop, intx=intx)


def interrupt_costs(n, reps):
    """Seconds per notification (+ acknowledgement) on the VMM side."""
    from vmm.kvm.system import Kvm
    from vmm.kvm.vcpu import Vcpu
    from vmm.kvm.vm import Vm
    from vmm.memory import GuestMemory, MiB
    from vmm.testing.pcimodern_regs import PciModernRegs
    from vmm.virtio import mmio as m
    from vmm.virtio import pci_legacy as pl
    from vmm.virtio import pci_modern as pm
    from vmm.virtio.blk import BlkDevice

    tmp = tempfile.mkdtemp(prefix="pyvmm-msix-")
    kvm, mem = Kvm(), GuestMemory(32 * MiB)
    vm = Vm(kvm)
    vm.setup_platform()
    vm.add_memory(mem)
    vcpu = Vcpu(vm, 0)
    out, closers = {}, []
    try:
        def disk(name):
            p = os.path.join(tmp, name)
            with open(p, "wb") as f:
                f.truncate(1 << 20)
            return BlkDevice(p)

        t = pm.VirtioPciModern(disk("a"), mem, vm=vm)
        closers.append(t)
        regs = PciModernRegs(t)
        regs.enable_msix(2)
        regs.common("queue_select", 0)
        regs.common("queue_msix_vector", 1)

        def modern():
            for _ in range(n):
                t.used(0)
        lt = legacy_transport(disk("b"), mem, vm, closers)
        closers.append(lt)

        def legacy():
            for _ in range(n):
                lt.used(0)
                lt.read(pl.ISR, 1)
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        vm.irqfd(fd, 6)
        mt = m.VirtioMmio(disk("c"), mem, irq=fd)
        closers.append(mt)

        def mmio():
            for _ in range(n):
                mt.used(0)
                mt.write(m.INTERRUPT_ACK, 4, mt.read(m.INTERRUPT_STATUS, 4))
        # which INTx the legacy row measures, said in its label (a host
        # without KVM_CAP_IRQFD_RESAMPLE gets the older KVM_IRQ_LINE pair)
        how = "resample irqfd" if lt._intx_irqfd is not None else "KVM_IRQ_LINE"
        for label, fn in (("pci (MSI-X irqfd)", modern), (f"pci-legacy (INTx {how} + ISR read)", legacy),
                          ("mmio (irqfd + status read + ack)", mmio)):
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) / n)
            out[label] = stats(samples)
        assert t.msix.delivered[1] == n * reps, "MSI-X vector did not fire every time"
    finally:
        for c in reversed(closers):
            c.close()
        vcpu.close()
        vm.close()
        kvm.close()
        mem.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


class BatchDriver:
    """Fixed request slots (indirect: header, 4 KiB, status); one kick per batch."""

    def __init__(self, transport, dev, mem, vm, batch):
        import numpy as np
        from vmm.testing.mockdriver import MockDriver
        from vmm.testing.pcimodern_regs import PciModernRegs
        from vmm.virtio import mmio as m
        from vmm.virtio import pci_legacy as pl
        from vmm.virtio import pci_modern as pm
        from vmm.virtio.queue import VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE
        self.np, self.batch, regs = np, batch, None
        self.closers = []
        if transport == "pci-legacy":
            self.t = legacy_transport(dev, mem, vm, self.closers)
            self.notify = lambda: self.t.write(pl.QUEUE_NOTIFY, 2, 0)
            self.ack = lambda: self.t.read(pl.ISR, 1)
        elif transport == "pci":
            self.t = pm.VirtioPciModern(dev, mem, vm=vm)
            self.notify = lambda: self.t.write(pm.NOTIFY, 2, 0)
            self.ack = lambda: None
            regs = lambda t: PciModernRegs(t, msix=True)
        else:
            self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            vm.irqfd(self.irq, 6)
            self.t = m.VirtioMmio(dev, mem, irq=self.irq)
            self.notify = lambda: self.t.write(m.QUEUE_NOTIFY, 4, 0)
            self.ack = lambda: self.t.write(m.INTERRUPT_ACK, 4, self.t.read(m.INTERRUPT_STATUS, 4))
        self.d = d = MockDriver(self.t, mem, arena=0x10000, arena_size=8 << 20, regs=regs)
        if not d.init():
            raise RuntimeError("feature negotiation failed")
        q = self.q = d.queues[0]
        hdr, data, status, tables = (d.alloc(16 * batch, 16), d.alloc(4096 * batch, 4096),
                                     d.alloc(batch, 16), d.alloc(48 * batch, 16))
        for k in range(batch):
            t = tables + 48 * k
            q.write_desc(0, hdr + 16 * k, 16, VRING_DESC_F_NEXT, 1, table=t)
            q.write_desc(1, data + 4096 * k, 4096, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2, table=t)
            q.write_desc(2, status + k, 1, VRING_DESC_F_WRITE, 0, table=t)
            q.write_desc(k, t, 48, VRING_DESC_F_INDIRECT)
        self.sectors = mem.view(hdr, 16 * batch).view(np.dtype([("t", "<u4"), ("r", "<u4"), ("s", "<u8")]))
        self.status = mem.view(status, batch)
        off = mem.offset(q.avail)
        self.avail_ring = mem.array[off + 4:off + 4 + 2 * q.size].view("<u2")
        self.avail_idx = mem.array[off + 2:off + 4].view("<u2")
        self.used_event = mem.array[off + 4 + 2 * q.size:off + 6 + 2 * q.size].view("<u2")
        self.used_idx = mem.array[mem.offset(q.used) + 2:mem.offset(q.used) + 4].view("<u2")
        self.slots = np.arange(batch, dtype=np.uint16)
        self.idx = 0

    def run(self, sectors):
        size, b = self.q.size, self.batch
        for start in range(0, len(sectors), b):
            self.sectors["s"] = sectors[start:start + b]
            self.avail_ring[(self.idx + self.slots) % size] = self.slots
            self.idx = (self.idx + b) & 0xFFFF
            self.used_event[0] = self.idx
            self.avail_idx[0] = self.idx
            self.notify()
            if self.used_idx[0] != self.idx or self.status.any():
                raise RuntimeError("batch not completed")
            self.ack()


def blk_throughput(requests, reps):
    """{batch: {transport: stats of 4 KiB reads/s}} on one real KVM VM."""
    import numpy as np
    from vmm.kvm.system import Kvm
    from vmm.kvm.vcpu import Vcpu
    from vmm.kvm.vm import Vm
    from vmm.memory import GuestMemory, MiB
    from vmm.virtio.blk import BlkDevice
    tmp = tempfile.mkdtemp(prefix="pyvmm-msix-blk-")
    image = os.path.join(tmp, "disk.img")
    with open(image, "wb") as f:
        f.write(os.urandom(64 * MiB))
    kvm, mem = Kvm(), GuestMemory(32 * MiB)
    vm = Vm(kvm)
    vm.setup_platform()
    vm.add_memory(mem)
    vcpu = Vcpu(vm, 0)
    rng = np.random.default_rng(1)
    out = {}
    try:
        for batch in (1, 128):
            n = max(batch, requests // (1 if batch > 1 else 8) // batch * batch)
            sectors = rng.integers(0, (64 * MiB) // 4096, n, dtype=np.uint64) * 8
            row = out[f"batch {batch}"] = {}
            for transport in TRANSPORTS:
                drv = BatchDriver(transport, BlkDevice(image, readonly=True), mem, vm, batch)
                try:
                    drv.run(sectors[:batch])               # warm up
                    samples = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        drv.run(sectors)
                        samples.append(n / (time.perf_counter() - t0))
                    row[transport] = stats(samples)
                finally:
                    drv.t.close()
                    for c in drv.closers:
                        c.close()
                    if hasattr(drv, "irq"):
                        vm.irqfd(drv.irq, 6, deassign=True)
                        os.close(drv.irq)
    finally:
        vcpu.close()
        vm.close()
        kvm.close()
        mem.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def exit_cost(reps):
    """Seconds per exit to a virtio-pci BAR register (bench.pio's tiny guest)."""
    from bench import pio
    tmp = tempfile.mkdtemp(prefix="pyvmm-msix-pio-")
    try:
        disk = os.path.join(tmp, "disk.img")
        with open(disk, "wb") as f:
            f.truncate(1 << 20)
        return pio.per_exit("pyvmm", pio.BAR0 + pio.QUEUE_SEL, True, 50000, reps, tmp, disk)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def guest_exits(requests):
    """Per-transport counts while the guest reads `requests` 4 KiB blocks."""
    from vmm import guest
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "integration"))
    from test_virtio_blk_guest import make_ext4  # the same root image the tests build
    import pathlib
    kernel, _ = guest.default_guest()
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="pyvmm-msix-guest-"))
    try:
        root = make_ext4(tmp / "root.img", tmp, init=INIT.replace("{n}", str(requests)))
        disks = []
        for t in TRANSPORTS:
            p = tmp / f"{t}.img"
            with open(p, "wb") as f:
                f.truncate(requests * 4096 + (1 << 20))
            disks.append(f"{t}={p}")
        out = tmp / "counts.json"
        p = subprocess.run([sys.executable, "-c", RUNNER, kernel, root, str(out), *disks],
                           capture_output=True, timeout=900, stdin=subprocess.DEVNULL)
        if not out.exists():
            raise RuntimeError("guest run failed: " + p.stderr.decode(errors="replace")[-800:])
        res = json.loads(out.read_text())
        by_name = dict(zip(("vdb", "vdc", "vdd"), TRANSPORTS))
        return {by_name[k]: v for k, v in res["devices"].items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--notifications", type=int, default=20000)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--blk-requests", type=int, default=128 * 400)
    ap.add_argument("--no-guest", action="store_true", help="skip the guest boot (part 2)")
    args = ap.parse_args(argv)
    res = {"interrupt_cost": interrupt_costs(args.notifications, args.reps)}
    res["exit_cost"] = exit_cost(max(2, args.reps // 2))
    exit_s = res["exit_cost"]["median"]
    guest_exits_per_irq = {"pci": 0, "pci-legacy": 1, "mmio": 2}    # by the label's first word
    print(f"interrupt delivery per used-buffer notification (VMM side, {args.notifications} "
          f"in a row, {args.reps} reps; min / median / max):")
    for label, s in res["interrupt_cost"].items():
        exits = guest_exits_per_irq[label.split()[0]]
        total = s["median"] + exits * exit_s
        s["with_exits_median"] = total
        print(f"  {label:44s} {fmt(s, ' us', 1e6)}   + {exits} exit(s) "
              f"= {total * 1e6:.1f} us")
    print(f"  (one exit to a virtio-pci BAR register: {fmt(res['exit_cost'], ' us', 1e6)})")
    res["blk_throughput"] = blk_throughput(args.blk_requests, args.reps)
    print("\nvirtio-blk 4 KiB random reads/s through each transport (C engine, page-cached image):")
    for batch, row in res["blk_throughput"].items():
        for t, s in row.items():
            print(f"  {batch:10s} {t:12s} {fmt(s, ' req/s')}")
    if not args.no_guest:
        res["guest"] = guest_exits(args.requests)
        print(f"\nexits to the VMM per 4 KiB O_DIRECT read in the guest ({args.requests} reads):")
        for t, c in res["guest"].items():
            r = max(c["requests"], 1)
            c["exits_per_request"] = c["exits"] / r
            c["interrupts_per_request"] = c["interrupts"] / r
            print(f"  {t:12s} requests {c['requests']:6d}  exits/request {c['exits'] / r:5.2f}  "
                  f"interrupts/request {c['interrupts'] / r:5.2f}")
    print("saved", save("msix", res))
    return res


if __name__ == "__main__":
    main()
