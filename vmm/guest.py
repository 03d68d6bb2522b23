"""Where the default guest built by `make guest` (guests/build.sh) lives."""
import os

# reboot=k: reboot through the i8042 (ends the VM with status 0); panic=-1
# and pvpanic: a panic ends it with status 3; rodata=off skips write-protecting
# the kernel image, which costs ~5 s of emulated page-table work on software KVM.
# i8042.*: Firecracker's defaults: keyboard port only, no MUX/PnP probing, and
# dumbkbd (the AT keyboard driver skips its ID/LED probe, which our i8042, like
# Firecracker's, does not emulate) -- enough for Ctrl-Alt-Del (vmm/hw/i8042.py).
DEFAULT_CMDLINE = ("console=ttyS0 reboot=k panic=-1 pvpanic_mmio.ioport=0x505 rodata=off "
                   "8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd nopti")


def cache_dir():
    return os.environ.get("PYVMM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pyvmm")


def default_guest():
    """(kernel, initrd) paths of the current default guest build."""
    d = os.path.join(cache_dir(), "guest")
    return os.path.join(d, "vmlinux"), os.path.join(d, "initramfs.cpio")
