"""VMM memory overhead, pyvmm side by side with `qemu-system-x86_64 -M microvm`:
RSS of the VMM process minus the guest RAM it has touched, for a 256 MiB
guest in a steady state, read from /proc/PID/smaps.

Guest RAM is, in both VMMs, one anonymous mapping of the guest's size (pyvmm:
GuestMemory's mmap; QEMU: the microvm.ram block); it is found in smaps by its
size, and its Rss is the guest RAM touched so far (by the guest or by the VMM
loading the kernel).  overhead = sum of Rss over all mappings - that Rss.
Anonymous-memory and Pss overheads are recorded too: RSS counts shared
libraries and executables in full; "anon" (smaps' Anonymous: heap, stacks,
VMM data) is what each VMM instance costs on its own, and unlike
Private_Clean/Private_Dirty or Pss it does not change when another process
happens to map the same binary or libraries.

Guests (same file and command line for both VMMs):
- tiny: a ring-0 ELF (vmm.testing.tinyguest) that touches 128 MiB of its RAM, one
  byte per 4 KiB page, writes "M" to the UART and waits in sti; hlt;
- linux: the default guest (`make guest`) at its busybox shell, measured
  once "shell ready" and the prompt are on the console (about 40 s to boot
  on software-virtualized KVM).

`python -m bench.memory [--guest tiny|linux|both] [--reps N] [--linux-reps N]`
"""
import argparse
import os
import re
import struct
import subprocess
import sys
import tempfile
import time

from bench.common import have_qemu, pyvmm_cmd, qemu_cmd, read_markers, save, stats
from vmm import guest
from vmm.testing import tinyguest
from vmm.arch.x86 import cpuid

MiB = 1 << 20
GUEST_MEM = 256 * MiB
TOUCH_START, TOUCH_END = 16 * MiB, 144 * MiB
READY = b"M"
HEADER = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def touch_guest(path):
    """mov ebx, START; 1: mov [rbx], al; add ebx, 4096; cmp ebx, END; jb 1b;
    then "M" on the UART and sti; hlt; jmp hlt (IF set: not a power-off for
    pyvmm; nothing raises an interrupt).  Same meaning in 32 and 64-bit mode."""
    loop = (b"\x88\x03" + b"\x81\xc3" + struct.pack("<I", 4096) +
            b"\x81\xfb" + struct.pack("<I", TOUCH_END) + b"\x72\xf0")
    code = (b"\xbb" + struct.pack("<I", TOUCH_START) + loop + tinyguest.serial_text(READY.decode())
            + b"\xfb\xf4\xeb\xfd")
    return tinyguest.make_elf(code, path)


def read_smaps(pid):
    """List of dicts (one per mapping): path, size, rss, pss, anon (bytes)."""
    maps, cur = [], None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if HEADER.match(line):
                parts = line.split(None, 5)
                cur = {"path": parts[5].strip() if len(parts) > 5 else "",
                       "size": 0, "rss": 0, "pss": 0, "anon": 0}
                maps.append(cur)
                continue
            key, _, rest = line.partition(":")
            k = {"Size": "size", "Rss": "rss", "Pss": "pss", "Anonymous": "anon"}.get(key)
            if k:
                cur[k] += int(rest.split()[0]) * 1024
    return maps


def overhead(pid, guest_size=GUEST_MEM):
    """rss, anon and pss overheads, guest RAM touched, total rss (bytes)."""
    maps = read_smaps(pid)
    cands = [m for m in maps if m["path"] in ("",) and guest_size <= m["size"] <= guest_size + 8 * MiB]
    if not cands:
        raise RuntimeError(f"pid {pid}: no anonymous mapping of {guest_size // MiB} MiB in smaps")
    ram = max(cands, key=lambda m: (m["rss"], -m["size"]))
    tot = {k: sum(m[k] for m in maps) for k in ("rss", "anon", "pss")}
    return {"rss": tot["rss"] - ram["rss"], "anon": tot["anon"] - ram["anon"],
            "pss": tot["pss"] - ram["pss"], "guest_touched": ram["rss"], "total_rss": tot["rss"]}


def sample(cmd, ready, timeout, settle, stdin=subprocess.DEVNULL):
    """Start `cmd`, wait until every byte string in `ready` has appeared on its
    stdout in order, wait `settle` seconds, return overhead(); None on failure."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.PIPE if stdin is None else stdin)
    t0 = time.monotonic()
    try:
        fd = p.stdout.fileno()
        seen, tail = read_markers(fd, ready, t0, timeout)
        missing = [m for m in ready if m not in seen]
        if missing:
            print(f"memory: {cmd[0]}: no {missing[0]!r} within {timeout} s; console ends with "
                  f"{tail[-200:]!r}", file=sys.stderr)
            return None
        # keep draining the console while settling, so the VMM never blocks on it
        end = time.monotonic() + settle
        os.set_blocking(fd, False)
        while time.monotonic() < end:
            try:
                os.read(fd, 65536)
            except BlockingIOError:
                pass
            time.sleep(0.05)
        if p.poll() is not None:
            return None
        return overhead(p.pid)
    finally:
        p.kill()
        p.wait()


def run_pair(cmds, ready, reps, timeout, settle, stdin):
    out = {}
    for name, cmd in cmds:
        if name == "qemu" and not have_qemu():
            continue
        got = [sample(cmd, ready, timeout, settle, stdin) for _ in range(reps)]
        keys = next((list(g) for g in got if g), None)
        if keys is None:
            out[name] = {"failed": reps}
            continue
        out[name] = {k: stats([g[k] / MiB if g else None for g in got]) for k in keys}
    return out


def tiny(reps):
    tmp = tempfile.TemporaryDirectory(prefix="pyvmm-bench-")
    d = tmp.name
    elf = touch_guest(os.path.join(d, "touch.elf"))
    try:
        return run_pair((("pyvmm", pyvmm_cmd(elf, mem="256M")), ("qemu", qemu_cmd(elf, mem="256M"))),
                        [READY], reps, 60, 1.0, subprocess.DEVNULL)
    finally:
        tmp.cleanup()


def linux(reps):
    kernel, initrd = guest.default_guest()
    if not os.path.exists(kernel):
        print("no default guest: run `make guest`", file=sys.stderr)
        return {}
    cmdline = " ".join(filter(None, [guest.DEFAULT_CMDLINE, cpuid.kernel_args("auto")]))
    pcmd = pyvmm_cmd(kernel, initrd, cmdline, mem="256M")
    if cpuid.kernel_args("auto"):      # the cmdline already has the template's arguments
        pcmd += ["--cpu-template", "host"]
    return run_pair((("pyvmm", pcmd), ("qemu", qemu_cmd(kernel, initrd, cmdline, mem="256M"))),
                    [b"shell ready", b"/ # "], reps, 300, 3.0, None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--guest", choices=("tiny", "linux", "both"), default="tiny")
    ap.add_argument("--reps", type=int, default=5, help="repetitions with the tiny guest")
    ap.add_argument("--linux-reps", type=int, default=2, help="repetitions with the default guest")
    args = ap.parse_args(argv)
    res = {"guest_mem_mib": GUEST_MEM // MiB, "unit": "MiB"}
    if args.guest in ("tiny", "both"):
        res["tiny"] = tiny(args.reps)
    if args.guest in ("linux", "both"):
        res["linux"] = linux(args.linux_reps)
    print(f"VMM memory overhead, {GUEST_MEM // MiB} MiB guest, MiB (min / median / max)")
    for g in ("tiny", "linux"):
        r = res.get(g)
        if not r:
            continue
        for name, s in r.items():
            line = "  ".join(f"{k} {s[k]['min']:.1f}/{s[k]['median']:.1f}/{s[k]['max']:.1f}"
                             for k in ("rss", "anon", "guest_touched"))
            print(f"  {g:6s} {name:6s} {line}")
        if "pyvmm" in r and "qemu" in r:
            for k in ("rss", "anon"):
                ratio = r["pyvmm"][k]["median"] / r["qemu"][k]["median"]
                res[f"{g}_{k}_ratio"] = ratio
                print(f"  {g:6s} pyvmm/qemu median {k} overhead ratio: {ratio:.2f}")
    print("saved", save("memory", res))
    return res


if __name__ == "__main__":
    main()
