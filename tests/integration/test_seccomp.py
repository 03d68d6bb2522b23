"""seccomp-bpf confinement (issue #14): a forbidden system call on any VMM
thread ends the VMM with SIGSYS after one line naming the thread kind and
the call; tiny guests (and, in the other integration tests, the default
guest) run normally with the filters on.

The forbidden call comes from the test-only PYVMM_SECCOMP_SELFTEST=<kind>
(vmm/seccomp.py): the host user's environment, never the guest's."""
import os
import signal
import subprocess
import sys

import pytest

import vmm.testing.tinyguest as T
from vmm import seccomp

pytestmark = pytest.mark.usefixtures("needs_kvm")


def boot(tmp_path, code, *extra, env=None, timeout=60):
    k = T.make_elf(code, str(tmp_path / "guest.elf"))
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", k, "--mem", "32M", *extra],
                       capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, **(env or {})))
    return p.returncode, p.stdout, p.stderr.decode()


@pytest.mark.parametrize("kind", ["main", "vcpu", "io", "console"])
def test_forbidden_syscall_ends_vmm_with_sigsys(tmp_path, kind):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    rc, _, err = boot(tmp_path, T.HLT_LOOP, "--timeout", "20", "--drive", f"file={img}",
                      env={seccomp.SELFTEST_ENV: kind})
    assert rc == -signal.SIGSYS, (rc, err)
    lines = [l for l in err.splitlines() if "seccomp" in l]
    from vmm.native import lib
    nr = lib.pv_seccomp_resolve(b"sync")
    assert lines == [f"pyvmm: seccomp: {kind} thread made a forbidden system call: sync "
                     f"({nr}); ending the VMM"], err
    assert not list(tmp_path.glob("core*"))                 # no core file with guest memory


def test_no_seccomp_flag_leaves_threads_unconfined(tmp_path):
    rc, out, err = boot(tmp_path, T.serial_text("ok\n") + T.CLI_HLT, "--timeout", "20",
                        "--no-seccomp", env={seccomp.SELFTEST_ENV: "vcpu"})
    assert rc == 0 and out == b"ok\n", err


def test_guest_runs_and_exits_normally_with_filters(tmp_path):
    imgs = [tmp_path / "a.img", tmp_path / "b.img"]
    for img in imgs:
        img.write_bytes(bytes(1 << 20))
    rc, out, err = boot(tmp_path, T.serial_text("confined\n") + T.CLI_HLT, "--timeout", "20",
                        "--drive", f"file={imgs[0]}", "--drive", f"file={imgs[1]},transport=pci")
    assert rc == 0 and out == b"confined\n", err


def test_every_name_in_the_table_is_a_system_call():
    from vmm.native import lib
    for kind, names in seccomp.ALLOW.items():
        for n in names:
            assert lib.pv_seccomp_resolve(n.encode()) >= 0, (kind, n)
    assert "sync" not in set().union(*seccomp.ALLOW.values())   # the self-test's call


def test_unknown_kind_refused():
    with pytest.raises(seccomp.SeccompError):
        seccomp.apply("gpu")
