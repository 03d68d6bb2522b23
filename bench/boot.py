"""Boot figures, pyvmm side by side with `qemu-system-x86_64 -M microvm`:

- start to first guest instruction: a tiny ELF (vmm.testing.tinyguest) whose first
  instruction writes a byte to the UART; time from spawning the VMM (the
  `pyvmm` command a user runs, bench.common.pyvmm_launcher; QEMU's binary)
  until the byte reaches its stdout, the same clock and the same pipe for
  both, the two VMMs started in turn;
- start to "Run /init as init process" for the default guest, with the same
  kernel, initramfs and command line for both VMMs (QEMU enters vmlinux via
  PVH, pyvmm via the 64-bit boot protocol entry).

`python -m bench.boot [--reps N] [--init-reps N]`; prints min / median / max.
"""
import argparse
import os
import sys
import tempfile

from bench.common import compare, have_qemu, pyvmm_cmd, qemu_cmd, save, stats, time_to_marker
from vmm import guest
from vmm.testing import tinyguest
from vmm.arch.x86 import cpuid

INIT_MARKER = b"Run /init as init process"


def first_instruction(reps):
    """Both VMMs side by side: one unmeasured start each first (page cache,
    KVM module state), then pyvmm and QEMU in turn, so a change in the
    machine's load during the run falls on both alike."""
    tmp = tempfile.TemporaryDirectory(prefix="pyvmm-bench-")
    elf = tinyguest.make_elf(tinyguest.serial_text("!") + tinyguest.CLI_HLT, os.path.join(tmp.name, "t.elf"))
    cmds = {"pyvmm": pyvmm_cmd(elf, mem="64M")}
    if have_qemu():
        cmds["qemu"] = qemu_cmd(elf, mem="64M")
    samples = {name: [] for name in cmds}
    for cmd in cmds.values():
        time_to_marker(cmd, b"!", 30)
    for _ in range(reps):
        for name, cmd in cmds.items():
            samples[name].append(time_to_marker(cmd, b"!", 30))
    out = {name: stats(v) or {"failed": reps} for name, v in samples.items()}
    tmp.cleanup()
    return out


def boot_to_init(reps):
    kernel, initrd = guest.default_guest()
    if not os.path.exists(kernel):
        print("no default guest: run `make guest`", file=sys.stderr)
        return {}
    cmdline = " ".join(filter(None, [guest.DEFAULT_CMDLINE, cpuid.kernel_args("auto")]))
    out = {}
    for name, cmd in (("pyvmm", pyvmm_cmd(kernel, initrd, cmdline + " pyvmm.test=poweroff")),
                      ("qemu", qemu_cmd(kernel, initrd, cmdline + " pyvmm.test=poweroff"))):
        if name == "qemu" and not have_qemu():
            continue
        # pyvmm adds the CPU template's arguments itself; pass the template that
        # adds nothing so both VMMs see the same command line.
        if name == "pyvmm":
            cmd += ["--cpu-template", "host"] if cpuid.kernel_args("auto") else []
        s = stats([time_to_marker(cmd, INIT_MARKER, 300) for _ in range(reps)])
        out[name] = s if s else {"failed": reps}
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="repetitions for first instruction")
    ap.add_argument("--init-reps", type=int, default=3, help="repetitions for boot to init")
    args = ap.parse_args(argv)
    res = {"first_instruction_s": first_instruction(args.reps),
           "boot_to_init_s": boot_to_init(args.init_reps)}
    for key, label, scale, unit in (("first_instruction_s", "start -> first instruction", 1000, " ms"),
                                    ("boot_to_init_s", "start -> Run /init", 1, " s")):
        ratio = compare(res[key], label, unit, scale)
        if ratio is not None:
            res[key + "_ratio"] = ratio
    print("saved", save("boot", res))
    return res


if __name__ == "__main__":
    main()
