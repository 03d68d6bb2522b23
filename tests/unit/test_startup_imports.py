"""What pyvmm loads before a guest runs (issue #16, start-up and memory):
the lazy vmm.virtio package, plain records instead of dataclasses, and
imports at the point of use keep these modules out of `pyvmm run` with a
tiny guest and out of the API's start.  Each costs milliseconds of start-up
or memory a VM without the feature does not need."""
import os
import subprocess
import sys

import pytest

import vmm.testing.tinyguest as T

NOT_AT_START = ("dataclasses", "inspect", "typing", "numpy", "hashlib", "shutil",
                "vmm.virtio.blk", "vmm.virtio.mmio", "vmm.snapshot", "vmm.api.controller")
# ...and out of a plain `pyvmm run` (no device, no API, no --debug): its
# options are read without argparse (vmm/fastargs.py), its loggers load
# logging only for a record (vmm/log.py), signal/socket constants come from
# the C modules (no enum), the pyvmm script does not import re.
NOT_IN_PLAIN_RUN = ("argparse", "logging", "re", "enum", "signal", "socket", "json", "gettext",
                    "locale", "traceback", "linecache", "tokenize", "importlib", "warnings",
                    "weakref", "string", "vmm.clihelp", "vmm.api.cli")
HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python(*args):
    """A fresh interpreter's run of `args` (its own sys.modules)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)


def loaded(code, *args):
    out = python("-c", code, *args)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.fixture
def kernel(needs_kvm, tmp_path):
    """A tiny guest that writes '!' and halts."""
    return T.make_elf(T.serial_text("!") + T.CLI_HLT, str(tmp_path / "t.elf"))


def test_pyvmm_run_of_a_tiny_guest(kernel):
    code = ("import sys; from vmm import cli; "
            "rc = cli.main(['run', '--kernel', sys.argv[1], '--mem', '32M', '--serial', "
            "'file:/dev/null']); assert rc == 0, rc; "
            f"print(' '.join(m for m in {NOT_AT_START + NOT_IN_PLAIN_RUN!r} "
            "if m in sys.modules))")
    assert loaded(code, kernel) == set()


def test_api_start_before_the_first_request():
    """What `pyvmm api` has imported once its server answers (runner.serve
    loads the VMM's modules only after that)."""
    code = ("import sys, vmm.api.cli, vmm.api.runner, vmm.api.controller, vmm.api.server; "
            f"print(' '.join(m for m in {NOT_AT_START[:-1]!r} if m in sys.modules))")
    assert loaded(code) == set()


def test_the_listening_socket_needs_only_os_and_socket():
    code = ("import sys, vmm.api.cli, vmm.api.listen; "
            "print(' '.join(m for m in ('logging', 'json', 'socket', 'selectors', "
            "'vmm.api.server') if m in sys.modules))")
    assert loaded(code) == set()


def test_the_pyvmm_script_runs_a_tiny_guest_on_that_much(kernel):
    """The same through scripts/pyvmm, as `pyvmm` starts (every module it
    imports, from `python -X importtime`)."""
    out = python("-X", "importtime", os.path.join(HERE, "scripts", "pyvmm"),
                 "run", "--kernel", kernel, "--mem", "32M", "--serial", "file:/dev/null")
    assert out.returncode == 0, out.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in out.stderr.splitlines()
                if line.startswith("import time:")}
    assert "vmm.machine" in imported
    assert imported & set(NOT_AT_START + NOT_IN_PLAIN_RUN) == set()


def test_debug_still_loads_logging(tmp_path):
    """--debug (and any run that logs through logging) configures logging as before."""
    code = ("import sys; from vmm import cli; "
            "cli.main(['run', '--kernel', '/nonexistent', '--debug']); import logging; "
            "print(logging.getLogger().level, logging.getLogger().handlers[0].formatter._fmt)")
    out = python("-c", code)
    assert out.stdout.split(None, 1) == ["10", "pyvmm: %(message)s\n"]


def test_gc_is_back_on_when_the_guest_runs(kernel):
    """vmm.__main__ pauses the cyclic GC for `pyvmm run`'s start-up only."""
    code = ("import sys, gc; from vmm import machine; from vmm.__main__ import main\n"
            "seen = []; run = machine.Machine.run\n"
            "def spy(self, *a, **k):\n"
            "    seen.append(gc.isenabled()); return run(self, *a, **k)\n"
            "machine.Machine.run = spy\n"
            "rc = main(['run', '--kernel', sys.argv[1], '--mem', '32M', '--serial', 'file:/dev/null'])\n"
            "print(rc, seen, gc.isenabled())")
    out = python("-c", code, kernel)
    assert out.stdout.split() == ["0", "[True]", "True"], out.stderr
