"""Snapshots of the default guest at its shell (256 MiB): create time and
size of a Full and of a Diff snapshot; restore -> guest running (VMM process
spawned until its vCPUs run again; and the part after the interpreter and
imports: Machine() built from the files); the restore latency as Firecracker
measures it (PUT /snapshot/load with resume_vm sent to a `pyvmm api` process
that is already up and idle, until its vCPUs run); and restore -> shell
answering a typed command, next to the cold boot -> shell prompt of the same guest.  pyvmm
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
from vmm.api.client import ApiClient, wait_for_socket

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
    m = _restored(err, seen, "restore")
    return (float(m.group(1)) - t_wall) * 1000, seen[b"42-answer"] * 1000, float(m.group(2))


def _restored(err, seen, what):
    """The VMM's --debug line "restore: vCPUs running at T (X ms after
    Machine...)" from its stderr chunks `err`, once the guest has answered."""
    m = re.search(rb"restore: vCPUs running at ([0-9.]+) \(([0-9.]+) ms after Machine", b"".join(err))
    if m is None or b"42-answer" not in seen:
        raise RuntimeError(f"{what} did not run or answer: "
                           + b"".join(err)[-300:].decode(errors="replace"))
    return m


def api_load_once(d, n):
    """ms from sending PUT /snapshot/load (resume_vm) to a `pyvmm api` that has
    been up and idle for a second until its vCPUs run, and the request's own
    round trip; the restored guest must then answer a command."""
    sock = os.path.join(d, f"api-{n}.sock")
    p = subprocess.Popen([sys.executable, "-m", "vmm", "api", "--api-sock", sock, "--debug"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE)
    err = []
    t = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    t.start()
    try:
        if not wait_for_socket(sock, 60, p):
            raise RuntimeError("pyvmm api did not open its socket")
        api = ApiClient(sock, timeout=120)
        api.get("/")
        time.sleep(1.0)                  # idle, as a VMM waiting for its orchestrator
        t_wall, t0 = time.time(), time.monotonic()
        api.put("/snapshot/load", {"snapshot_path": f"{d}/full.state", "resume_vm": True,
                                   "mem_backend": {"backend_type": "File",
                                                   "backend_path": f"{d}/full.mem"}})
        answered_ms = (time.monotonic() - t0) * 1000
        p.stdin.write(b"echo $((6*7))-answer\n")
        p.stdin.flush()
        seen, _ = read_markers(p.stdout.fileno(), [b"42-answer"], t0, 300)
        api.close()
    finally:
        p.kill()
        p.wait()
        t.join(10)
    m = _restored(err, seen, "API restore")
    return (float(m.group(1)) - t_wall) * 1000, answered_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="restores")
    ap.add_argument("--mem", default="256M")
    args = ap.parse_args(argv)
    if not os.path.exists(guest.default_guest()[0]):
        raise SystemExit("default guest not built: run `make guest`")
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-snap-") as d:
        boot_s, (full, diff) = take(d, args.mem)
        running, answered, built, api_running, api_rtt = [], [], [], [], []
        for n in range(args.reps):
            r, a, b = restore_once(d)
            running.append(r)
            answered.append(a)
            built.append(b)
            r, a = api_load_once(d, n)
            api_running.append(r)
            api_rtt.append(a)
    res = {"mem": args.mem,
           "cold_boot_to_shell_s": boot_s,
           "full": {"create_ms": full["seconds"] * 1000, "mem_mib": full["mem_bytes"] / 2**20,
                    "state_kib": full["state_bytes"] / 1024, "pause_ms": full["pause_seconds"] * 1000},
           "diff": {"create_ms": diff["seconds"] * 1000, "mem_mib": diff["mem_bytes"] / 2**20,
                    "state_kib": diff["state_bytes"] / 1024},
           "restore_api_to_running_ms": stats(api_running),
           "restore_api_request_ms": stats(api_rtt),
           "restore_to_running_ms": stats(running),
           "restore_in_process_ms": stats(built),
           "restore_to_shell_answer_ms": stats(answered)}
    print(f"guest {args.mem}: cold boot -> shell prompt {boot_s:.1f} s")
    for k in ("full", "diff"):
        f = res[k]
        print(f"  {k:4s} snapshot: create {f['create_ms']:.0f} ms, memory file {f['mem_mib']:.1f} MiB "
              f"written, state {f['state_kib']:.0f} KiB")
    for k, label in (("restore_api_to_running_ms", "PUT /snapshot/load -> vCPUs running"),
                     ("restore_api_request_ms", "PUT /snapshot/load round trip"),
                     ("restore_to_running_ms", "restore -> vCPUs running"),
                     ("restore_in_process_ms", "  of which Machine() from the files"),
                     ("restore_to_shell_answer_ms", "restore -> shell answered")):
        s = res[k]
        print(f"  {label}: {s['min']:.0f} / {s['median']:.0f} / {s['max']:.0f} ms (min / median / max)")
    save("snapshot", res)
    return res


if __name__ == "__main__":
    main()
