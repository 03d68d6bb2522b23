"""MMIO exits per second on the vCPU thread, pyvmm side by side with
`qemu-system-x86_64 -M microvm` on the same tiny ring-0 guest (vmm.tinyguest).

The guest writes "{" to the UART, then does --count 4-byte writes to a
guest-physical address where no device sits (ADDR, in the MMIO hole below
4 GiB: no RAM, no device in pyvmm nor in QEMU's microvm), each of which exits
to the VMM (KVM_EXIT_MMIO), writes "}" and resets (see RESET).  The
host timestamps the arrival of "{" and "}" on the VMM's stdout; exits/s =
count / (t_close - t_open).  Each repetition is a fresh VM.

The loop's own instructions are emulated on software-virtualized KVM (about
2M instructions/s, see ../shared/notes/kvm-host.md); three per exit, so they
are a small part of the figure there and nothing on hardware KVM.

`python -m bench.exits [--reps N] [--count N]`; min / median / max.
"""
import argparse
import os
import select
import struct
import subprocess
import tempfile
import time

from bench.common import compare, have_qemu, pyvmm_cmd, qemu_cmd, save, stats
from vmm import tinyguest

ADDR = 0xC0000000          # unassigned in both VMMs (pyvmm PCI memory starts at 0xE0000000)
OPEN, CLOSE = b"{", b"}"
# i8042 reset ends a pyvmm VM (status 0); QEMU's microvm has no i8042, so the
# ud2 that follows (no IDT: triple fault) ends it under -no-reboot (status 0).
RESET = tinyguest.out_byte(0x64, 0xFE) + tinyguest.UD2


def mmio_loop(addr, count):
    """Machine code, same meaning in 32-bit (QEMU's PVH entry) and 64-bit mode:
        mov ebx, addr; mov ecx, count
    1:  mov [rbx], eax; dec ecx; jnz 1b"""
    return (b"\xbb" + struct.pack("<I", addr) + b"\xb9" + struct.pack("<I", count) +
            b"\x89\x03" + b"\xff\xc9" + b"\x75\xfa")


def guest_elf(path, count, addr=ADDR):
    code = (tinyguest.serial_text(OPEN.decode()) + mmio_loop(addr, count) +
            tinyguest.serial_text(CLOSE.decode()) + RESET)
    return tinyguest.make_elf(code, path)


def marker_times(cmd, markers, timeout):
    """Spawn `cmd`; return {marker: monotonic seconds since spawn} for each
    single-byte marker as it arrives on stdout (the process is killed after
    the last one, or at EOF / timeout).  Missing markers are absent."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    seen, want = {}, list(markers)
    try:
        fd = p.stdout.fileno()
        while want and time.monotonic() - t0 < timeout:
            if not select.select([fd], [], [], max(0.0, t0 + timeout - time.monotonic()))[0]:
                break
            chunk = os.read(fd, 4096)
            now = time.monotonic() - t0
            if not chunk:
                break
            while want and want[0] in chunk:
                chunk = chunk[chunk.index(want[0]) + 1:]
                seen[want.pop(0)] = now
        return seen
    finally:
        p.kill()
        p.wait()


def measure(cmd, count, reps, timeout=120):
    rates = []
    for _ in range(reps):
        t = marker_times(cmd, [OPEN, CLOSE], timeout)
        if OPEN in t and CLOSE in t and t[CLOSE] > t[OPEN]:
            rates.append(count / (t[CLOSE] - t[OPEN]))
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--count", type=int, default=60000, help="MMIO writes per repetition")
    args = ap.parse_args(argv)
    d = tempfile.mkdtemp(prefix="pyvmm-bench-")
    elf = guest_elf(os.path.join(d, "mmio.elf"), args.count)
    res = {"what": f"MMIO write exits/s to unassigned 0x{ADDR:x}", "count": args.count,
           "mmio_exits_per_s": {}}
    for name, cmd in (("pyvmm", pyvmm_cmd(elf, mem="64M")), ("qemu", qemu_cmd(elf, mem="64M"))):
        if name == "qemu" and not have_qemu():
            continue
        rates = measure(cmd, args.count, args.reps)
        if rates:
            res["mmio_exits_per_s"][name] = stats(rates)
    ratio = compare(res["mmio_exits_per_s"], f"MMIO exits/s ({args.count} writes to 0x{ADDR:x})",
                    " exits/s", detail=lambda s: f"{1e6 / s['median']:.1f} us per exit")
    if ratio is not None:
        res["mmio_exits_per_s_ratio"] = ratio
    print("saved", save("exits", res))
    return res


if __name__ == "__main__":
    main()
