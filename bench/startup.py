"""Where `pyvmm run`'s time to the guest's first instruction goes, side by
side with QEMU's total.

    python -m bench.startup [--reps 5]

The guest is bench/boot.py's tiny ELF whose first instruction writes "!" to
the UART.  pyvmm is started through a small runner that wraps the start-up
steps with timestamps on CLOCK_MONOTONIC (shared by all processes, so the
parent's spawn time and the child's steps are on one clock):

  spawn + interpreter   fork/exec, interpreter init and site (incl. .pth files)
  imports               `import vmm.cli` and everything it pulls in
  guest memory          GuestMemory (mmap of --mem)
  kernel load           ELF / bzImage parse and copy, initrd
  KVM setup             /dev/kvm, VM, irqchip, memory slot, supported CPUID
  PIT (wait left)       KVM_CREATE_PIT2 runs on a thread beside the steps
                        below; what is left of it when the vCPUs are made
  devices               UART, i8042, pvpanic, virtio attach
  boot structures       zero page, MP table, GDT, page tables
  seccomp filters       the threads' filters built (while the PIT is made)
  vCPU setup            KVM_CREATE_VCPU, CPUID, MSRs, LAPIC, registers
  other                 argument parsing, config, the rest of Machine()
                        (the console starts after the first KVM_RUN)
  vCPU thread start...  Machine.run() to the first KVM_RUN: signal
                        handlers, vCPU thread start, its filter installed
  first KVM_RUN ->      the guest's first instruction (an `out`), the exit,
  output read           the UART write and the pipe until "!" reaches us

Also: the import time per top-level module (`python -X importtime`, self
time summed per package, of the same `pyvmm run` as users start it), and
QEMU's start → first instruction, measured in turn with pyvmm's runs.

pyvmm's modules are measured as installed (`make install` compiles their
bytecode, as pip does for a non-editable install); with no bytecode cache and
PYTHONDONTWRITEBYTECODE set, each start compiles them again (about 50 ms of
CPU more on this host).
"""
import argparse
import ast
import os
import re
import select
import subprocess
import sys
import tempfile
import time

from bench.common import have_qemu, pyvmm_cmd, qemu_cmd, save, stats
from vmm.testing import tinyguest

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = r"""
import time
T = {"main": time.monotonic()}
import os, sys
from vmm import cli
T["imports"] = time.monotonic()
from vmm import machine as M
def wrap(obj, name, key):
    f = getattr(obj, name)
    def w(*a, **k):
        t = time.monotonic()
        try:
            return f(*a, **k)
        finally:
            T[key] = T.get(key, 0) + time.monotonic() - t
    setattr(obj, name, w)
wrap(M, "GuestMemory", "guest memory")
wrap(M.loader, "load_kernel", "kernel load")
wrap(M.boot, "load_initrd", "kernel load")
wrap(M.Vm, "setup_platform", "KVM setup")
wrap(M.Vm, "add_memory", "KVM setup")
wrap(M.Kvm, "supported_cpuid", "KVM setup")
wrap(M, "Kvm", "KVM setup")
wrap(M, "Vm", "KVM setup")
wrap(M.Machine, "_add_legacy_devices", "devices")
wrap(M.boot, "write_zero_page", "boot structures")
wrap(M.mptable, "write", "boot structures")
wrap(M.regs, "write_gdt", "boot structures")
wrap(M.regs, "write_page_tables", "boot structures")
wrap(M.Vcpu, "set_cpuid", "vCPU setup")
wrap(M.Vcpu, "set_msrs", "vCPU setup")
wrap(M, "Vcpu", "vCPU setup")
wrap(M.regs, "setup_lapic", "vCPU setup")
wrap(M.regs, "setup_sregs", "vCPU setup")
wrap(M.regs, "setup_regs", "vCPU setup")
wrap(M.regs, "setup_fpu", "vCPU setup")
if hasattr(M, "_on_thread"):            # the PIT made on a thread: the time left to wait for it
    on_thread = M._on_thread
    def on_thread_w(fn, name):
        wait = on_thread(fn, name)
        def w():
            t = time.monotonic()
            try:
                return wait()
            finally:
                T["PIT (wait left)"] = T.get("PIT (wait left)", 0) + time.monotonic() - t
        return w
    M._on_thread = on_thread_w
from vmm import seccomp
if hasattr(seccomp, "build_quietly"):
    wrap(seccomp, "build_quietly", "seccomp filters (build)")
run = M.Machine.run
def run_w(self, *a, **k):
    T["run"] = time.monotonic()
    return run(self, *a, **k)
M.Machine.run = run_w
from vmm.kvm.vcpu import Vcpu
vrun = Vcpu.run
def vrun_w(self):
    if "kvm_run" not in T:
        T["kvm_run"] = time.monotonic()
        # repr: json is not pyvmm's to load; the write happens with the guest
        # already started, the time is taken before
        os.write(2, ("STARTUP " + repr(T) + "\n").encode())
    return vrun(self)
Vcpu.run = vrun_w
# through vmm.__main__ as the pyvmm command runs it (with its GC pause for `run`)
from vmm.__main__ import main
sys.exit(main(sys.argv[1:]))
"""
STEPS = ("guest memory", "kernel load", "KVM setup", "PIT (wait left)", "devices", "boot structures",
         "seccomp filters (build)", "vCPU setup")


def one(elf):
    t0 = time.monotonic()
    p = subprocess.Popen([sys.executable, "-c", RUNNER, "run", "--kernel", elf, "--mem", "64M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         cwd=HERE)
    t_bang, steps, err = None, None, b""
    try:
        while time.monotonic() - t0 < 30 and (t_bang is None or steps is None):
            r, _, _ = select.select([p.stdout, p.stderr], [], [], 1)
            for f in r:
                b = os.read(f.fileno(), 4096)
                if f is p.stdout and b"!" in b and t_bang is None:
                    t_bang = time.monotonic()
                if f is p.stderr:
                    err += b
                    m = re.search(rb"STARTUP (\{.*\})\n", err)
                    if m:
                        steps = ast.literal_eval(m.group(1).decode())
    finally:
        p.kill()
        p.wait()
    if t_bang is None or steps is None:
        return None
    out = {"spawn + interpreter": steps["main"] - t0, "imports": steps["imports"] - steps["main"]}
    accounted = 0.0
    for s in STEPS:
        out[s] = steps.get(s, 0.0)
        accounted += out[s]
    out["other (arguments, config)"] = max(0.0, steps["run"] - steps["imports"] - accounted)
    out["vCPU thread start, filters in, first KVM_RUN"] = steps["kvm_run"] - steps["run"]
    out["first KVM_RUN -> output read"] = t_bang - steps["kvm_run"]
    out["total"] = t_bang - t0
    return out


def import_breakdown(elf):
    """Self time of every import of `pyvmm run` (the tiny guest, as users
    start it) per top-level package (us -> s)."""
    cmd = pyvmm_cmd(elf, mem="64M") + ["--serial", "file:/dev/null"]
    if cmd[0] != sys.executable:            # the pyvmm script: run it with -X importtime
        cmd = [sys.executable] + cmd
    p = subprocess.run([sys.executable, "-X", "importtime"] + cmd[1:],
                       capture_output=True, text=True, cwd=HERE, timeout=60)
    per = {}
    for line in p.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
        if not m:
            continue
        name = m.group(4)
        top = name.split(".")[0]
        if name.startswith("vmm._native"):
            top = "vmm._native (cffi extension)"
        elif top == "vmm":
            top = "vmm (pyvmm's modules)"
        elif top.startswith("__editable__"):
            top = "setuptools editable-install finder"
        per[top] = per.get(top, 0) + int(m.group(1)) / 1e6
    return dict(sorted(per.items(), key=lambda kv: -kv[1])[:15])


def qemu_first(elf):
    cmd = qemu_cmd(elf, mem="64M")
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        while time.monotonic() - t0 < 30:
            if select.select([p.stdout], [], [], 1)[0]:
                b = os.read(p.stdout.fileno(), 4096)
                if b"!" in b:
                    return time.monotonic() - t0
                if not b:
                    return None
    finally:
        p.kill()
        p.wait()
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pyvmm-bench-") as d:
        elf = tinyguest.make_elf(tinyguest.serial_text("!") + tinyguest.CLI_HLT, os.path.join(d, "t.elf"))
        one(elf)                                   # warm the page cache
        runs, q = [], []
        for _ in range(args.reps):                 # in turn: load changes fall on both
            runs.append(one(elf))
            if have_qemu():
                q.append(qemu_first(elf))
        imports = import_breakdown(elf)
    good = [r for r in runs if r]
    res = {"what": "pyvmm run -> first guest instruction, by step (seconds)",
           "steps": {k: stats([r[k] for r in good]) for k in (good[0] if good else {})},
           "failed": len(runs) - len(good),
           "imports": imports}
    if q:
        res["qemu_total"] = stats(q) or {"failed": len(q)}
    for k, s in res["steps"].items():
        print(f"  {k:36s} {s['median'] * 1000:7.1f} ms")
    if q and "median" in res["qemu_total"]:
        print(f"  {'QEMU start -> first instruction':36s} {res['qemu_total']['median'] * 1000:7.1f} ms")
    print("  import self time by package (ms):",
          ", ".join(f"{k} {v * 1000:.1f}" for k, v in res["imports"].items()))
    print("saved", save("startup", res))
    return res


if __name__ == "__main__":
    main()
