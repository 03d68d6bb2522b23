"""Port I/O exits handled per second, pyvmm side by side with
`qemu-system-x86_64 -M microvm` on the same tiny ring-0 guest.

    python -m bench.pio [--reps 5] [--exits 200000]

The guest (vmm.testing.tinyguest, an ELF with a PVH note so both VMMs boot it) runs
`mov ecx, N; mov dx, PORT; xor eax, eax; 1: out dx, al|ax; dec ecx; jnz 1b`
and then ends the VM: pyvmm through an i8042 reset (0xFE to port 0x64),
QEMU through its isa-debug-exit device (microvm has no i8042).
Each run is timed from spawn to exit; the per-exit cost is the difference
between a run with N exits and one with N/10, divided by the difference in
exits, so start-up and teardown cancel.  The figure includes the guest's
three instructions per iteration, which run in the host kernel's emulator at
about 2M instructions/s on software KVM (the same for both VMMs).

Cases:
- unused port 0x5F0: nothing decodes it (pyvmm: bus miss; QEMU: unassigned
  I/O region);
- UART scratch register 0x3FF: a device register in the VMM's own code
  (pyvmm: vmm/hw/serial.py; QEMU: its 16550 model), the like-for-like
  device-register comparison;
- virtio-pci BAR0 QUEUE_SEL (2-byte write at BAR0+14, pyvmm only: the
  legacy virtio-pci register path through the PCI BAR dispatch; microvm has
  no PCI bus, so QEMU is shown for the UART register instead);
- virtio-pci BAR0 QUEUE_NOTIFY with datamatch 0 (pyvmm only): the write is
  consumed by KVM's PIO ioeventfd and never leaves the kernel (the floor).
Figures: min / median / max over --reps of the per-exit cost, exits/s from
the median, and pyvmm/QEMU ratios of the medians.
"""
import argparse
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time

from bench.common import QEMU, fmt, have_qemu, save, stats
from vmm.testing import tinyguest

UNUSED_PORT = 0x5F0
UART_SCR = 0x3FF
BAR0 = 0xC000                  # the first I/O BAR pyvmm's PCI bus assigns
QUEUE_SEL, QUEUE_NOTIFY = 14, 16

# `pyvmm run` with a legacy virtio-pci block device (BAR0 at 0xC000).
RUNNER = """
import os, sys
from vmm import cli
from vmm.virtio.blk import BlkDevice
from vmm.virtio.pci_attach import VirtioPciAttachment
make = cli.config_from_args
def config_from_args(args):
    c = make(args)
    c.devices.append(VirtioPciAttachment(lambda: BlkDevice(os.environ['PYVMM_BENCH_DISK'])))
    return c
cli.config_from_args = config_from_args
sys.exit(cli.main(sys.argv[1:]))
"""


DEBUG_EXIT = 0xF4             # QEMU isa-debug-exit: exits with status (value << 1) | 1
QEMU_EXIT = tinyguest.out_byte(DEBUG_EXIT, 0) + tinyguest.HLT_LOOP


def out_loop(port, n, word=False, end=tinyguest.RESET):
    """Machine code meaning the same in 32-bit (QEMU PVH) and 64-bit mode."""
    code = b"\xb9" + struct.pack("<I", n)             # mov ecx, n
    code += b"\x66\xba" + struct.pack("<H", port)     # mov dx, port
    code += b"\x31\xc0"                               # xor eax, eax
    body = (b"\x66\xef" if word else b"\xee") + b"\xff\xc9"   # out dx, ax|al; dec ecx
    body += b"\x75" + bytes([(-(len(body) + 2)) & 0xFF])      # jnz body
    return code + body + end


def run_once(cmd, ok=0, disk=None, timeout=600):
    env = dict(os.environ, PYVMM_BENCH_DISK=disk or "")
    t0 = time.monotonic()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, timeout=timeout, env=env)
    dt = time.monotonic() - t0
    if p.returncode != ok:
        raise RuntimeError(f"{cmd[0]} exited {p.returncode}: {p.stderr.decode()[-500:]}")
    return dt


def commands(vmm, elf, disk):
    if vmm == "qemu":
        return [QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
                "-m", "64M", "-nographic", "-nodefaults", "-serial", "null", "-no-reboot",
                "-device", f"isa-debug-exit,iobase=0x{DEBUG_EXIT:x},iosize=1", "-kernel", elf]
    base = [sys.executable, "-m", "vmm", "run", "--kernel", elf, "--mem", "64M",
            "--serial", "file:/dev/null"]
    if disk is None:
        return base
    return [sys.executable, "-c", RUNNER] + base[3:]


def per_exit(vmm, port, word, exits, reps, tmp, disk=None):
    small = exits // 10
    end, ok = (QEMU_EXIT, 1) if vmm == "qemu" else (tinyguest.RESET, 0)
    elfs = {n: tinyguest.make_elf(out_loop(port, n, word, end),
                                  os.path.join(tmp, f"{vmm}-{port:x}-{n}.elf"))
            for n in (small, exits)}
    samples = []
    for _ in range(reps):
        t_small = run_once(commands(vmm, elfs[small], disk), ok, disk)
        t_big = run_once(commands(vmm, elfs[exits], disk), ok, disk)
        samples.append(max(t_big - t_small, 1e-9) / (exits - small))
    return stats(samples)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--exits", type=int, default=200000)
    args = ap.parse_args(argv)
    tmp = tempfile.mkdtemp(prefix="pyvmm-pio-")
    try:
        return measure(args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def measure(args, tmp):
    disk = os.path.join(tmp, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(1 << 20)
    cases = [("unused port 0x%x (out al)" % UNUSED_PORT, UNUSED_PORT, False, True, False),
             ("UART scratch 0x%x (out al)" % UART_SCR, UART_SCR, False, True, False),
             ("virtio-pci BAR0 QUEUE_SEL (out ax)", BAR0 + QUEUE_SEL, True, False, True),
             ("virtio-pci BAR0 QUEUE_NOTIFY, ioeventfd (out ax)", BAR0 + QUEUE_NOTIFY, True, False, True)]
    res = {}
    print(f"per-exit cost, {args.exits} vs {args.exits // 10} exits, {args.reps} reps "
          "(min / median / max)")
    for label, port, word, with_qemu, with_disk in cases:
        row = {}
        for vmm in ("pyvmm", "qemu"):
            if vmm == "qemu" and not (with_qemu and have_qemu()):
                continue
            s = per_exit(vmm, port, word, args.exits, args.reps, tmp, disk if with_disk else None)
            row[vmm] = s
            print(f"  {label:48s} {vmm:6s} {fmt(s, ' us', 1e6)}   "
                  f"{1 / s['median']:,.0f} exits/s")
        if "pyvmm" in row and "qemu" in row:
            row["ratio"] = row["pyvmm"]["median"] / row["qemu"]["median"]
            print(f"  {'':48s} pyvmm/qemu median ratio: {row['ratio']:.2f}")
        res[label] = row
    if "pyvmm" in res[cases[2][0]] and "qemu" in res[cases[1][0]]:
        r = res[cases[2][0]]["pyvmm"]["median"] / res[cases[1][0]]["qemu"]["median"]
        res["bar_vs_qemu_uart_ratio"] = r
        print(f"  pyvmm BAR register / QEMU UART register median ratio: {r:.2f}")
    print("saved", save("pio", res))
    return res


if __name__ == "__main__":
    main()
