"""Boot tiny ring-0 guests through the real boot path and check exits,
serial output and exit statuses (milliseconds each, even on software KVM)."""
import subprocess
import sys

import pytest

import vmm.testing.tinyguest as T
from vmm.machine import STATUS

pytestmark = pytest.mark.usefixtures("needs_kvm")


def boot(tmp_path, code, *extra, timeout=180):
    k = T.make_elf(code, str(tmp_path / "guest.elf"))
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", k, "--mem", "32M",
                        "--timeout", "120", *extra], capture_output=True, timeout=timeout,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr.decode()


def test_serial_output_then_power_off(tmp_path):
    rc, out, err = boot(tmp_path, T.serial_text("hello from ring 0\n") + T.CLI_HLT)
    assert out == b"hello from ring 0\n"
    assert rc == STATUS["poweroff"] == 0, err


def test_i8042_reset_exits_zero(tmp_path):
    rc, out, err = boot(tmp_path, T.serial_text("A") + T.RESET)
    assert (rc, out) == (0, b"A"), err


def test_pvpanic_exits_with_panic_status(tmp_path):
    rc, _, err = boot(tmp_path, T.PANIC)
    assert rc == STATUS["panic"] == 3
    assert "panic" in err


def test_triple_fault_dumps_registers(tmp_path):
    rc, _, err = boot(tmp_path, T.serial_text("x") + T.UD2)
    assert rc == STATUS["crash"] == 4
    assert "triple fault" in err
    assert f"rip=0x{T.LOAD_ADDR + 7:016x}" in err      # the ud2 after one out sequence
    assert "cr0=" in err and "Traceback" not in err


def test_timeout_status(tmp_path):
    k = T.make_elf(b"\xeb\xfe", str(tmp_path / "spin.elf"))   # jmp $
    p = subprocess.run([sys.executable, "-m", "vmm", "run", "--kernel", k, "--mem", "32M",
                        "--timeout", "1"], capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert p.returncode == STATUS["timeout"] == 124


def test_serial_to_file(tmp_path):
    out = tmp_path / "console.log"
    rc, stdout, err = boot(tmp_path, T.serial_text("to a file\n") + T.CLI_HLT,
                           "--serial", f"file:{out}")
    assert rc == 0, err
    assert stdout == b""
    assert out.read_bytes() == b"to a file\n"


def test_unknown_ports_are_ignored(tmp_path):
    code = T.out_byte(0x1234, 1) + T.out_byte(0x80, 2) + T.serial_text("ok") + T.CLI_HLT
    rc, out, err = boot(tmp_path, code, "--debug")
    assert (rc, out) == (0, b"ok")
    assert "unhandled write at 0x1234" in err


def test_port_reads_reach_devices(tmp_path):
    # in al, 0x3fd (LSR) ; out 0x3f8, al  -> THRE|TEMT = 0x60 ('`')
    code = b"\x66\xba\xfd\x03\xec" + b"\x66\xba\xf8\x03\xee" + T.CLI_HLT
    rc, out, err = boot(tmp_path, code)
    assert (rc, out) == (0, b"\x60"), err


def test_smp_vcpus_created(tmp_path):
    rc, out, err = boot(tmp_path, T.serial_text("smp") + T.CLI_HLT, "--cpus", "4")
    # APs wait for INIT/SIPI (never sent here) and count as halted.
    assert (rc, out) == (0, b"smp"), err


def test_sigterm_stops_cleanly_and_releases_the_disk(tmp_path):
    import fcntl
    import signal
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    k = T.make_elf(T.serial_text("up\n") + b"\xeb\xfe", str(tmp_path / "spin.elf"))
    p = subprocess.Popen([sys.executable, "-m", "vmm", "run", "--kernel", k, "--mem", "32M",
                          "--drive", f"file={img}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        assert p.stdout.readline() == b"up\n"
        with open(img, "rb") as f:             # the VMM holds the image lock
            with pytest.raises(BlockingIOError):
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == STATUS["signal"]
        assert b"SIGTERM" in p.stderr.read()
        with open(img, "rb") as f:             # ... and released it on the way out
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        p.kill()
        p.wait()
