"""Snapshots of modern and transitional virtio-pci (vmm/virtio/pci_persist.py)
and of multiqueue virtio-net with its control queue, without a VM: state()
through the file encoding, restore into a fresh transport on a fresh
(fake) VM, and the driver carrying on: common-config registers, config
space and BAR, MSI-X table/PBA/Enable with routes and irqfds set up again
in the new VM so pending and later interrupts arrive, the INTx fallback."""
import os
import struct

import pytest

from vmm.pci import device as pd
from vmm.testing.fakevm import FakeVm
from vmm.testing.mockdriver import T_IN, T_OUT, BlkDriver
from vmm.testing.mocknet import NetDriver, net_hdr
from vmm.testing.pcimodern_regs import PciModernRegs
from vmm.virtio import device as vd
from vmm.virtio import net as vn
from vmm.virtio import net_ctrl as nc
from vmm.virtio import pci_modern as pm
from vmm.virtio.blk import BlkDevice
from test_virtio_net_mq import MqBackend
from vmm import snapshot as S

BAR_AT = 0xE000_0000


def through_file(state):
    """What a restore sees: the state after the state file's encoding."""
    return S.unpack_state(S.pack_state({"arch": S.ARCH, "x": state}))["x"]


def fired(vm, t, vector):
    try:
        return int.from_bytes(os.read(vm.irqfds[t.msix.gsi(vector)], 8), "little")
    except (BlockingIOError, KeyError):
        return 0


def modern(mem, dev, vm, levels=None, transitional=False):
    t = pm.VirtioPciModern(dev, mem, vm=vm, transitional=transitional,
                           irq_line=(levels.append if levels is not None else None))
    return t


def place_bar(t):
    t.pci.program_bar(pm.BAR_MODERN, BAR_AT)
    t.pci.write_config(pd.COMMAND, 2, pd.CMD_MEMORY | pd.CMD_IO | pd.CMD_MASTER)


def run_q(d, qi, typ, sector, data=b"", read_len=0):
    """One request on queue `qi` (BlkDriver submits on queues[0]):
    (status, data)."""
    q0, d.queues[0] = d.queues[0], d.queues[qi]
    try:
        req = d.submit(typ, sector, data, read_len)
        d.kick(qi)
        assert req.head in dict(d.queues[0].get_used())
    finally:
        d.queues[0] = q0
    return d.result(req)


def rebind(d, t, msix=True):
    d.t, d.regs = t, PciModernRegs(t, msix=msix)


@pytest.mark.parametrize("transitional", [False, True], ids=["modern", "transitional"])
def test_modern_blk_with_msix_round_trip(mem, image, transitional):
    vm = FakeVm()
    t = modern(mem, BlkDevice(image, num_queues=2), vm, transitional=transitional)
    place_bar(t)
    d = BlkDriver(t, mem, regs=lambda t: PciModernRegs(t, msix=True))
    assert d.init()
    for i in range(3):
        assert d.run(T_OUT, i, bytes([i]) * 512)[0] == 0
    assert fired(vm, t, 1) == 3
    t.msix.table_write(2 * 16 + 12, 4, 1)          # mask queue 1's vector
    assert run_q(d, 1, T_IN, 1, read_len=512) == (0, b"\1" * 512)
    assert t.msix.pba_read(0, 8) == 0b100          # pending, not sent
    d.regs.common("device_feature_select", 1)
    d.regs.common("driver_feature_select", 1)
    d.regs.common("queue_select", 1)
    t.config()                                     # ISR config bit + config vector 0
    assert fired(vm, t, 0) == 1
    image_before, config_before = t._common_image(), bytes(t.pci.config)
    st = through_file(t.state())
    assert st["msix"]["pending"][2] and st["queue_vectors"] == [1, 2]
    t.close()

    vm2 = FakeVm()
    t2 = modern(mem, BlkDevice(image, num_queues=2), vm2, transitional=transitional)
    moved = []
    t2.pci.on_map = lambda dev, bar, old, new: (moved.append((bar.index, old, new))
                                                or t2._bar_moved(bar, old, new) or new)
    t2.restore(st)
    t2.restart()
    assert t2._common_image() == image_before and bytes(t2.pci.config) == config_before
    assert (pm.BAR_MODERN, None, BAR_AT) in moved and t2.bar_address == BAR_AT
    assert t2.msix.enabled and t2.interrupt_status == vd.INT_CONFIG
    assert [t2.msix.table_read(16 * v, 8) for v in range(3)] == [PciModernRegs.MSI_ADDRESS] * 3
    assert [t2.msix.table_read(16 * v + 8, 4) for v in range(3)] == [0x40, 0x41, 0x42]
    # KVM routes for the live vectors of this VM, irqfds bound to them
    routed = {gsi: msg for gsi, msg in vm2._msi_routes.items()}
    assert {t2.msix.gsi(0), t2.msix.gsi(1)} <= set(routed) and t2.msix.gsi(2) not in routed
    assert routed[t2.msix.gsi(1)] == (PciModernRegs.MSI_ADDRESS, 0x41)
    assert set(vm2.irqfds) == {t2.msix.gsi(v) for v in range(3)}
    rebind(d, t2)
    # the pending vector fires when the driver unmasks it
    t2.msix.table_write(2 * 16 + 12, 4, 0)
    assert fired(vm2, t2, 2) == 1 and t2.msix.pba_read(0, 8) == 0
    # and later completions interrupt as before
    assert d.run(T_IN, 2, read_len=512)[:2] == (0, b"\2" * 512)
    assert fired(vm2, t2, 1) == 1
    assert run_q(d, 1, T_OUT, 5, b"\5" * 512)[0] == 0 and fired(vm2, t2, 2) == 1
    assert d.regs.ack_interrupt() == vd.INT_CONFIG
    t2.close()


def test_intx_fallback_level_raised_again(mem, image):
    vm, levels = FakeVm(), []
    t = modern(mem, BlkDevice(image), vm, levels)
    d = BlkDriver(t, mem, regs=lambda t: PciModernRegs(t, msix=False))
    assert d.init()
    d.run(T_IN, 0, read_len=512)
    assert levels == [1] and t.interrupt_status == vd.INT_USED
    st = through_file(t.state())
    t.close()
    levels2 = []
    t2 = modern(mem, BlkDevice(image), FakeVm(), levels2)
    t2.restore(st)
    t2.restart()
    assert levels2[-1] == 1 and not t2.msix.enabled
    rebind(d, t2, msix=False)
    assert d.ack_interrupt() == vd.INT_USED and levels2[-1] == 0
    t2.close()


def test_restore_refuses_another_function(mem, image):
    t = modern(mem, BlkDevice(image), FakeVm())
    assert BlkDriver(t, mem, regs=lambda t: PciModernRegs(t, msix=True)).init()
    st = through_file(t.state())
    t.close()
    t2 = modern(mem, BlkDevice(image), FakeVm(), transitional=True)
    with pytest.raises(vd.VirtioError, match="transitional"):
        t2.restore(st)
    t2.close()
    t3 = modern(mem, BlkDevice(image, num_queues=2), FakeVm())
    with pytest.raises(vd.VirtioError, match="queues"):
        t3.restore(st)
    t3.close()


def test_multiqueue_net_and_control_queue_round_trip(mem):
    pairs, ctrl = 3, 6
    vm = FakeVm()
    backend = MqBackend(pairs)
    dev = vn.NetDevice(backend, queue_pairs=pairs)
    t = modern(mem, dev, vm)
    d = NetDriver(t, mem, arena_size=12 << 20, regs=lambda t: PciModernRegs(t, msix=True))
    assert d.init()
    assert d.control(ctrl, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == nc.OK
    assert d.control(ctrl, nc.CLASS_RX, nc.RX_PROMISC, b"\x01") == nc.OK
    table = struct.pack("<I", 1) + bytes.fromhex("020000aabbcc") + struct.pack("<I", 0)
    assert d.control(ctrl, nc.CLASS_MAC, nc.MAC_TABLE_SET, table) == nc.OK
    d.send(b"\x01" * 60, pair=1)
    assert d.sent(pair=1) and backend.queues[1].peer_frames() == [net_hdr() + b"\x01" * 60]
    d.add_rx(2048, pair=1)                         # a receive buffer the device has not used
    st = through_file(t.state())
    assert st["device"]["active_pairs"] == 2 and st["queues"][ctrl]["next_used"] == 3
    t.close()                                      # closes the old backend too

    vm2, backend2 = FakeVm(), MqBackend(pairs)
    dev2 = vn.NetDevice(backend2, queue_pairs=pairs)
    t2 = modern(mem, dev2, vm2)
    t2.restore(st)
    t2.restart()
    rebind(d, t2)
    assert dev2.active_pairs == 2 and backend2.enabled == {0: True, 1: True, 2: False}
    assert dev2.rx_mode == {nc.RX_PROMISC: True}
    assert dev2.mac_tables == ([bytes.fromhex("020000aabbcc")], [])
    # pair 1 continues: the buffer posted before the snapshot receives
    backend2.queues[1].peer.send(net_hdr() + b"\x02" * 70)
    dev2.poll_rx()
    assert [f for _, f in d.received(pair=1)] == [b"\x02" * 70] and fired(vm2, t2, 3) == 1
    # the control queue continues where it was (its 4th command)
    assert d.control(ctrl, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, struct.pack("<H", 3)) == nc.OK
    assert dev2.active_pairs == 3 and fired(vm2, t2, ctrl + 1) == 1
    t2.close()


def test_net_restore_refuses_another_pair_count(mem):
    dev = vn.NetDevice(MqBackend(2), queue_pairs=2)
    st = through_file(dev.state())
    dev.close()
    dev2 = vn.NetDevice(MqBackend(3), queue_pairs=3)
    with pytest.raises(vn.NetError, match="queue pairs"):
        dev2.restore(st)
    dev2.close()
