"""Interrupts and exits per virtio transport: virtio-mmio, legacy virtio-pci
(INTx) and modern virtio-pci (MSI-X), in one run.

    python -m bench.msix [--reps 5] [--notifications 20000] [--requests 2000] [--no-guest]

1. Interrupt delivery cost per used-buffer notification, on a real KVM VM
   (in-kernel irqchip, one vCPU for the LAPIC): the VMM's side of one
   notification and of the guest's acknowledgement, timed over
   --notifications in a row:
   - modern virtio-pci, MSI-X: Transport.used() writes the vector's irqfd
     (KVM injects the message); the guest acknowledges nothing;
   - legacy virtio-pci, INTx: used() raises the line (KVM_IRQ_LINE), and the
     guest's handler reads ISR (dispatched to the transport, which lowers
     the line: a second KVM_IRQ_LINE);
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
3. virtio-blk device throughput per transport is in bench/blk.py (rows
   "device, C engine" / "legacy virtio-pci" / "modern virtio-pci").
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
        lt = pl.VirtioPciLegacy(disk("b"), mem, irq_line=lambda level: vm.set_irq_line(5, level))
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
        for label, fn in (("pci (MSI-X irqfd)", modern), ("pci-legacy (INTx + ISR read)", legacy),
                          ("mmio (irqfd + status read + ack)", mmio)):
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                samples.append((time.perf_counter() - t0) / n)
            out[label] = stats(samples)
        assert t.msix.delivered[1] == n * reps, "MSI-X vector did not fire every time"
    finally:
        for c in closers:
            c.close()
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
    ap.add_argument("--no-guest", action="store_true", help="skip the guest boot (part 2)")
    args = ap.parse_args(argv)
    res = {"interrupt_cost": interrupt_costs(args.notifications, args.reps)}
    res["exit_cost"] = exit_cost(max(2, args.reps // 2))
    exit_s = res["exit_cost"]["median"]
    guest_exits_per_irq = {"pci (MSI-X irqfd)": 0, "pci-legacy (INTx + ISR read)": 1,
                           "mmio (irqfd + status read + ack)": 2}
    print(f"interrupt delivery per used-buffer notification (VMM side, {args.notifications} "
          f"in a row, {args.reps} reps; min / median / max):")
    for label, s in res["interrupt_cost"].items():
        total = s["median"] + guest_exits_per_irq[label] * exit_s
        s["with_exits_median"] = total
        print(f"  {label:36s} {fmt(s, ' us', 1e6)}   + {guest_exits_per_irq[label]} exit(s) "
              f"= {total * 1e6:.1f} us")
    print(f"  (one exit to a virtio-pci BAR register: {fmt(res['exit_cost'], ' us', 1e6)})")
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
