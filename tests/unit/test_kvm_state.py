"""vCPU and VM state through KVM (vmm/kvm/state.py): a freshly built VM's
state saved, loaded into a second VM and read back equal (only the running
TSC differs); MSR ordering; state of the wrong size refused."""
import io

import pytest

import vmm.testing.tinyguest as T
from vmm.kvm import state as S
from vmm.machine import Machine, MachineConfig

pytestmark = pytest.mark.usefixtures("needs_kvm")


@pytest.fixture
def two_machines(tmp_path):
    k = T.make_elf(T.HLT_LOOP, str(tmp_path / "g.elf"))
    ms = [Machine(MachineConfig(kernel=k, mem_size=32 << 20, serial_out=io.BytesIO()))
          for _ in range(2)]
    yield ms
    for m in ms:
        m.close()


def test_msr_order_puts_tsc_first_and_deadline_last():
    order = S.msr_order([0x6E0, 0x174, 0x10, 0xC0000080])
    assert order[0] == S.MSR_IA32_TSC and order[-1] == S.MSR_IA32_TSC_DEADLINE
    assert sorted(order) == sorted([0x6E0, 0x174, 0x10, 0xC0000080])


def test_vcpu_and_vm_state_round_trip(two_machines):
    a, b = two_machines
    idx = S.msr_index_list(a.kvm)
    assert S.MSR_IA32_TSC in idx
    regs = a.vcpus[0].get_regs()
    regs.rbx = 0x1234_5678_9ABC
    a.vcpus[0].set_regs(regs)
    vs, vm = S.save_vcpu(a.vcpus[0], idx), S.save_vm(a.vm)
    S.restore_vm(b.vm, vm)
    S.restore_vcpu(b.vcpus[0], vs)
    got = S.save_vcpu(b.vcpus[0], idx)
    assert b.vcpus[0].get_regs().rbx == 0x1234_5678_9ABC
    for key in vs:
        if key != "msrs":
            assert got[key] == vs[key], key
    want, have = dict(vs["msrs"]), dict(got["msrs"])
    assert set(want) == set(have)
    assert {i for i in want if want[i] != have[i]} <= {S.MSR_IA32_TSC}
    assert have[S.MSR_IA32_TSC] >= want[S.MSR_IA32_TSC]     # restored, then counting on
    vm_b = S.save_vm(b.vm)
    for chip in ("pic_master", "pic_slave", "ioapic"):
        assert vm_b[chip] == vm[chip], chip
    for ch in range(3):       # kvm_pit_channel_state: 16 bytes of counter state, then a host ktime
        assert vm_b["pit2"][24 * ch:24 * ch + 16] == vm["pit2"][24 * ch:24 * ch + 16]


def test_wrong_size_state_is_refused(two_machines):
    a, b = two_machines
    vs = S.save_vcpu(a.vcpus[0], S.msr_index_list(a.kvm))
    vs["lapic"] = vs["lapic"][:100]
    with pytest.raises(S.StateError, match="lapic: 100 bytes"):
        S.restore_vcpu(b.vcpus[0], vs)
    vm = S.save_vm(a.vm)
    vm["ioapic"] = vm["pic_master"]
    with pytest.raises(S.StateError, match="irqchip"):
        S.restore_vm(b.vm, vm)
