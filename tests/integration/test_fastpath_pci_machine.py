"""The C fast path on modern virtio-pci with MSI-X in a real Machine (KVM
irqfds routed to the vectors' messages, ioeventfds, the disk's own I/O
thread): kicks are served in C while the queue's vector is live, a masked
vector takes the queue back to Python (the message waits in the PBA) and
unmasking sends it."""
import os

import pytest

import vmm.testing.tinyguest as T
from vmm.devices import DriveSpec
from vmm.machine import Machine, MachineConfig
from vmm.testing.mockdriver import BlkDriver, T_IN
from vmm.testing.pcimodern_regs import PciModernRegs
from vmm.testing.waiting import SLOW, barrier
from vmm.virtio import pci_modern as pm
from vmm.virtio.ioloop import signal_eventfd

pytestmark = pytest.mark.usefixtures("needs_kvm")



def test_pci_modern_disk_on_fast_path_and_masking(tmp_path):
    img = tmp_path / "a.img"
    data = os.urandom(1 << 20)
    img.write_bytes(data)
    kernel = T.make_elf(T.CLI_HLT, str(tmp_path / "guest.elf"))
    spec = DriveSpec(f"file={img},transport=pci")
    serial = open(tmp_path / "serial", "wb")
    m = Machine(MachineConfig(kernel=kernel, mem_size=32 << 20, devices=[spec], serial_out=serial))
    try:
        t = spec.transport
        assert isinstance(t, pm.VirtioPciModern) and t._fast is not None
        d = BlkDriver(t, m.memory, arena=0x100000, regs=lambda t: PciModernRegs(t, msix=True))
        assert d.init() and t._fast.enabled(0)
        q = d.queues[0]
        loop = t._ioloop
        for i in range(8):
            req = d.submit(T_IN, 8 * i, read_len=4096)
            signal_eventfd(t.notify_fds[0])       # the guest's notify write, as KVM signals it
            assert len(q.wait_used(1, SLOW)) == 1
            assert d.result(req) == (0, data[4096 * i:4096 * (i + 1)])
        barrier(loop)         # C counts a kick and its interrupt after pushing used
        assert loop.fast_counts[1] >= 7           # served in C, no Python handler
        assert t.msix.delivered[1] <= 1 and t.interrupts >= 8

        bar = t.pci.bars[pm.BAR_MODERN].handler
        bar.write(pm.MSIX_TABLE + 16 + 12, 4, 1)  # mask queue 0's vector (1)
        assert not t._fast.enabled(0)
        req = d.submit(T_IN, 64, read_len=512)
        signal_eventfd(t.notify_fds[0])
        assert len(q.wait_used(1, SLOW)) == 1
        barrier(loop)         # the I/O thread raises interrupts just before it sleeps
        assert t.msix.pending[1]                  # held back, in Python
        bar.write(pm.MSIX_TABLE + 16 + 12, 4, 0)
        assert not t.msix.pending[1] and t._fast.enabled(0)
        assert d.result(req) == (0, data[32768:33280])
    finally:
        m.close()
        serial.close()
