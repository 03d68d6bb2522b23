"""A tiny ring-0 guest with a virtio-vsock device (no driver: the device is
never activated) can be snapshotted and restored in a new process, which
listens on the same uds path again (vsock snapshots used to be refused),
or on another one with `pyvmm restore --vsock uds=PATH` (a clone).
The TRANSPORT_RESET a running driver gets after a restore is tested with the
mock driver (tests/unit/virtio/test_virtio_vsock.py)."""
import os
import socket
import stat
import subprocess
import sys
import time

import pytest

import vmm.testing.tinyguest as T
from vmm.machine import STATUS

pytestmark = pytest.mark.usefixtures("needs_kvm")

# the alphabet guest of test_snapshot_tiny.py: prints a..z in a loop
ALPHABET = bytes.fromhex("66baf803" "b361" "88d8" "ee" "fec3" "80fb7b" "7502" "b361"
                         "b900400000" "ffc9" "75fc" "ebe9")


@pytest.mark.parametrize("clone", [False, True])
def test_vm_with_vsock_snapshots_and_restores(tmp_path, clone):
    k = T.make_elf(ALPHABET, str(tmp_path / "alpha.elf"))
    uds = str(tmp_path / "v.sock")
    s, m = tmp_path / "a.state", tmp_path / "a.mem"
    cmd = [sys.executable, "-m", "vmm.testing.snapshooter", "--step-timeout", "120",
           "--step", "wait:ghij", "--step", "pause", "--step", f"snap:Full:{s}:{m}",
           "--step", "stop", "--",
           "--kernel", k, "--mem", "32M", "--vsock", f"cid=5,uds={uds}"]
    p = subprocess.run(cmd, capture_output=True, timeout=300, stdin=subprocess.DEVNULL)
    assert p.returncode == 0, p.stderr.decode()
    assert not os.path.exists(uds)                    # removed when that VMM stopped
    extra = []
    if clone:
        extra, uds = ["--vsock", f"uds={tmp_path / 'clone.sock'}"], str(tmp_path / "clone.sock")
    r = subprocess.Popen([sys.executable, "-m", "vmm", "restore", "--snapshot", str(s),
                          "--mem", str(m), "--resume", "--timeout", "4", *extra],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(uds) and time.monotonic() < deadline and r.poll() is None:
            time.sleep(0.05)
        assert stat.S_ISSOCK(os.lstat(uds).st_mode)   # the restored VMM listens again
        c = socket.socket(socket.AF_UNIX)
        c.connect(uds)
        c.close()
        out, err = r.communicate(timeout=120)
        assert not os.path.exists(str(tmp_path / "v.sock"))   # (a clone never touched it)
    finally:
        if r.poll() is None:
            r.kill()
            r.wait()
    assert r.returncode == STATUS["timeout"], err.decode()
    c = p.stdout[-1] - ord("a")
    assert out.startswith(bytes(ord("a") + (c + 1 + i) % 26 for i in range(3))), out[:40]
