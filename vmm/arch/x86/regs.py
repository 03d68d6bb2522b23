"""Entry state for the 64-bit boot protocol: a flat GDT with __BOOT_CS (0x10)
and __BOOT_DS (0x18), identity page tables for the low 4 GiB (2 MiB pages),
long mode on, RSI = zero page (Documentation/x86/boot.rst, "64-bit Boot
Protocol"), plus the MSR, FPU and LAPIC state Linux expects."""
import struct

from vmm.arch.x86 import layout as L
from vmm.native import ffi

BOOT_CS = 0x10
BOOT_DS = 0x18
BOOT_TSS = 0x20

CR0_PE, CR0_ET, CR0_PG = 1 << 0, 1 << 4, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10
PTE_P, PTE_RW, PTE_PS = 1, 2, 0x80

# MSRs (Intel SDM vol. 4); reset values Linux expects at the 64-bit entry.
MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_IA32_TSC = 0x10
MSR_IA32_MISC_ENABLE = 0x1A0
MISC_ENABLE_FAST_STRING = 1
MSR_MTRR_DEF_TYPE = 0x2FF
MTRR_ENABLE, MTRR_TYPE_WB = 1 << 11, 6

# LAPIC register offsets and delivery modes (Intel SDM vol. 3, 10.5.1).
APIC_LVT_LINT0, APIC_LVT_LINT1 = 0x350, 0x360
APIC_MODE_NMI, APIC_MODE_EXTINT = 4, 7


def gdt_entry(flags, base, limit):
    """One 8-byte segment descriptor; `flags` packs access byte and G/DB/L
    nibble as 0xF0AA (the Firecracker/kvmtool convention)."""
    return ((base & 0xFF000000) << 32 | (flags & 0xF0FF) << 40 | (limit & 0xF0000) << 32
            | (base & 0xFFFFFF) << 16 | (limit & 0xFFFF))


GDT = [
    gdt_entry(0, 0, 0),            # null
    gdt_entry(0, 0, 0),            # unused
    gdt_entry(0xA09B, 0, 0xFFFFF),  # 0x10 __BOOT_CS: 64-bit code, execute/read
    gdt_entry(0xC093, 0, 0xFFFFF),  # 0x18 __BOOT_DS: flat data, read/write
    gdt_entry(0x808B, 0, 0xFFFFF),  # 0x20 TSS (busy), KVM needs a valid TR
]


def segment_from_gdt(entry, index):
    """The kvm_segment fields KVM expects for a descriptor already in the GDT."""
    return dict(
        base=((entry >> 16) & 0xFFFFFF) | ((entry >> 32) & 0xFF000000),
        limit=(entry & 0xFFFF) | ((entry >> 32) & 0xF0000),
        selector=index * 8,
        type=(entry >> 40) & 0xF,
        present=(entry >> 47) & 1,
        dpl=(entry >> 45) & 3,
        db=(entry >> 54) & 1,
        s=(entry >> 44) & 1,
        l=(entry >> 53) & 1,
        g=(entry >> 55) & 1,
        avl=(entry >> 52) & 1,
        unusable=0 if (entry >> 47) & 1 else 1,
    )


def write_gdt(memory):
    memory.write(L.GDT_ADDR, b"".join(struct.pack("<Q", e) for e in GDT))
    memory.write(L.IDT_ADDR, bytes(8))


def write_page_tables(memory):
    """PML4 -> PDPT -> 4 page directories of 2 MiB pages: identity map of
    [0, 4 GiB), enough for the kernel, zero page, cmdline and initrd."""
    memory.write(L.PML4_ADDR, struct.pack("<Q", L.PDPT_ADDR | PTE_P | PTE_RW) + bytes(4088))
    pdpt = b"".join(struct.pack("<Q", (L.PD_ADDR + i * 4096) | PTE_P | PTE_RW) for i in range(4))
    memory.write(L.PDPT_ADDR, pdpt + bytes(4096 - len(pdpt)))
    # one pack of the 2048 entries (i << 21 | flags): a quarter of the time of
    # a pack per entry, on the way to the guest's first instruction
    n, flags = 4 * 512, PTE_P | PTE_RW | PTE_PS
    pds = struct.pack(f"<{n}Q", *range(flags, (n << 21) + flags, 1 << 21))
    memory.write(L.PD_ADDR, pds)


def setup_sregs(vcpu):
    sregs = vcpu.get_sregs()
    code = segment_from_gdt(GDT[2], 2)
    data = segment_from_gdt(GDT[3], 3)
    tss = segment_from_gdt(GDT[4], 4)
    for name, fields in (("cs", code), ("ds", data), ("es", data), ("fs", data),
                         ("gs", data), ("ss", data), ("tr", tss)):
        seg = getattr(sregs, name)
        for k, v in fields.items():
            setattr(seg, k, v)
    sregs.gdt.base = L.GDT_ADDR
    sregs.gdt.limit = len(GDT) * 8 - 1
    sregs.idt.base = L.IDT_ADDR
    sregs.idt.limit = 7
    sregs.cr0 = CR0_PE | CR0_ET | CR0_PG
    sregs.cr3 = L.PML4_ADDR
    sregs.cr4 = CR4_PAE
    sregs.efer = EFER_LME | EFER_LMA
    vcpu.set_sregs(sregs)


def setup_regs(vcpu, entry, zero_page):
    regs = vcpu.get_regs()
    for name in ("rax", "rbx", "rcx", "rdx", "rdi", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15"):
        setattr(regs, name, 0)
    regs.rflags = 0x2          # bit 1 is reserved-as-one; interrupts off
    regs.rip = entry
    regs.rsp = regs.rbp = L.BOOT_STACK
    regs.rsi = zero_page       # boot protocol: RSI = struct boot_params
    vcpu.set_regs(regs)


def setup_fpu(vcpu):
    fpu = vcpu.get_fpu()
    fpu.fcw = 0x37F            # x87 reset control word
    fpu.mxcsr = 0x1F80         # SSE reset value: all exceptions masked
    vcpu.set_fpu(fpu)


def boot_msrs():
    return [
        (MSR_IA32_SYSENTER_CS, 0), (MSR_IA32_SYSENTER_ESP, 0), (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0), (MSR_CSTAR, 0), (MSR_KERNEL_GS_BASE, 0), (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0), (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]


def setup_lapic(vcpu):
    """LINT0 = ExtINT (the PIC's output), LINT1 = NMI, as the MP table says
    (MP spec 1.4, virtual wire mode)."""
    lapic = vcpu.get_lapic()
    buf = ffi.buffer(lapic.regs)
    for reg, mode in ((APIC_LVT_LINT0, APIC_MODE_EXTINT), (APIC_LVT_LINT1, APIC_MODE_NMI)):
        val = int.from_bytes(buf[reg:reg + 4], "little")
        val = (val & ~0x700) | (mode << 8)
        buf[reg:reg + 4] = val.to_bytes(4, "little")
    vcpu.set_lapic(lapic)
