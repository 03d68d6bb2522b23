"""Guest-physical addresses used during x86 boot (low memory below 1 MiB
follows the Linux boot protocol's "safe" areas and Firecracker's choices)."""

GDT_ADDR = 0x500          # boot GDT (4 entries)
IDT_ADDR = 0x540          # empty IDT until the kernel loads its own (after the GDT)
ZERO_PAGE = 0x7000        # struct boot_params ("zero page")
BOOT_STACK = 0x8FF0       # initial RSP/RBP
PML4_ADDR = 0x9000        # identity page tables: PML4, PDPT, 4 page directories
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000          # 0xB000..0xEFFF, 2 MiB pages covering 4 GiB
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 2048        # COMMAND_LINE_SIZE on x86 (includes the NUL)
EBDA_START = 0x9FC00      # last KiB of base memory: the MP table lives here
HIGH_MEM = 0x100000       # 1 MiB: protected-mode kernel (bzImage)
LAPIC_ADDR = 0xFEE00000
IOAPIC_ADDR = 0xFEC00000
VIRTIO_MMIO_BASE = 0xD0000000
VIRTIO_MMIO_SIZE = 0x200

E820_RAM = 1
E820_RESERVED = 2
