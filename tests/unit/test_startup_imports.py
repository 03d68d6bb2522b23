"""What pyvmm loads before a guest runs (issue #16, start-up and memory):
the lazy vmm.virtio package, plain records instead of dataclasses, and
imports at the point of use keep these modules out of `pyvmm run` with a
tiny guest and out of the API's start.  Each costs milliseconds of start-up
or memory a VM without the feature does not need."""
import subprocess
import sys

import pytest

import vmm.testing.tinyguest as T

NOT_AT_START = ("dataclasses", "inspect", "typing", "numpy", "hashlib", "shutil",
                "vmm.virtio.blk", "vmm.virtio.mmio", "vmm.snapshot", "vmm.api.controller")


def loaded(code, *args):
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.usefixtures("needs_kvm")
def test_pyvmm_run_of_a_tiny_guest(tmp_path):
    kernel = T.make_elf(T.serial_text("!") + T.CLI_HLT, str(tmp_path / "t.elf"))
    code = ("import sys; from vmm import cli; "
            "rc = cli.main(['run', '--kernel', sys.argv[1], '--mem', '32M', '--serial', "
            "'file:/dev/null']); assert rc == 0, rc; "
            f"print(' '.join(m for m in {NOT_AT_START + ('json', 'socket')!r} "
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
