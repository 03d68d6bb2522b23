"""What a user-mode `syscall`, `int $0x80` and `sysenter` deliver on this
host (issue: guest user space on software KVM).  tests/probes/syscall_probe.S
is a ring-0 guest that drops to ring 3 and reports each outcome on COM1."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from vmm.kvm.system import software_kvm

pytestmark = pytest.mark.usefixtures("needs_kvm")
PROBE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "probes",
                     "syscall_probe.S")
USER = 0x400000


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    if not (shutil.which("as") and shutil.which("ld")):
        pytest.fail("binutils (as, ld) are needed to build the probe")
    d = tmp_path_factory.mktemp("probe")
    obj, elf = str(d / "probe.o"), str(d / "probe.elf")
    subprocess.run(["as", "--64", "-o", obj, PROBE], check=True)
    subprocess.run(["ld", "-nostdlib", "-static", "-Ttext=0x200000", "-e", "_start", "-o", elf, obj],
                   check=True)
    nm = subprocess.run(["nm", elf], capture_output=True, text=True, check=True).stdout
    lstar = int(re.search(r"^([0-9a-f]+) t syscall_entry$", nm, re.M).group(1), 16)
    return elf, lstar


def run_probe(elf, template):
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", elf, "--mem", "32M",
                        "--timeout", "60", "--cpu-template", template],
                       capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr
    lines = dict(line.split(": ", 1) for line in p.stdout.splitlines() if ": " in line)
    assert lines.get("probe") == "done", p.stdout
    fields = {name: dict(kv.split("=") for kv in rest.replace("entry ", "").split())
              for name, rest in lines.items() if name != "probe"}
    return {name: {k: int(v, 16) if v.startswith("0x") else int(v) for k, v in f.items()}
            for name, f in fields.items()}


@pytest.mark.parametrize("template", ["host", "minimal"])
def test_user_mode_system_call_instructions(probe, template):
    elf, lstar = probe
    r = run_probe(elf, template)
    syscall_return = USER + 7          # after `mov $39, %eax; syscall`
    if software_kvm():
        # Measured on kvm_pvm: `syscall` jumps to LSTAR but stays at CPL 3, so
        # the guest gets a user-mode #PF (P|U) on the supervisor page at
        # LSTAR, with RCX/R11 as `syscall` set them and RAX intact.  This is
        # what guests/patches/0002-kvm-pvm-syscall-from-page-fault.patch uses.
        s = r["syscall"]
        assert (s["vec"], s["err"], s["cs"]) == (14, 0x5, 0x23)
        assert s["rip"] == s["cr2"] == lstar
        assert s["rcx"] == syscall_return and s["rax"] == 39
        assert s["r11"] & 0x2
        # `int $0x80` through a DPL-3 gate raises #UD at the instruction.
        assert (r["int80"]["vec"], r["int80"]["rip"]) == (6, USER + 16 + 5)
    else:
        assert r["syscall"]["cpl"] == 0 and r["syscall"]["rcx"] == syscall_return
        assert r["int80"]["vec"] == 0x80
    # sysenter from 64-bit user mode: #UD on AMD, ring-0 entry on Intel.
    assert "sysenter" in r
