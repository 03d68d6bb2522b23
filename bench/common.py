"""Helpers shared by the benchmarks: repeated timing with min/median/max,
spawning a VMM and waiting for a marker on its console, QEMU command lines."""
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
QEMU = "qemu-system-x86_64"


def stats(samples):
    """min / median / max of the samples; None entries are failed samples:
    they are counted ("failed") and reported, never silently dropped.  None
    if every sample failed."""
    good = [s for s in samples if s is not None]
    if not good:
        return None
    out = {"min": min(good), "median": statistics.median(good), "max": max(good),
           "n": len(good)}
    if len(good) != len(samples):
        out["failed"] = len(samples) - len(good)
        print(f"  warning: {out['failed']} of {len(samples)} samples failed", file=sys.stderr)
    return out


def fmt(s, unit="", scale=1.0, digits=3):
    return (f"{s['min'] * scale:.{digits}g} / {s['median'] * scale:.{digits}g} / "
            f"{s['max'] * scale:.{digits}g}{unit}")


def have_qemu():
    return shutil.which(QEMU) is not None


def qemu_cmd(kernel, initrd=None, cmdline=None, mem="256M"):
    cmd = [QEMU, "-M", "microvm,acpi=off", "-enable-kvm", "-cpu", "host,-arch-capabilities",
           "-m", mem, "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
           "-kernel", kernel]
    if initrd:
        cmd += ["-initrd", initrd]
    if cmdline:
        cmd += ["-append", cmdline]
    return cmd


def pyvmm_launcher():
    """What a user runs: the `pyvmm` script (scripts/pyvmm) `make install` put
    beside this interpreter (`python -m vmm` also loads runpy and
    importlib.util, ~3 ms a user of the script does not pay); `python -m vmm`
    without one."""
    script = os.path.join(os.path.dirname(sys.executable), "pyvmm")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "vmm"]


def pyvmm_cmd(kernel, initrd=None, cmdline=None, mem="256M"):
    cmd = pyvmm_launcher() + ["run", "--kernel", kernel, "--mem", mem]
    if initrd:
        cmd += ["--initrd", initrd]
    if cmdline is not None:
        cmd += ["--cmdline", cmdline]
    return cmd


def read_markers(fd, markers, t0, timeout):
    """Read `fd` (a VMM's console) until each byte string of `markers` has
    appeared, in order, or `timeout` seconds after `t0` (a monotonic time)
    pass or the output ends.  Returns ({marker: seconds since t0 when it
    arrived}, the last 300 bytes read)."""
    seen, want, buf, tail = {}, list(markers), b"", b""
    while want:
        left = t0 + timeout - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        now = time.monotonic() - t0
        buf += chunk
        tail = (tail + chunk)[-300:]
        while want and want[0] in buf:
            buf = buf[buf.index(want[0]) + len(want[0]):]
            seen[want.pop(0)] = now
        if want:
            buf = buf[-len(want[0]):]          # enough to catch a marker split across reads
    return seen, tail


def spawn_markers(cmd, markers, timeout):
    """Spawn `cmd`, return read_markers()'s times for its stdout; the process
    is killed afterwards.  Missing markers are absent."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         stdin=subprocess.DEVNULL)
    try:
        return read_markers(p.stdout.fileno(), markers, t0, timeout)[0]
    finally:
        p.kill()
        p.wait()


def time_to_marker(cmd, marker, timeout):
    """Seconds from spawning `cmd` until `marker` (bytes) appears on its
    stdout; None on timeout."""
    return spawn_markers(cmd, [marker], timeout).get(marker)


def compare(results, title, unit, scale=1.0, detail=None):
    """Print {"pyvmm": stats, "qemu": stats} under `title`; returns the
    pyvmm/qemu median ratio (None without both).  `detail(stats)` may add a
    note after each line."""
    print(f"{title} (min / median / max)")
    for name, s in results.items():
        if not s or "median" not in s:
            print(f"  {name:6s} FAILED ({(s or {}).get('failed', '?')} samples)")
            continue
        extra = f"   ({detail(s)})" if detail else ""
        print(f"  {name:6s} {fmt(s, unit, scale)}{extra}")
    if "median" in results.get("pyvmm", {}) and "median" in results.get("qemu", {}):
        ratio = results["pyvmm"]["median"] / results["qemu"]["median"]
        print(f"  pyvmm/qemu median ratio: {ratio:.2f}")
        return ratio
    return None


def save(name, data):
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, f"{name}.json")
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    return path
