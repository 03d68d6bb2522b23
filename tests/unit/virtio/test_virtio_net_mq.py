"""Multiqueue virtio-net (virtio 1.1 §5.1.6.5.5) and its control queue
(§5.1.6.5), through the mock driver on modern virtio-pci with MSI-X: one
vector per queue, pairs turned on by VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (and
their backend queues attached only then), RX-mode and MAC commands
acknowledged, malformed commands answered with VIRTIO_NET_ERR."""
import os
import struct

import pytest

from net_rig import SockBackend
from vmm.testing.fakevm import FakeVm
from vmm.testing.pcimodern_regs import PciModernRegs
from vmm.testing.mocknet import NetDriver, net_hdr
from vmm.virtio import net as vn
from vmm.virtio import net_ctrl as nc
from vmm.virtio import pci_modern as pm
from vmm.virtio.mmio import VirtioMmio

PAIRS = 3
CTRL = 2 * PAIRS


class MqBackend:
    """PAIRS datagram socketpairs as the queues of one multi-queue tap."""

    def __init__(self, n=PAIRS):
        self.queues = [SockBackend() for _ in range(n)]
        self.fds = [q.fd for q in self.queues]
        self.fd = self.fds[0]
        self.name, self.offload_ok = "mq", False
        self.enabled = {}                       # queue -> attached, as TUNSETQUEUE left it
        self.hdr_len = None

    def set_vnet_hdr_len(self, n):
        self.hdr_len = n

    def set_offload(self, flags):
        pass

    def set_queue_enabled(self, index, on):
        self.enabled[index] = on

    def close(self):
        for q in self.queues:
            q.close()


class Rig:
    def __init__(self, mem, features=None, pairs=PAIRS):
        self.vm = FakeVm()
        self.backend = MqBackend(pairs)
        self.dev = vn.NetDevice(self.backend, queue_pairs=pairs)
        self.t = pm.VirtioPciModern(self.dev, mem, vm=self.vm)
        self.d = NetDriver(self.t, mem, arena_size=12 << 20,
                           regs=lambda t: PciModernRegs(t, msix=True))
        self.ok = self.d.init(features=features)

    def fired(self, queue):
        """Interrupts on the vector of `queue` (vector = queue + 1)."""
        try:
            fd = self.vm.irqfds[self.t.msix.gsi(queue + 1)]
            return int.from_bytes(os.read(fd, 8), "little")
        except BlockingIOError:
            return 0


@pytest.fixture
def rig(mem):
    made = []

    def make(**kw):
        r = Rig(mem, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.t.close()


def test_features_config_and_queues(rig):
    r = rig()
    assert r.ok
    for b in (vn.F_MQ, vn.F_CTRL_VQ, vn.F_CTRL_RX, vn.F_CTRL_MAC_ADDR):
        assert r.d.features >> b & 1, b
    assert r.d.config(8, 2) == PAIRS                    # max_virtqueue_pairs
    assert r.d.regs.common("num_queues") == 2 * PAIRS + 1
    assert r.t.msix.vectors == 2 * PAIRS + 2 and r.t.queue_vectors == list(range(1, CTRL + 2))
    # §5.1.6.5.5: one pair after negotiation; the other tap queues detached
    assert r.dev.active_pairs == 1 and r.backend.enabled == {0: True, 1: False, 2: False}


def test_single_pair_device_is_unchanged(mem):
    dev = vn.NetDevice(SockBackend())
    assert dev.queue_max_sizes == (256, 256) and not dev.features >> vn.F_MQ & 1
    assert not dev.features >> vn.F_CTRL_VQ & 1 and dev.ctrl_index is None
    dev.close()


def test_vq_pairs_set_and_traffic_on_pair_2(rig):
    r = rig()
    d = r.d
    assert d.control(CTRL, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, struct.pack("<H", 3)) == nc.OK
    assert r.fired(CTRL) == 1
    assert r.dev.active_pairs == 3 and r.backend.enabled == {0: True, 1: True, 2: True}
    # transmit on pair 2 reaches tap queue 2 and interrupts queue 5's vector
    d.send(b"\x01" * 60, pair=2)
    assert d.sent(pair=2) and r.backend.queues[2].peer_frames() == [net_hdr() + b"\x01" * 60]
    assert r.backend.queues[0].peer_frames() == [] and r.fired(5) == 1 and r.fired(1) == 0
    # a frame on tap queue 2 lands in queue 4
    d.add_rx(2048, pair=2)
    r.backend.queues[2].peer.send(net_hdr() + b"\x02" * 70)
    r.dev.poll_rx()
    assert [f for _, f in d.received(pair=2)] == [b"\x02" * 70] and r.fired(4) == 1
    # back to one pair: queues 1 and 2 detached, their frames stay in the tap
    assert d.control(CTRL, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, struct.pack("<H", 1)) == nc.OK
    assert r.backend.enabled == {0: True, 1: False, 2: False}
    d.add_rx(2048, pair=1)
    r.backend.queues[1].peer.send(net_hdr() + b"\x03" * 70)
    r.dev.poll_rx()
    assert d.received(pair=1) == []


@pytest.mark.parametrize("data", [struct.pack("<H", 0), struct.pack("<H", PAIRS + 1),
                                  b"\x02", b"\x02\x00\x00"], ids=["0", "too-many", "short", "long"])
def test_vq_pairs_set_refused(rig, data):
    r = rig()
    assert r.d.control(CTRL, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, data) == nc.ERR
    assert r.dev.active_pairs == 1


def test_rx_mode_and_mac_commands(rig):
    r = rig()
    d = r.d
    assert d.control(CTRL, nc.CLASS_RX, nc.RX_PROMISC, b"\x01") == nc.OK
    assert d.control(CTRL, nc.CLASS_RX, nc.RX_ALLMULTI, b"\x00") == nc.OK
    assert r.dev.rx_mode == {nc.RX_PROMISC: True, nc.RX_ALLMULTI: False}
    assert d.control(CTRL, nc.CLASS_RX, 5, b"\x01") == nc.ERR      # NOBCAST: RX_EXTRA not offered
    mac = bytes.fromhex("020000112233")
    assert d.control(CTRL, nc.CLASS_MAC, nc.MAC_ADDR_SET, mac) == nc.OK
    assert bytes(d.config(i, 1) for i in range(6)) == mac
    uni, multi = [bytes.fromhex("020000aabbcc")], [bytes.fromhex("01005e000001"), bytes.fromhex("333300000001")]
    table = struct.pack("<I", 1) + uni[0] + struct.pack("<I", 2) + b"".join(multi)
    assert d.control(CTRL, nc.CLASS_MAC, nc.MAC_TABLE_SET, table) == nc.OK
    assert r.dev.mac_tables == (uni, multi)
    for bad in (table[:-1], table + b"\0", struct.pack("<I", 99), b""):
        assert d.control(CTRL, nc.CLASS_MAC, nc.MAC_TABLE_SET, bad) == nc.ERR
    assert d.control(CTRL, 77, 0) == nc.ERR                        # unknown class
    assert d.control(CTRL, nc.CLASS_MQ, 9, b"\x01\x00") == nc.ERR  # unknown command
    assert r.dev._ctrl.commands == 11


def test_ctrl_without_ack_byte_and_header(rig, mem):
    r = rig()
    d = r.d
    q = d.queues[CTRL]
    hdr = d.alloc(2)
    mem.write(hdr, b"\x04\x00")
    head = q.add([(hdr, 2, False)])                 # no ack buffer: completed with length 0
    d.kick(CTRL)
    assert dict(q.get_used()) == {head: 0}
    ack = d.alloc(1, fill=0xEE)
    head = q.add([(ack, 1, True)])                  # no header: ERR
    d.kick(CTRL)
    assert dict(q.get_used()) == {head: 1} and mem.read(ack, 1) == b"\x01"
    assert r.t.status & 64 == 0                     # not a reason to need reset


def test_mq_not_negotiated(rig):
    """A driver that leaves MQ (and the control queue) off gets pair 0."""
    r = rig(features=~((1 << vn.F_MQ) | (1 << vn.F_CTRL_VQ)))
    assert r.ok and r.dev._ctrl is None and r.dev.active_pairs == 1
    r.d.send(b"\x05" * 60)
    assert r.backend.queues[0].peer_frames() == [net_hdr() + b"\x05" * 60]


def test_mq_over_mmio(mem):
    """The same device on virtio-mmio (no MSI-X): one interrupt line."""
    backend = MqBackend(2)
    dev = vn.NetDevice(backend, queue_pairs=2)
    t = VirtioMmio(dev, mem, irq=lambda: None)
    d = NetDriver(t, mem, arena_size=12 << 20)
    assert d.init()
    assert d.control(4, nc.CLASS_MQ, nc.MQ_VQ_PAIRS_SET, struct.pack("<H", 2)) == nc.OK
    d.send(b"\x06" * 60, pair=1)
    assert backend.queues[1].peer_frames() == [net_hdr() + b"\x06" * 60]
    t.close()
