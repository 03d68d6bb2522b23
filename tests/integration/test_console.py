"""The interactive console: with stdin a terminal, pyvmm puts it in raw mode,
the guest's busybox shell answers typed commands, and Ctrl-a x quits (exit 0)
with the terminal restored (from the session snapshot, conftest.py).  Also
boots the bzImage form of the default guest to init and power-off."""
import os
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

from vmm import guest
from vmm.machine import STATUS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]
TIMEOUT = 900      # a cold boot: ~1 min here, minutes on a loaded host


def read_until(fd, marker, timeout, buf=b""):
    deadline = time.monotonic() + timeout
    while marker not in buf and time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 1)
        if r:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_interactive_shell_and_quit_key(restored):
    """From the session snapshot (conftest.py): the restored guest sits at
    its shell prompt, so the terminal is the only input."""
    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    try:
        r = restored(tty=slave)
        out = b""
        os.write(master, b"echo $((6*7))-marker\r")
        out = read_until(master, b"42-marker", 120, out)
        assert b"42-marker" in out, out[-2000:]
        assert termios.tcgetattr(slave)[3] & termios.ECHO == 0     # raw mode while running
        os.write(master, b"\x01x")                                  # Ctrl-a x
        assert r.p.wait(timeout=60) == STATUS["quit"] == 0
        assert termios.tcgetattr(slave) == before                   # terminal restored
    finally:
        os.close(master)
        os.close(slave)


@pytest.mark.slow(60)
def test_bzimage_boots_to_init():
    """The bzImage form of the default guest (the boot protocol's setup
    header, the kernel's own decompressor) boots to init, which runs its init
    script (uname, CPU count) and powers off; on the way the kernel found our
    MP table and the 16550A UART.  128 MiB: the guest needs no more, and the
    emulated memory setup scales with it."""
    kernel, initrd = guest.default_guest()
    bzimage = os.path.join(os.path.dirname(kernel), "bzImage")
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", bzimage, "--initrd", initrd,
                        "--mem", "128M", "--timeout", str(TIMEOUT),
                        "--cmdline", guest.DEFAULT_CMDLINE + " pyvmm.test=poweroff"],
                       capture_output=True, timeout=TIMEOUT + 60, stdin=subprocess.DEVNULL)
    out, err = p.stdout.decode(errors="replace"), p.stderr.decode(errors="replace")
    assert "Run /init as init process" in out, out[-3000:] + err
    assert "MPTABLE: OEM ID: PYVMM" in out
    assert "ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A" in out
    assert "pyvmm-guest: init running" in out
    assert "pyvmm-guest: uname 6.1" in out
    assert "pyvmm-guest: cpus 1" in out
    assert "pyvmm-guest: done" in out
    assert p.returncode == STATUS["poweroff"], err
