"""CPU templates over KVM_GET_SUPPORTED_CPUID.

`host` passes through what KVM supports.  `minimal` also hides the features
software KVM (kvm_pvm) cannot emulate in guest kernel mode, so a stock guest
never uses them (see ../shared/notes/kvm-host.md): CMPXCHG16B, POPCNT, XSAVE
and everything that needs it (AVX, AVX2, AVX-512, FMA, F16C, AMX, the XSAVE
leaf 0xD), SMEP and SMAP.  `auto` is `minimal` on software KVM, else `host`.
"""
from vmm.kvm.system import software_kvm

TEMPLATES = ("auto", "host", "minimal")

# (leaf, subleaf or None for all, register) -> bits to clear, for `minimal`.
_b = lambda *bits: sum(1 << b for b in bits)  # noqa: E731
MINIMAL_MASKS = {
    # leaf 1 ECX: FMA 12, CX16 13, POPCNT 23, XSAVE 26, OSXSAVE 27, AVX 28, F16C 29
    (1, None, "ecx"): _b(12, 13, 23, 26, 27, 28, 29),
    # leaf 7.0 EBX: AVX2 5, SMEP 7, AVX512F 16, DQ 17, SMAP 20, IFMA 21, PF 26,
    # ER 27, CD 28, BW 30, VL 31
    (7, 0, "ebx"): _b(5, 7, 16, 17, 20, 21, 26, 27, 28, 30, 31),
    # leaf 7.0 ECX: AVX512_VBMI 1, VBMI2 6, GFNI 8, VAES 9, VPCLMULQDQ 10, VNNI 11,
    # BITALG 12, VPOPCNTDQ 14
    (7, 0, "ecx"): _b(1, 6, 8, 9, 10, 11, 12, 14),
    # leaf 7.0 EDX: AVX512_4VNNIW 2, 4FMAPS 3, VP2INTERSECT 8, AMX_BF16 22, FP16 23,
    # AMX_TILE 24, AMX_INT8 25
    (7, 0, "edx"): _b(2, 3, 8, 22, 23, 24, 25),
    # leaf 7.1 EAX: AVX_VNNI 4, AVX512_BF16 5
    (7, 1, "eax"): _b(4, 5),
    # leaf 0x80000001 ECX: XOP 11, FMA4 16, TBM 21 (AMD's AVX-era extensions)
    (0x80000001, None, "ecx"): _b(11, 16, 21),
}
HIDDEN_LEAVES = {0xD}
# Measured here: software KVM (kvm_pvm) does not apply KVM_SET_CPUID2 to the
# guest's CPUID instruction in kernel mode (a guest given a table without
# XSAVE, SMEP, SMAP or leaf 0xD still enumerated AVX-512 XSAVE state and set
# CR4.SMEP/SMAP).  So `minimal` also tells Linux itself to leave them alone.
# nofsgsbase: the guest kernel keeps FS/GS bases through MSRs (the path of
# every kernel before 5.9) rather than the FSGSBASE instructions, which this
# host's software KVM exposes whatever CPUID says.
#
# GLIBC_TUNABLES (an unknown NAME=VALUE parameter: the kernel hands it to init
# as an environment variable, and every process inherits it): guest user code
# runs natively, so its CPUID and XGETBV are the host's (XCR0 0xe7 here: AVX,
# AVX-512; KVM_SET_XCRS is not applied to it either), while a `noxsave` guest
# kernel saves only the FXSAVE state (x87, XMM) at a context switch.  The
# upper halves of YMM/ZMM registers then leak between guest processes
# (measured: a process holding a pattern in ymm7 lost it in ~30% of 300
# sched_yield rounds against a second such process).  glibc picks AVX2/EVEX
# memcpy and friends from that CPUID, so busybox processes started together
# in a pipeline died in their first TLS read (`segfault at 0` after `mov rax,
# fs:[-0x90]` in __ctype_init: the TLS block had been copied through
# clobbered registers).  The tunable makes glibc choose its SSE2 routines.
# Code that uses AVX itself is still unsafe in such a guest (README).
GLIBC_NO_AVX = ("GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,"
                "-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load")
#
# erms,fsrm, noreplace-smp and percpu_alloc=page are for speed only: software
# KVM emulates guest kernel code one step per instruction and per `rep`
# iteration, so the byte-wise `rep movsb`/`rep stosb` that ERMS/FSRM select in
# memcpy/memset/clear_page/copy_user cost 8x the `rep movsq`/`rep stosq` kept
# by REP_GOOD (measured: 1 MiB stosb 0.80 s, stosq 0.10 s); with one vCPU an
# SMP kernel rewrites every `lock` prefix through text_poke at boot (~2-3 s
# emulated), which noreplace-smp skips (the prefixes stay; correct with any
# vCPU count); and the embedded first percpu chunk is a 2 MiB unit, zeroed
# and bitmap-scanned in emulation (~1.7 s), page-sized units ~160 KiB.
SPEED_ARGS = "noreplace-smp percpu_alloc=page"
MINIMAL_CMDLINE = ("noxsave clearcpuid=smap,smep,popcnt,cx16,erms,fsrm nofsgsbase "  # XSAVE state enumeration
                   + SPEED_ARGS + " " + GLIBC_NO_AVX)
HYPERVISOR_BIT = 1 << 31       # leaf 1 ECX: running under a hypervisor


class CpuidError(Exception):
    pass


def resolve(template):
    if template not in TEMPLATES:
        raise CpuidError(f"unknown CPU template {template!r} (choose from {', '.join(TEMPLATES)})")
    if template == "auto":
        return "minimal" if software_kvm() else "host"
    return template


def kernel_args(template):
    """Kernel command-line parameters a template adds (see MINIMAL_CMDLINE)."""
    return MINIMAL_CMDLINE if resolve(template) == "minimal" else ""


def apply_template(supported, template, cpu_index, cpu_count):
    """A fresh CPUID table for vCPU `cpu_index` from KVM's supported list."""
    template = resolve(template)
    out = []
    for e in supported:
        e = dict(e)
        fn, idx = e["function"], e["index"]
        if template == "minimal":
            if fn in HIDDEN_LEAVES:
                continue
            for (leaf, sub, reg), mask in MINIMAL_MASKS.items():
                if leaf == fn and (sub is None or sub == idx):
                    e[reg] &= ~mask
        if fn == 1:
            # EBX[31:24] initial APIC ID, [23:16] logical processors per package.
            e["ebx"] = (e["ebx"] & 0x0000FFFF) | (cpu_index << 24) | (min(cpu_count, 255) << 16)
            e["ecx"] |= HYPERVISOR_BIT
            if cpu_count > 1:
                e["edx"] |= 1 << 28        # HTT: the count in EBX[23:16] is valid
        elif fn in (0xB, 0x1F):
            e["edx"] = cpu_index           # x2APIC ID of this logical processor
        out.append(e)
    return out
