"""Modern virtio-pci seen from a tiny ring-0 guest (milliseconds, real KVM):
the function's IDs through 0xCF8/0xCFC, MSI-X enabled through its
capability and a table entry unmasked through the 64-bit BAR (so the Vm
sends KVM a routing table with that message), queue notifications that
KVM's MMIO ioeventfd consumes without an exit, and a common-configuration
write that does exit."""
import struct
import threading
import time

import pytest

import vmm.testing.tinyguest as T
from vmm.kvm.vm import default_routes
from vmm.machine import STATUS, Machine, MachineConfig
from vmm.pci import bus as pb
from vmm.virtio import pci_modern as pm
from vmm.virtio.blk import BlkDevice
from vmm.virtio.pci_attach import VirtioPciModernAttachment

pytestmark = pytest.mark.usefixtures("needs_kvm")

MOV_DX = b"\x66\xba"                    # mov dx, imm16
OUT_DX_AL, OUT_DX_AX, OUT_DX_EAX, IN_EAX_DX = b"\xee", b"\x66\xef", b"\xef", b"\xed"
BAR = pb.MEM_BASE                       # where the bus puts the first memory BAR
MSI_ADDR, MSI_DATA = 0xFEE00000, 0x31


# BAR offsets from ebx = BAR (an absolute disp32 would be sign-extended in
# 64-bit mode); the same bytes mean the same in 32-bit mode.
MOV_EBX_BAR = b"\xbb" + struct.pack("<I", BAR)


def mov_mem32(off, value):              # mov dword [rbx + off], imm32
    return b"\xc7\x83" + struct.pack("<iI", off, value)


def mov_mem16(off, value):              # mov word [rbx + off], imm16
    return b"\x66\xc7\x83" + struct.pack("<iH", off, value)


def config_address(slot, reg):
    return b"\xb8" + struct.pack("<I", pb.ENABLE | slot << 11 | reg) + MOV_DX + \
        struct.pack("<H", 0xCF8) + OUT_DX_EAX


def guest_code(slot, msix_cap):
    code = config_address(slot, 0)
    code += MOV_DX + struct.pack("<H", 0xCFC) + IN_EAX_DX          # vendor | device << 16
    code += MOV_DX + struct.pack("<H", 0x3F8)
    code += (OUT_DX_AL + b"\xc1\xe8\x08") * 4                      # 4 bytes to the UART
    code += config_address(slot, msix_cap)                         # Message Control: enable
    code += b"\xb8" + struct.pack("<I", 0x8000) + MOV_DX + struct.pack("<H", 0xCFE) + OUT_DX_AX
    e = pm.MSIX_TABLE                                              # vector 0: message, unmask
    code += MOV_EBX_BAR + mov_mem32(e, MSI_ADDR) + mov_mem32(e + 4, 0) + mov_mem32(e + 8, MSI_DATA)
    code += mov_mem32(e + 12, 0)
    code += mov_mem16(pm.NOTIFY, 0) * 3                            # ioeventfd: no exit
    code += mov_mem16(pm.COMMON + 22, 0)                           # queue_select: exits
    return code + T.RESET


def test_msix_route_ioeventfd_and_exit(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    probe = pm.VirtioPciModern(BlkDevice(str(img)), None)         # where MSI-X sits in config space
    cap = probe.msix.cap
    probe.close()
    att = VirtioPciModernAttachment(lambda: BlkDevice(str(img)))
    out = open(tmp_path / "serial.out", "wb", buffering=0)
    kernel = T.make_elf(guest_code(1, cap), str(tmp_path / "guest.elf"))
    m = Machine(MachineConfig(kernel=kernel, mem_size=32 << 20, serial_out=out, timeout=120,
                              devices=[att]))
    try:
        t = att.transport
        assert att.slot == 1 and t.bar_address == BAR and m.pci_irqs == [(1, 0, att.irq)]
        assert m.vm.routing_table() == default_routes()
        writes, notifies = [], []
        real_write, real_notify = t.write, t._notify_once
        t.write = lambda off, size, v: writes.append((off, size, v)) or real_write(off, size, v)
        t._notify_once = lambda i: notifies.append(threading.current_thread().name) or real_notify(i)
        assert m.run() == STATUS["reset"]
        deadline = time.monotonic() + 30       # the I/O thread may not have run yet (busy host)
        while not notifies and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.msix.enabled and not t.msix.masked[0]
        assert m.vm.routing_table() == default_routes() + [(t.msix.gsi(0), "msi", MSI_ADDR, MSI_DATA)]
        assert m.vm.routing_updates == 1
    finally:
        m.close()
        out.close()
    assert (tmp_path / "serial.out").read_bytes() == struct.pack("<HH", 0x1AF4, 0x1042)
    e = pm.MSIX_TABLE
    assert writes == [(e, 4, MSI_ADDR), (e + 4, 4, 0), (e + 8, 4, MSI_DATA), (e + 12, 4, 0),
                      (pm.COMMON + 22, 2, 0)]                      # the notifies never exited
    assert notifies and all(n.startswith("pyvmm-io") for n in notifies)


CONFINED = r"""
import os, socket, sys, threading
sys.path.insert(0, sys.argv[1])
from vmm import seccomp
from vmm.memory import GuestMemory
from vmm.testing.fakevm import FakeVm
from vmm.testing.mocknet import NetDriver
from vmm.testing.pcimodern_regs import PciModernRegs
from vmm.virtio import pci_modern as pm
from vmm.virtio.net import NetDevice
from vmm.virtio import net_ctrl as nc

class Backend:
    def __init__(self, n):
        self.pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM) for _ in range(n)]
        self.fds = [a.fileno() for a, _ in self.pairs]
        self.fd, self.name, self.offload_ok = self.fds[0], "t", False
    def set_vnet_hdr_len(self, n): pass
    def set_offload(self, f): pass
    def set_queue_enabled(self, i, on): pass
    def close(self): pass

mem = GuestMemory(32 << 20)
dev = NetDevice(Backend(2), queue_pairs=2)             # set-up: before any filter
t = pm.VirtioPciModern(dev, mem, vm=FakeVm())
d = NetDriver(t, mem, arena_size=12 << 20, regs=lambda t: PciModernRegs(t, msix=True))
seccomp.enable()
out = []
def vcpu():                                            # DRIVER_OK and a control command
    seccomp.apply("vcpu")                              # arrive on a confined vCPU thread
    out.append(d.init())
    out.append(d.control(4, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, b"\x02\x00"))
th = threading.Thread(target=vcpu)
th.start(); th.join()
print(out)
"""


def test_mq_net_activation_under_vcpu_filter(tmp_path):
    """virtio-net with a control queue comes up and answers a command on a
    thread confined to the vCPU allow-list (numpy, which the control queue's
    ring walker uses, must be imported at set-up, not at DRIVER_OK)."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    p = subprocess.run([sys.executable, "-c", CONFINED, root], capture_output=True, timeout=120)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert p.stdout.decode().strip() == "[True, 0]"
