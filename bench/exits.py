"""MMIO exits per second on the vCPU thread, pyvmm side by side with
`qemu-system-x86_64 -M microvm` on the same tiny ring-0 guest (vmm.testing.tinyguest).

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
import struct
import tempfile

from bench.common import compare, have_qemu, pyvmm_cmd, qemu_cmd, save, spawn_markers, stats
from vmm.testing import tinyguest

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


def measure(cmd, count, reps, timeout=120):
    rates = []
    for _ in range(reps):
        t = spawn_markers(cmd, [OPEN, CLOSE], timeout)
        ok = OPEN in t and CLOSE in t and t[CLOSE] > t[OPEN]
        rates.append(count / (t[CLOSE] - t[OPEN]) if ok else None)   # None: a failed sample
    return rates


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--count", type=int, default=60000, help="MMIO writes per repetition")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="pyvmm-bench-")
    d = tmp.name
    elf = guest_elf(os.path.join(d, "mmio.elf"), args.count)
    res = {"what": f"MMIO write exits/s to unassigned 0x{ADDR:x}", "count": args.count,
           "mmio_exits_per_s": {}}
    for name, cmd in (("pyvmm", pyvmm_cmd(elf, mem="64M")), ("qemu", qemu_cmd(elf, mem="64M"))):
        if name == "qemu" and not have_qemu():
            continue
        rates = measure(cmd, args.count, args.reps)
        res["mmio_exits_per_s"][name] = stats(rates) or {"failed": len(rates)}
    ratio = compare(res["mmio_exits_per_s"], f"MMIO exits/s ({args.count} writes to 0x{ADDR:x})",
                    " exits/s", detail=lambda s: f"{1e6 / s['median']:.1f} us per exit")
    if ratio is not None:
        res["mmio_exits_per_s_ratio"] = ratio
    tmp.cleanup()
    print("saved", save("exits", res))
    return res


if __name__ == "__main__":
    main()
