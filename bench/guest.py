"""Guest user-space figures (software KVM: user mode runs natively, system
calls take the guest kernel's page-fault path, see guests/patches/0002):

- cost of one system call: `sysbench` (guests/src/sysbench.c) times 20000
  getppid() calls inside the default guest;
- time from "Run /init" to the busybox shell prompt;
- boot to power-off of the default guest (`pyvmm.test=poweroff`, exit 0).

`python -m bench.guest [--reps N]`; min / median / max over N runs.
"""
import argparse
import re
import subprocess
import sys
import time

from bench.common import fmt, save, stats
from vmm import guest

BASE = guest.DEFAULT_CMDLINE


def run_guest(test, timeout=300):
    """Returns (wall seconds, console text, exit status)."""
    kernel, initrd = guest.default_guest()
    cmd = [sys.executable, "-m", "vmm", "run", "--kernel", kernel, "--initrd", initrd,
           "--timeout", str(timeout), "--cmdline", f"{BASE} pyvmm.test={test}"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, capture_output=True, timeout=timeout + 30, stdin=subprocess.DEVNULL)
    return time.monotonic() - t0, p.stdout.decode(errors="replace"), p.returncode


def init_to_prompt(timeout=300):
    """Seconds from the kernel's "Run /init" line to the shell prompt, read
    live from the console of a guest left at its shell."""
    kernel, initrd = guest.default_guest()
    p = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--kernel", kernel, "--initrd", initrd,
                          "--timeout", str(timeout)], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, stdin=subprocess.PIPE)
    buf, t_init = b"", None
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = p.stdout.read1(4096)
            if not chunk:
                return None
            buf += chunk
            if t_init is None and b"Run /init as init process" in buf:
                t_init = time.monotonic()
            if t_init is not None and b"/ # " in buf[buf.find(b"shell ready"):]:
                return time.monotonic() - t_init
        return None
    finally:
        p.kill()
        p.wait()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args(argv)
    syscall_ns, poweroff_s, prompt_s = [], [], []
    for _ in range(args.reps):
        _, out, rc = run_guest("syscall")
        m = re.search(r"sysbench: (\d+) getppid calls in (\d+) us, (\d+) ns each", out)
        syscall_ns.append(int(m.group(3)) if m and rc == 0 else None)
        wall, out, rc = run_guest("poweroff")
        poweroff_s.append(wall if rc == 0 and "pyvmm-guest: done" in out else None)
        prompt_s.append(init_to_prompt())
    res = {}
    for key, samples, label, unit in (("syscall_ns", syscall_ns, "guest getppid() cost", " ns"),
                                      ("init_to_prompt_s", prompt_s, "Run /init -> shell prompt", " s"),
                                      ("boot_to_poweroff_s", poweroff_s, "boot -> power-off (exit 0)", " s")):
        s = stats(samples)
        res[key] = s if s else {"failed": len(samples)}
        print(f"{label:28s}{fmt(s, unit) if s else 'FAILED'}")
    print("saved", save("guest", res))
    return res


if __name__ == "__main__":
    main()
