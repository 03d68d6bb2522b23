"""seccomp-bpf confinement (issue #14): a forbidden system call on any VMM
thread ends the VMM with SIGSYS after one line naming the thread kind and
the call; tiny guests (and, in the other integration tests, the default
guest) run normally with the filters on.

The forbidden call comes from the test-only PYVMM_SECCOMP_SELFTEST=<kind>
(vmm/seccomp.py): the host user's environment, never the guest's."""
import errno
import os
import signal
import subprocess
import sys

import pytest

import vmm.testing.tinyguest as T
from vmm import seccomp

pytestmark = pytest.mark.usefixtures("needs_kvm")


def boot(tmp_path, code, *extra, env=None, timeout=180):
    k = T.make_elf(code, str(tmp_path / "guest.elf"))
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", k, "--mem", "32M", *extra],
                       capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL,
                       env=dict(os.environ, **(env or {})))
    return p.returncode, p.stdout, p.stderr.decode()


@pytest.mark.parametrize("kind", ["main", "vcpu", "io", "console"])
def test_forbidden_syscall_ends_vmm_with_sigsys(tmp_path, kind):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    rc, _, err = boot(tmp_path, T.HLT_LOOP, "--timeout", "120", "--drive", f"file={img}",
                      env={seccomp.SELFTEST_ENV: kind})
    assert rc == -signal.SIGSYS, (rc, err)
    lines = [l for l in err.splitlines() if "seccomp" in l]
    from vmm.native import lib
    nr = lib.pv_seccomp_resolve(b"sync")
    assert lines == [f"pyvmm: seccomp: {kind} thread made a forbidden system call: sync "
                     f"({nr}); ending the VMM"], err
    assert not list(tmp_path.glob("core*"))                 # no core file with guest memory


def test_no_seccomp_flag_leaves_threads_unconfined(tmp_path):
    rc, out, err = boot(tmp_path, T.serial_text("ok\n") + T.CLI_HLT, "--timeout", "120",
                        "--no-seccomp", env={seccomp.SELFTEST_ENV: "vcpu"})
    assert rc == 0 and out == b"ok\n", err


def test_guest_runs_and_exits_normally_with_filters(tmp_path):
    imgs = [tmp_path / "a.img", tmp_path / "b.img"]
    for img in imgs:
        img.write_bytes(bytes(1 << 20))
    rc, out, err = boot(tmp_path, T.serial_text("confined\n") + T.CLI_HLT, "--timeout", "120",
                        "--drive", f"file={imgs[0]}", "--drive", f"file={imgs[1]},transport=pci")
    assert rc == 0 and out == b"confined\n", err


def test_every_name_in_the_table_is_a_system_call():
    from vmm.native import lib
    for kind, entries in seccomp.ALLOW.items():
        for e in entries:
            name, _, _ = seccomp.parse_entry(e)
            assert lib.pv_seccomp_resolve(name.encode()) >= 0, (kind, e)
    assert "sync" not in set().union(*seccomp.ALLOW.values())   # the self-test's call


ARG_PROBE = """
import socket, sys, threading
from vmm import seccomp
seccomp.enable()
def io():
    seccomp.apply("io")
    socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close()
    print("unix ok", flush=True)
    socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    print("inet ok", flush=True)
t = threading.Thread(target=io); t.start(); t.join()
"""


def test_argument_rule_allows_unix_sockets_only():
    """'socket(a0==AF_UNIX)' in the io list: vsock's Unix sockets work, an
    Internet socket from an I/O thread ends the VMM."""
    p = subprocess.run([sys.executable, "-c", ARG_PROBE], capture_output=True, text=True,
                       timeout=60)
    assert p.stdout == "unix ok\n" and p.returncode == -signal.SIGSYS, p.stderr
    assert "io thread made a forbidden system call: socket" in p.stderr


OVERCOMMIT_PROBE = """
import os, threading
from vmm import seccomp
seccomp.enable()
def io():
    seccomp.apply("io")
    try:
        os.open("/proc/sys/vm/overcommit_memory", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        print("glibc's open answered ENOENT", flush=True)
    os.open("/proc/sys/vm/swappiness", os.O_RDONLY)
    print("other open allowed", flush=True)
t = threading.Thread(target=io); t.start(); t.join()
"""


def test_glibc_overcommit_open_is_answered_not_fatal():
    """glibc's malloc opens /proc/sys/vm/overcommit_memory when a thread
    arena first shrinks, on any thread at any time (it ended `pyvmm api
    --no-api` with SIGSYS once): that one open fails with ENOENT, any other
    open still ends the VMM."""
    p = subprocess.run([sys.executable, "-c", OVERCOMMIT_PROBE], capture_output=True, text=True,
                       timeout=60)
    assert p.stdout == "glibc's open answered ENOENT\n", p.stdout + p.stderr
    assert p.returncode == -signal.SIGSYS and "io thread made a forbidden system call: openat" in p.stderr


DEBUG_TB_PROBE = """
import logging, threading
logging.basicConfig(level=logging.DEBUG, format="pyvmm: %(message)s")
from vmm import seccomp
from vmm.virtio.ioloop import IoLoop
loop = IoLoop("io-test"); loop.start()
seccomp.enable()
seccomp.apply_in(loop, "io")
def bad():
    raise ValueError("handler bug")
after = threading.Event()
loop.call_soon(bad)
loop.call_soon(after.set)          # runs once bad()'s error is logged
assert after.wait(60), "the I/O thread did not run its calls"
print("survived", flush=True)
loop.stop()
"""


def test_debug_traceback_on_a_confined_thread_does_not_end_the_vmm():
    """With --debug, an I/O handler's error is logged with its traceback;
    reading the frames' source lines (stat/open of .py files) on the confined
    thread ended the VMM with SIGSYS.  Now the traceback comes without them."""
    p = subprocess.run([sys.executable, "-c", DEBUG_TB_PROBE], capture_output=True, text=True,
                       timeout=120)
    assert p.stdout == "survived\n" and p.returncode == 0, p.stderr
    assert "Traceback" in p.stderr and "ValueError: handler bug" in p.stderr


def test_unknown_kind_refused():
    with pytest.raises(seccomp.SeccompError):
        seccomp.apply("gpu")


def test_every_kind_builds_to_a_bpf_program_ahead():
    """build() is what apply() installs: a whole number of BPF instructions,
    one per kind, made once; a buffer too small is an error, not a cut filter."""
    from vmm.native import ffi, lib
    for kind in seccomp.ALLOW:
        prog, size = seccomp.build(kind)
        assert size > 0 and size % 8 == 0          # struct sock_filter is 8 bytes
        assert seccomp.build(kind) == (prog, size)
    _, keep, arr, idx, val, n = seccomp._rules("vcpu")
    out = ffi.new("char[]", 16)
    assert lib.pv_seccomp_compile(arr, idx, val, n, ffi.new("int *"), out, 16) == -errno.ENOSPC
