"""vmm/kvm/early.py: the KVM VM made ahead of time (pyvmm api) and handed to
Machine; errors reach the caller of take(); an unused one is released."""
import io

import pytest

import vmm.testing.tinyguest as T
from vmm.kvm.early import EarlyVm
from vmm.kvm.system import KvmUnavailable
from vmm.machine import Machine, MachineConfig


@pytest.mark.usefixtures("needs_kvm")
def test_machine_runs_on_the_early_vm(tmp_path):
    kernel = T.make_elf(T.serial_text("E") + T.CLI_HLT, str(tmp_path / "g.elf"))
    out = io.BytesIO()
    early = EarlyVm.start()
    m = Machine(MachineConfig(kernel=kernel, mem_size=32 << 20, serial_out=out, early=early))
    try:
        assert m.kvm is not None and m.vm is not None
        with pytest.raises(RuntimeError):           # handed out once
            early.take()
        assert m.run() == 0
    finally:
        m.close()
    assert out.getvalue() == b"E"


@pytest.mark.usefixtures("needs_kvm")
def test_supported_cpuid_is_read_once_and_copied():
    kvm, vm = EarlyVm.start().take()
    try:
        a = kvm.supported_cpuid()
        a[0]["eax"] ^= 1
        assert kvm.supported_cpuid()[0]["eax"] != a[0]["eax"]
    finally:
        vm.close()
        kvm.close()


def test_error_reaches_take_and_machine(tmp_path):
    with pytest.raises(KvmUnavailable, match="cannot open"):
        EarlyVm.start(str(tmp_path / "no-kvm")).take()
    kernel = T.make_elf(T.CLI_HLT, str(tmp_path / "g.elf"))
    with pytest.raises(KvmUnavailable):
        Machine(MachineConfig(kernel=kernel, mem_size=32 << 20, serial_out=io.BytesIO(),
                              early=EarlyVm.start(str(tmp_path / "no-kvm"))))


@pytest.mark.usefixtures("needs_kvm")
def test_unused_early_vm_is_released(tmp_path):
    import gc
    import os
    gc.collect()        # an earlier test's garbage must not close its fds during this one
    before = len(os.listdir("/proc/self/fd"))
    early = EarlyVm.start()
    early.close()                                   # possibly while it is still building
    assert early._done.wait(60)
    with pytest.raises(RuntimeError):
        early.take()
    # a failed build (bad kernel) closes the VM it was given
    early2 = EarlyVm.start()
    with pytest.raises(Exception):
        Machine(MachineConfig(kernel=str(tmp_path / "missing"), serial_out=io.BytesIO(),
                              early=early2))
    assert early2._done.wait(60)
    assert len(os.listdir("/proc/self/fd")) == before
