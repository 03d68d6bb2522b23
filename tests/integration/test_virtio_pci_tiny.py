"""Legacy virtio-pci seen from a tiny ring-0 guest (milliseconds): a
configuration read through 0xCF8/0xCFC, QUEUE_NOTIFY writes that KVM's PIO
ioeventfd consumes without an exit, and a register write that does exit."""
import struct
import threading
import time

import pytest

import vmm.testing.tinyguest as T
from vmm.machine import STATUS, Machine, MachineConfig
from vmm.pci import bus as pb
from vmm.virtio import pci_legacy as pl
from vmm.virtio.pci_attach import VirtioPciAttachment
from vmm.virtio.blk import BlkDevice

pytestmark = pytest.mark.usefixtures("needs_kvm")

MOV_DX = b"\x66\xba"                    # mov dx, imm16
OUT_DX_AL, OUT_DX_AX, OUT_DX_EAX, IN_EAX_DX = b"\xee", b"\x66\xef", b"\xef", b"\xed"


def guest_code(slot, port):
    code = b"\xb8" + struct.pack("<I", pb.ENABLE | slot << 11)     # mov eax, CONFIG_ADDRESS
    code += MOV_DX + struct.pack("<H", 0xCF8) + OUT_DX_EAX
    code += MOV_DX + struct.pack("<H", 0xCFC) + IN_EAX_DX          # vendor | device << 16
    code += MOV_DX + struct.pack("<H", 0x3F8)
    code += (OUT_DX_AL + b"\xc1\xe8\x08") * 4                      # 4 bytes to the UART
    code += b"\x31\xc0"                                            # xor eax, eax
    code += MOV_DX + struct.pack("<H", port + pl.QUEUE_NOTIFY) + OUT_DX_AX * 3
    code += MOV_DX + struct.pack("<H", port + pl.QUEUE_SEL) + OUT_DX_AX
    return code + T.RESET


def test_config_read_ioeventfd_and_exit(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    att = VirtioPciAttachment(lambda: BlkDevice(str(img)))
    out = open(tmp_path / "serial.out", "wb", buffering=0)
    kernel = T.make_elf(guest_code(1, pb.IO_BASE), str(tmp_path / "guest.elf"))
    m = Machine(MachineConfig(kernel=kernel, mem_size=32 << 20, serial_out=out, timeout=120,
                              devices=[att]))
    try:
        t = att.transport
        assert att.slot == 1 and t.port == pb.IO_BASE and m.pci_irqs == [(1, 0, att.irq)]
        assert pb.get_or_create(m) is m.pci_bus
        writes, notifies = [], []
        real_write, real_notify = t.write, t._notify_once
        t.write = lambda off, size, v: writes.append((off, size, v)) or real_write(off, size, v)
        t._notify_once = lambda i: notifies.append(threading.current_thread().name) or real_notify(i)
        assert m.run() == STATUS["reset"]
        # the guest resets right after its notifies: the I/O thread may not
        # have read the eventfd yet when run() returns, so give it a moment
        end = time.monotonic() + 30
        while not notifies and time.monotonic() < end:
            time.sleep(0.005)
    finally:
        m.close()
        out.close()
    assert (tmp_path / "serial.out").read_bytes() == struct.pack("<HH", 0x1AF4, 0x1001)
    assert writes == [(pl.QUEUE_SEL, 2, 0)]            # the notifies never exited
    assert notifies and set(notifies) == {"pyvmm-io0"}  # eventfd -> the device's I/O thread
