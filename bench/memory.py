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


def category(path):
    """What a mapping of the VMM is, for the breakdown."""
    base = os.path.basename(path)
    if path.startswith("anon_inode:kvm") or path.startswith("anon_inode:[kvm"):
        return f"KVM structures ({base.split(':', 1)[-1]})"
    if path == "[heap]":
        return "C heap (malloc: interpreter, cffi, small Python allocations)"
    if path.startswith("[stack"):
        return "main thread stack"
    if path == "":
        return "anonymous mmaps (pymalloc arenas, thread stacks, buffers)"
    if "numpy" in path:
        return "numpy (shared objects)"
    if "_cffi_backend" in base:
        return "cffi backend (.so)"
    if base.startswith("_native") or "vmm/_native" in path:
        return "pyvmm native module (.so)"
    if "python" in base or "libpython" in base:
        return "Python interpreter (binary, libpython)"
    if base.endswith(".so") or ".so." in base:
        if "/lib-dynload/" in path or "site-packages" in path:
            return "Python extension modules (.so)"
        return "system libraries (libc, libm, ...)"
    if path.startswith("["):
        return f"kernel-provided {path}"
    return "other files"


def breakdown(pid, guest_size=GUEST_MEM):
    """{category: {"rss", "anon"}} in bytes, guest RAM left out; plus which
    numpy / cffi files are mapped at all."""
    maps = read_smaps(pid)
    cands = [m for m in maps if m["path"] == "" and guest_size <= m["size"] <= guest_size + 8 * MiB]
    ram = max(cands, key=lambda m: (m["rss"], -m["size"])) if cands else None
    out = {}
    for m in maps:
        if m is ram:
            continue
        c = out.setdefault(category(m["path"]), {"rss": 0, "anon": 0})
        c["rss"] += m["rss"]
        c["anon"] += m["anon"]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["rss"]))


# Python-level allocations per top-level module after start-up (tracemalloc):
# what each imported package costs in Python objects, for a tiny guest VM.
TRACE_RUNNER = r"""
import tracemalloc, sys, json, os
tracemalloc.start(1)
from vmm import cli, machine
M = machine.Machine
def run(self, *a, **k):
    snap = tracemalloc.take_snapshot()
    per = {}
    for st in snap.statistics("filename"):
        f = st.traceback[0].filename
        if "/vmm/" in f:
            key = "vmm." + f.split("/vmm/", 1)[1].replace("/", ".").removesuffix(".py")
            key = ".".join(key.split(".")[:2])
        elif "site-packages/" in f:
            key = f.split("site-packages/", 1)[1].split("/")[0]
        elif f.startswith("<"):
            key = "interpreter (frozen modules, compiled code)"
        else:
            key = "stdlib " + os.path.basename(os.path.dirname(f)) + "/" + os.path.basename(f)                 if "/lib/python" in f and os.path.basename(os.path.dirname(f)) != "python3.11"                 else "stdlib " + os.path.basename(f).removesuffix(".py")
        per[key] = per.get(key, 0) + st.size
    os.write(2, ("TRACE " + json.dumps(dict(sorted(per.items(), key=lambda kv: -kv[1])[:25]))
                 + " MODULES " + json.dumps(sorted(m for m in sys.modules if m.split(".")[0]
                                                   in ("numpy", "cffi", "_cffi_backend"))) + "\n").encode())
    return 0
M.run = run
sys.exit(cli.main(sys.argv[1:]))
"""


def python_allocations(elf):
    p = subprocess.run([sys.executable, "-c", TRACE_RUNNER, "run", "--kernel", elf, "--mem", "256M",
                        "--serial", "file:/dev/null"], capture_output=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    m = re.search(rb"TRACE (\{.*\}) MODULES (\[.*\])\n", p.stderr)
    if not m:
        return None
    import json
    return {"per_module_bytes": json.loads(m.group(1)), "numpy_or_cffi_modules": json.loads(m.group(2))}


def sample(cmd, ready, timeout, settle, stdin=subprocess.DEVNULL, want_breakdown=False):
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
        if want_breakdown:
            return overhead(p.pid), breakdown(p.pid)
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
        out = run_pair((("pyvmm", pyvmm_cmd(elf, mem="256M")), ("qemu", qemu_cmd(elf, mem="256M"))),
                       [READY], reps, 60, 1.0, subprocess.DEVNULL)
        got = sample(pyvmm_cmd(elf, mem="256M"), [READY], 60, 1.0, want_breakdown=True)
        if got:
            out["pyvmm_breakdown_mib"] = {k: {x: v[x] / MiB for x in v} for k, v in got[1].items()}
        out["pyvmm_python_allocations"] = python_allocations(elf)
        return out
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
            if name not in ("pyvmm", "qemu") or "rss" not in s:
                continue
            line = "  ".join(f"{k} {s[k]['min']:.1f}/{s[k]['median']:.1f}/{s[k]['max']:.1f}"
                             for k in ("rss", "anon", "guest_touched"))
            print(f"  {g:6s} {name:6s} {line}")
        if "rss" in r.get("pyvmm", {}) and "rss" in r.get("qemu", {}):
            for k in ("rss", "anon"):
                ratio = r["pyvmm"][k]["median"] / r["qemu"][k]["median"]
                res[f"{g}_{k}_ratio"] = ratio
                print(f"  {g:6s} pyvmm/qemu median {k} overhead ratio: {ratio:.2f}")
    bd = (res.get("tiny") or {}).get("pyvmm_breakdown_mib")
    if bd:
        print("pyvmm (tiny guest) RSS / anon by kind of mapping, guest RAM left out, MiB:")
        for k, v in bd.items():
            print(f"  {k:60s} {v['rss']:7.2f} {v['anon']:7.2f}")
    pa = (res.get("tiny") or {}).get("pyvmm_python_allocations")
    if pa:
        print("Python allocations by module (tracemalloc, KiB):",
              ", ".join(f"{k} {v / 1024:.0f}" for k, v in list(pa["per_module_bytes"].items())[:12]))
        print("numpy/cffi modules loaded:", pa["numpy_or_cffi_modules"])
    print("saved", save("memory", res))
    return res


if __name__ == "__main__":
    main()
