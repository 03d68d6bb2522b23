"""Snapshots of the default guest at its shell (256 MiB): create time and
size of a Full and of a Diff snapshot; restore -> guest running (VMM process
spawned until its vCPUs run again; and the part after the interpreter and
imports: Machine() built from the files) and restore -> shell answering a
typed command, next to the cold boot -> shell prompt of the same guest.  pyvmm
only (QEMU's savevm/loadvm is not the same operation); Firecracker's
published restore latency (a few ms, hardware KVM) is the anchor.

`python -m bench.snapshot [--reps N] [--mem 256M]`; min / median / max.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from bench.common import read_markers, save, stats
from vmm import guest

BOOT_TIMEOUT = 1800


def take(d, mem):
    """Cold boot to the shell, Full snapshot, one command, Diff snapshot.
    Returns (seconds to the shell prompt, [full figures, diff figures])."""
    steps = ["wait:shell ready", "wait:/ # ", "sleep:1", f"snap:Full:{d}/full.state:{d}/full.mem",
             "type:echo $((6*7))-diff\\n", "wait:42-diff", "wait:/ # ",
             f"snap:Diff:{d}/diff.state:{d}/diff.mem", "stop"]
    cmd = [sys.executable, "-m", "vmm.testing.snapshooter", "--step-timeout", str(BOOT_TIMEOUT)]
    for s in steps:
        cmd += ["--step", s]
    cmd += ["--", "--mem", mem, "--track-dirty-pages"]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    t.start()
    seen, _ = read_markers(p.stdout.fileno(), [b"shell ready", b"/ # "], t0, BOOT_TIMEOUT)
    p.stdout.read()
    rc = p.wait(BOOT_TIMEOUT)
    t.join(10)
    text = b"".join(err).decode(errors="replace")
    figures = [json.loads(line.split(": ", 1)[1]) for line in text.splitlines()
               if line.startswith("snapshooter: {")]
    if rc != 0 or len(figures) != 2 or b"/ # " not in seen:
        raise RuntimeError(f"snapshot run failed (status {rc}): {text[-500:]}")
    return seen[b"/ # "], figures


def restore_once(d):
    """(ms until the vCPUs run, ms until the shell answered) for one restore."""
    cmd = [sys.executable, "-m", "vmm", "restore", "--snapshot", f"{d}/full.state",
           "--mem", f"{d}/full.mem", "--resume", "--debug", "--timeout", "300"]
    t_wall, t0 = time.time(), time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE)
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    t.start()
    try:
        p.stdin.write(b"echo $((6*7))-answer\n")
        p.stdin.flush()
        seen, _ = read_markers(p.stdout.fileno(), [b"42-answer"], t0, 300)
    finally:
        p.kill()
        p.wait()
        t.join(10)
    m = re.search(rb"restore: vCPUs running at ([0-9.]+) \(([0-9.]+) ms after Machine", b"".join(err))
    if m is None or b"42-answer" not in seen:
        raise RuntimeError("restore did not run or answer: " + b"".join(err)[-300:].decode(errors="replace"))
    return (float(m.group(1)) - t_wall) * 1000, seen[b"42-answer"] * 1000, float(m.group(2))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="restores")
    ap.add_argument("--mem", default="256M")
    args = ap.parse_args(argv)
    if not os.path.exists(guest.default_guest()[0]):
        raise SystemExit("default guest not built: run `make guest`")
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-snap-") as d:
        boot_s, (full, diff) = take(d, args.mem)
        running, answered, built = [], [], []
        for _ in range(args.reps):
            r, a, b = restore_once(d)
            running.append(r)
            answered.append(a)
            built.append(b)
    res = {"mem": args.mem,
           "cold_boot_to_shell_s": boot_s,
           "full": {"create_ms": full["seconds"] * 1000, "mem_mib": full["mem_bytes"] / 2**20,
                    "state_kib": full["state_bytes"] / 1024, "pause_ms": full["pause_seconds"] * 1000},
           "diff": {"create_ms": diff["seconds"] * 1000, "mem_mib": diff["mem_bytes"] / 2**20,
                    "state_kib": diff["state_bytes"] / 1024},
           "restore_to_running_ms": stats(running),
           "restore_in_process_ms": stats(built),
           "restore_to_shell_answer_ms": stats(answered)}
    print(f"guest {args.mem}: cold boot -> shell prompt {boot_s:.1f} s")
    for k in ("full", "diff"):
        f = res[k]
        print(f"  {k:4s} snapshot: create {f['create_ms']:.0f} ms, memory file {f['mem_mib']:.1f} MiB "
              f"written, state {f['state_kib']:.0f} KiB")
    for k, label in (("restore_to_running_ms", "restore -> vCPUs running"),
                     ("restore_in_process_ms", "  of which Machine() from the files"),
                     ("restore_to_shell_answer_ms", "restore -> shell answered")):
        s = res[k]
        print(f"  {label}: {s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f} ms (min / median / max)")
    save("snapshot", res)
    return res


if __name__ == "__main__":
    main()
