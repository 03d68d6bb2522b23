"""Saving and restoring the state KVM keeps for a vCPU and for a VM (KVM API
doc, section 4: KVM_GET/SET_{REGS,SREGS,XSAVE,XCRS,DEBUGREGS,LAPIC,MSRS,
MP_STATE,VCPU_EVENTS}, KVM_GET/SET_IRQCHIP, KVM_GET/SET_PIT2,
KVM_GET/SET_CLOCK).

State comes back as plain dicts of bytes, ints and lists: the structs are
kept as the bytes the kernel gave (their layout is fixed by <linux/kvm.h>
for an architecture, which the snapshot file checks), MSRs as
[[index, value], ...].

Ordering (from the KVM API doc and the bugs Firecracker hit, see
firecracker#4099/#4666 and #4618):
- save: KVM_GET_MP_STATE first (it runs kvm_apic_accept_events(), which can
  change LAPIC and vCPU state), KVM_GET_VCPU_EVENTS last (the other GETs may
  still change pending-event state).
- restore: CPUID first (other SETs look at it), MP state, REGS before
  VCPU_EVENTS (KVM_SET_REGS drops a pending exception, VCPU_EVENTS brings it
  back), SREGS before LAPIC (SREGS carries the APIC base MSR, xAPIC/x2APIC),
  LAPIC before MSRs (KVM ignores a TSC-deadline write unless the LVT timer is
  in TSC-deadline mode), and among the MSRs IA32_TSC before
  IA32_TSC_DEADLINE (KVM arms the deadline timer against the guest TSC, so a
  deadline restored first is compared with the wrong clock and the guest's
  timer never fires).
- a deadline timer armed in TSC-deadline mode but read back as 0 (it had just
  fired, the interrupt still in flight) is saved as "now", so the restored
  guest gets a timer interrupt and re-arms (firecracker#4618).
"""
import errno

from vmm.native import NativeError, check, ffi, ioctl, lib

MSR_IA32_TSC = 0x10
MSR_IA32_TSC_DEADLINE = 0x6E0
LAPIC_LVTT = 0x320                 # LVT timer register in the LAPIC page
LVTT_MODE_MASK, LVTT_TSC_DEADLINE = 3 << 17, 2 << 17

# MSRs listed by KVM_GET_MSR_INDEX_LIST that are not guest state to carry
# over: none today, but a host that refuses to read one is tolerated (the
# snapshot keeps what KVM_GET_MSRS returned).

_VCPU_STRUCTS = {            # name: (get ioctl, set ioctl, ctype)
    "regs": ("KVM_GET_REGS", "KVM_SET_REGS", "struct kvm_regs *"),
    "sregs": ("KVM_GET_SREGS", "KVM_SET_SREGS", "struct kvm_sregs *"),
    "fpu": ("KVM_GET_FPU", "KVM_SET_FPU", "struct kvm_fpu *"),
    "xsave": ("KVM_GET_XSAVE", "KVM_SET_XSAVE", "struct kvm_xsave *"),
    "xcrs": ("KVM_GET_XCRS", "KVM_SET_XCRS", "struct kvm_xcrs *"),
    "debugregs": ("KVM_GET_DEBUGREGS", "KVM_SET_DEBUGREGS", "struct kvm_debugregs *"),
    "lapic": ("KVM_GET_LAPIC", "KVM_SET_LAPIC", "struct kvm_lapic_state *"),
    "mp_state": ("KVM_GET_MP_STATE", "KVM_SET_MP_STATE", "struct kvm_mp_state *"),
    "vcpu_events": ("KVM_GET_VCPU_EVENTS", "KVM_SET_VCPU_EVENTS", "struct kvm_vcpu_events *"),
}
_OPTIONAL = {"xsave": "KVM_CAP_XSAVE", "xcrs": "KVM_CAP_XCRS",
             "debugregs": "KVM_CAP_DEBUGREGS", "vcpu_events": "KVM_CAP_VCPU_EVENTS"}
SAVE_ORDER = ("mp_state", "regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "lapic")
RESTORE_ORDER = ("mp_state", "regs", "sregs", "fpu", "xsave", "xcrs", "debugregs", "lapic")


class StateError(Exception):
    """A state blob that does not fit this host's KVM (one line)."""


def _get_blob(fd, name):
    get, _, ctype = _VCPU_STRUCTS[name]
    obj = ffi.new(ctype)
    ioctl(fd, get, obj)
    return bytes(ffi.buffer(obj))


def _set_blob(fd, name, data):
    _, set_, ctype = _VCPU_STRUCTS[name]
    obj = ffi.new(ctype)
    buf = ffi.buffer(obj)
    if len(data) != len(buf):
        raise StateError(f"vCPU {name}: {len(data)} bytes, this host's KVM uses {len(buf)}")
    buf[:] = data
    ioctl(fd, set_, obj)


def msr_index_list(kvm):
    """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores for a guest."""
    n = 256
    while True:
        buf = ffi.new("struct kvm_msr_list *", {"nmsrs": n, "indices": n})
        buf.nmsrs = n
        r = lib.pv_ioctl(kvm.fd, lib.KVM_GET_MSR_INDEX_LIST, buf)
        if r == -errno.E2BIG:
            n = buf.nmsrs if buf.nmsrs > n else n * 2
            continue
        check(r, "KVM_GET_MSR_INDEX_LIST")
        return [buf.indices[i] for i in range(buf.nmsrs)]


def msr_order(indices):
    """IA32_TSC first, IA32_TSC_DEADLINE last, the rest in between (see the
    module docstring)."""
    rest = [i for i in indices if i not in (MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE)]
    first = [MSR_IA32_TSC] if MSR_IA32_TSC in indices else []
    last = [MSR_IA32_TSC_DEADLINE] if MSR_IA32_TSC_DEADLINE in indices else []
    return first + rest + last


def read_msrs(vcpu, indices):
    """[[index, value], ...] for every MSR in `indices` KVM lets us read
    (KVM_GET_MSRS stops at the first it refuses: skip that one, go on)."""
    out, todo = [], list(indices)
    while todo:
        got = vcpu.get_msrs(todo)
        n = len(got)
        out.extend([i, got[i]] for i in todo[:n])
        todo = todo[n + 1:]          # todo[n] was refused
    return out


def _cpuid(vcpu):
    n = 256
    while True:
        buf = ffi.new("struct kvm_cpuid2 *", {"nent": n, "entries": n})
        buf.nent = n
        r = lib.pv_ioctl(vcpu.fd, lib.KVM_GET_CPUID2, buf)
        if r == -errno.E2BIG:
            n *= 2
            continue
        check(r, "KVM_GET_CPUID2")
        return [{k: getattr(buf.entries[i], k)
                 for k in ("function", "index", "flags", "eax", "ebx", "ecx", "edx")}
                for i in range(buf.nent)]


def _lapic_timer_mode(lapic):
    lvtt = int.from_bytes(lapic[LAPIC_LVTT:LAPIC_LVTT + 4], "little")
    return lvtt & LVTT_MODE_MASK


def save_vcpu(vcpu, msr_indices):
    """The state of a vCPU that is out of KVM_RUN (every vCPU of the VM
    paused: KVM_GET_VCPU_EVENTS is only safe then)."""
    kvm = vcpu.vm.kvm
    state = {"index": vcpu.index}
    for name in SAVE_ORDER:
        cap = _OPTIONAL.get(name)
        if cap is None or kvm.check_extension(cap):
            state[name] = _get_blob(vcpu.fd, name)
    state["cpuid"] = _cpuid(vcpu)
    msrs = read_msrs(vcpu, msr_order(msr_indices))
    values = dict(msrs)
    if (MSR_IA32_TSC_DEADLINE in values and values[MSR_IA32_TSC_DEADLINE] == 0
            and _lapic_timer_mode(state["lapic"]) == LVTT_TSC_DEADLINE and MSR_IA32_TSC in values):
        msrs = [[i, values[MSR_IA32_TSC] if i == MSR_IA32_TSC_DEADLINE else v] for i, v in msrs]
    state["msrs"] = msrs
    if kvm.check_extension("KVM_CAP_GET_TSC_KHZ"):
        state["tsc_khz"] = ioctl(vcpu.fd, "KVM_GET_TSC_KHZ")
    if kvm.check_extension(_OPTIONAL["vcpu_events"]):
        state["vcpu_events"] = _get_blob(vcpu.fd, "vcpu_events")
    return state


def restore_vcpu(vcpu, state):
    """Load `state` (from save_vcpu) into a freshly created vCPU."""
    vcpu.set_cpuid(state["cpuid"])
    have_xsave = "xsave" in state
    for name in RESTORE_ORDER:
        if name not in state or (name == "fpu" and have_xsave):
            continue                 # XSAVE carries the FPU and SSE state too
        _set_blob(vcpu.fd, name, state[name])
    msrs = [tuple(m) for m in state["msrs"]]
    try:
        vcpu.set_msrs(msrs)
    except NativeError as e:
        raise StateError(f"vCPU {vcpu.index}: {e.strerror}") from None
    if "vcpu_events" in state:
        _set_blob(vcpu.fd, "vcpu_events", state["vcpu_events"])


# --- VM-wide state ---------------------------------------------------------
_CHIPS = (("pic_master", "KVM_IRQCHIP_PIC_MASTER"), ("pic_slave", "KVM_IRQCHIP_PIC_SLAVE"),
          ("ioapic", "KVM_IRQCHIP_IOAPIC"))


def save_vm(vm):
    """PIC master/slave and IOAPIC (KVM_GET_IRQCHIP), PIT (KVM_GET_PIT2) and
    kvmclock (KVM_GET_CLOCK) of a VM whose vCPUs are paused."""
    state = {}
    for name, chip in _CHIPS:
        obj = ffi.new("struct kvm_irqchip *")
        obj.chip_id = getattr(lib, chip)
        ioctl(vm.fd, "KVM_GET_IRQCHIP", obj)
        state[name] = bytes(ffi.buffer(obj))
    pit = ffi.new("struct kvm_pit_state2 *")
    ioctl(vm.fd, "KVM_GET_PIT2", pit)
    state["pit2"] = bytes(ffi.buffer(pit))
    clock = ffi.new("struct kvm_clock_data *")
    ioctl(vm.fd, "KVM_GET_CLOCK", clock)
    state["clock"] = int(clock.clock)
    return state


def restore_vm(vm, state):
    """Load save_vm() state into a VM that has its irqchip and PIT (before
    its vCPUs are restored: LAPIC state refers to the IOAPIC routing)."""
    pit = ffi.new("struct kvm_pit_state2 *")
    _fill(pit, state["pit2"], "PIT state")
    ioctl(vm.fd, "KVM_SET_PIT2", pit)
    # Clock policy (README "Snapshots"): kvmclock continues from the value
    # saved, so guest monotonic time does not count the time spent in the
    # snapshot file.  flags = 0: KVM_SET_CLOCK refuses KVM_CLOCK_TSC_STABLE,
    # and without KVM_CLOCK_REALTIME it does not advance the clock.
    clock = ffi.new("struct kvm_clock_data *")
    clock.clock = state["clock"]
    clock.flags = 0
    ioctl(vm.fd, "KVM_SET_CLOCK", clock)
    for name, chip in _CHIPS:
        obj = ffi.new("struct kvm_irqchip *")
        _fill(obj, state[name], name)
        if obj.chip_id != getattr(lib, chip):
            raise StateError(f"{name}: saved state is for irqchip {obj.chip_id}")
        ioctl(vm.fd, "KVM_SET_IRQCHIP", obj)


def _fill(obj, data, what):
    buf = ffi.buffer(obj)
    if len(data) != len(buf):
        raise StateError(f"{what}: {len(data)} bytes, this host's KVM uses {len(buf)}")
    buf[:] = data


__all__ = ["StateError", "msr_index_list", "msr_order", "restore_vcpu", "restore_vm",
           "save_vcpu", "save_vm"]
