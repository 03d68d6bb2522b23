"""CLI errors: one line on stderr, the documented status, no traceback."""
import subprocess
import sys

import pytest

from vmm import cli


def run(*args, env=None):
    p = subprocess.run([sys.executable, "-m", "vmm", *args], capture_output=True, text=True,
                       timeout=60, env=env, stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout, p.stderr


def one_line(stderr):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_missing_kernel(tmp_path):
    rc, _, err = run("run", "--kernel", str(tmp_path / "nope"))
    assert rc == cli.EXIT_USAGE
    assert "no such file" in one_line(err)


def test_missing_initrd(tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"x")
    rc, _, err = run("run", "--kernel", str(k), "--initrd", str(tmp_path / "nope"))
    assert rc == cli.EXIT_USAGE and "initrd" in one_line(err)


def test_bad_kernel_file(tmp_path):
    k = tmp_path / "k"
    k.write_bytes(b"this is not a kernel" * 100)
    rc, _, err = run("run", "--kernel", str(k))
    assert rc == cli.EXIT_ERROR
    assert "neither a bzImage nor an ELF vmlinux" in one_line(err)


def test_unknown_option():
    rc, _, err = run("run", "--frobnicate")
    assert rc == cli.EXIT_USAGE
    assert "unrecognized arguments: --frobnicate" in one_line(err)


@pytest.mark.parametrize("args,text", [
    (["--mem", "lots"], "invalid size"),
    (["--cpus", "x"], "invalid int"),
    (["--cpu-template", "fancy"], "invalid choice"),
])
def test_bad_values(args, text):
    rc, _, err = run("run", *args)
    assert rc == cli.EXIT_USAGE and text in one_line(err)


def test_memory_out_of_range(tmp_path):
    from vmm.testing.tinyguest import make_elf, HLT_LOOP
    k = make_elf(HLT_LOOP, str(tmp_path / "k"))
    rc, _, err = run("run", "--kernel", k, "--mem", "4")
    assert rc == cli.EXIT_ERROR and "memory size" in one_line(err)


def test_bad_serial(tmp_path):
    rc, _, err = run("run", "--kernel", "/etc/hostname", "--serial", "tcp:1")
    assert rc == cli.EXIT_USAGE and "--serial" in one_line(err)


def test_no_default_guest(tmp_path):
    import os
    env = dict(os.environ, PYVMM_CACHE=str(tmp_path))
    rc, _, err = run("run", env=env)
    assert rc == cli.EXIT_USAGE and "make guest" in one_line(err)


def test_help_documents_every_option_and_status():
    rc, out, _ = run("run", "--help")
    assert rc == 0
    for opt in ("--kernel", "--initrd", "--cmdline", "--mem", "--cpus", "--cpu-template",
                "--serial", "--timeout", "--debug", "Ctrl-a x", "124", "panicked"):
        assert opt in out


@pytest.mark.parametrize("text,value", [("256M", 256 << 20), ("1G", 1 << 30), ("512", 512 << 20),
                                        ("64MiB", 64 << 20), ("4096K", 4 << 20)])
def test_parse_size(text, value):
    assert cli.parse_size(text) == value
