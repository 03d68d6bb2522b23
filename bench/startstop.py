"""VMs started and stopped per second, pyvmm side by side with
`qemu-system-x86_64 -M microvm`: ten VMs in a row, each a fresh VMM process
running a tiny guest (vmm.testing.tinyguest) that resets at its first instruction;
the next starts when the previous has exited.  One repetition = ten VMs;
VMs/s = 10 / wall time of the ten.  A VM counts only if its VMM exits with
status 0 (pyvmm: i8042 reset; QEMU: triple fault under -no-reboot, microvm
having no i8042).

`python -m bench.startstop [--reps N] [--vms 10]`; min / median / max.
"""
import argparse
import os
import subprocess
import tempfile
import time

from bench.common import compare, have_qemu, pyvmm_cmd, qemu_cmd, save, stats
from bench.exits import RESET
from vmm.testing import tinyguest


def batch(cmd, vms, timeout=60):
    """Seconds for `vms` VMs in a row, or None if one failed."""
    t0 = time.monotonic()
    for _ in range(vms):
        p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           stdin=subprocess.DEVNULL, timeout=timeout)
        if p.returncode != 0:
            return None
    return time.monotonic() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="batches of --vms VMs")
    ap.add_argument("--vms", type=int, default=10, help="VMs in a row per batch")
    ap.add_argument("--mem", default="256M", help="guest RAM of each VM")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="pyvmm-bench-")
    d = tmp.name
    elf = tinyguest.make_elf(RESET, os.path.join(d, "reset.elf"))
    res = {"vms_per_batch": args.vms, "mem": args.mem, "vms_per_s": {}, "failed_batches": {}}
    for name, cmd in (("pyvmm", pyvmm_cmd(elf, mem=args.mem)), ("qemu", qemu_cmd(elf, mem=args.mem))):
        if name == "qemu" and not have_qemu():
            continue
        batch(cmd, 1)                      # warm the page cache
        rates = []
        for _ in range(args.reps):
            t = batch(cmd, args.vms)
            rates.append(None if t is None else args.vms / t)
        res["failed_batches"][name] = rates.count(None)
        res["vms_per_s"][name] = stats(rates) or {"failed": args.reps}
    ratio = compare(res["vms_per_s"], f"VMs started and stopped per second ({args.vms} in a row)",
                    " VMs/s", detail=lambda s: f"{1000 / s['median']:.0f} ms per VM")
    if ratio is not None:
        res["vms_per_s_ratio"] = ratio
    tmp.cleanup()
    print("saved", save("startstop", res))
    return res


if __name__ == "__main__":
    main()
